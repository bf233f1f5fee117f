"""How fast training goes against what the hardware can do: FLOPs per token, peak FLOP/s, MFU.

Model FLOPs utilisation (MFU) = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token as
nanoGPT estimates them (after the PaLM paper): 6N for the forward and backward of N parameters
(position embeddings left out: a lookup, no multiply) plus 12 L H Q T for attention over blocks of
T tokens (L layers, H heads of Q dimensions). The peak is given, looked up for known GPUs (dense
bf16/fp16 tensor-core figures of their data sheets), or, on the CPU, measured on the spot with a
large fp32 matmul, so the CPU's MFU is a share of what this machine does at that moment.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the CUDA device name.
GPU_PEAKS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16
}


def flops_per_token(model: PreTrainedModel, block_size: int) -> float:
    """6N + 12 L H Q T for a GPT-style model (see the module docstring)."""
    config = model.config
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    width = getattr(config, "n_embd", None) or config.hidden_size
    parameters = sum(p.numel() for p in model.parameters())
    positions = getattr(getattr(model, "transformer", None), "wpe", None)
    if positions is not None:
        parameters -= positions.weight.numel()
    return 6.0 * parameters + 12.0 * layers * heads * (width // heads) * block_size


def measured_cpu_peak(size: int = 2048, repeats: int = 10) -> float:
    """The fastest of ``repeats`` fp32 matmuls of two size x size matrices, in FLOP/s, with the
    threads torch uses now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, given_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for ``device``."""
    if given_tflops:
        return given_tflops * 1e12, "given (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name}: {key} dense bf16 data sheet peak"
        raise ValueError(f"no known peak for {name}; give it with --peak-tflops")
    return (
        measured_cpu_peak(),
        f"measured: 2048^3 fp32 matmul, {torch.get_num_threads()} threads",
    )
