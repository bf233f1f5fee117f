"""Turn the ``hardware`` config into a torch device, an autocast context and a gradient scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler is a transparent pass-through.
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_placement(cfg: DictConfig, local_rank: int = 0) -> Placement:
    """Pick the device and precision; ``auto`` means the GPU in bf16/fp16 if there is one.
    ``local_rank`` picks the GPU of this process under data parallelism."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device_name = str(cfg.device.value if hasattr(cfg.device, "value") else cfg.device)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "hardware.device=cuda but torch sees no CUDA device; use hardware=cpu or hardware=auto"
        )
    device = torch.device(device_name, local_rank) if device_name == "cuda" else torch.device("cpu")
    precision = str(cfg.precision.value if hasattr(cfg.precision, "value") else cfg.precision)
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and precision == "fp16":
        raise RuntimeError("fp16 autocast is not supported on the CPU; use fp32 or bf16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Placement(device=device, dtype=dtype)
