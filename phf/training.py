"""The optimization core under every stage: what happens between "here is my loss" and the next
step, written once.

A stage builds one ``Optimization`` over the modules it trains and, at each update, hands it its
micro-batches and a function that gives a micro-batch's loss (``accumulate``), then asks for the
update (``step``). The core owns:

- AdamW with weight decay on matrices only (never biases or LayerNorm gains), fused on CUDA and
  on the CPU, and the warm-up + ``train.lr_scheduler`` schedule;
- the fp16 loss scaler (``torch.amp.GradScaler``, a transparent no-op in fp32 and bf16): an
  update whose gradients overflow is skipped and the scale lowered, in every stage;
- gradient accumulation over micro-batches and data-parallel processes, so that the gradient is
  that of (sum of the losses over the global batch) / a denominator the stage names (pairs,
  tokens, sequences), whatever the micro-batch size and however many processes share the batch;
  DDP's all-reduce runs on the last micro-batch only (``no_sync`` before it);
- clipping of the trainable parameters' gradient norm (frozen ones never count), the norm
  returned as ``train/grad_norm``, with ``train/lr`` (and ``train/loss_scale`` under fp16);
- the non-finite check, naming the stage, the step and the fix, before a NaN reaches the weights;
- its state (optimizer, schedule, scaler) for checkpoints.

``training_network`` wraps a module in DDP when the run has several processes (and compiles it
when asked).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from phf.distributed import DistributedContext, all_reduce_sum
from phf.hardware import Placement

PieceLoss = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def trainable_parameters(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Each parameter that trains, once (a module may share parameters with another)."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def optimizer_groups(params: Sequence[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); never biases or LayerNorm gains."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def check_divisible(key: str, value: int, distributed: DistributedContext, what: str) -> None:
    """Refuse a global batch that the data-parallel processes cannot share evenly (every
    process must run as many micro-batches as the others, or the collectives deadlock)."""
    if value % distributed.world_size:
        raise ValueError(
            f"{key}={value} must be a multiple of the {distributed.world_size} data-parallel "
            f"processes (each takes an equal share of the {what}); set {key} to a multiple "
            f"of {distributed.world_size} or change the number of processes"
        )


def training_network(
    module: torch.nn.Module,
    hardware: DictConfig,
    placement: Placement,
    distributed: DistributedContext,
    fixed_shapes: bool = False,
) -> torch.nn.Module:
    """What a stage runs its training forward through: ``module`` in DDP when several
    processes train it (the same weights everywhere: DDP broadcasts rank 0's), compiled when
    ``hardware.compile`` is true (null: on CUDA, for stages whose batches have ``fixed_shapes``;
    padded batches of varying width would recompile). Buffers are not re-broadcast at each
    forward: phf's models keep none that training changes, and a forward that only some
    processes run (an evaluation, a rollout) must not wait for the others."""
    network = module
    if distributed.enabled:
        device_ids = [placement.device.index] if placement.device.type == "cuda" else None
        network = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
    enabled = hardware.compile
    if enabled is None:
        enabled = placement.device.type == "cuda" and fixed_shapes
    return torch.compile(network) if enabled else network


class Optimization:
    """The optimizer, schedule and loss scaler of one stage's trained modules (module
    docstring). ``total_steps`` is the number of updates the schedule spans."""

    def __init__(
        self,
        modules: Sequence[torch.nn.Module],
        train: DictConfig,
        placement: Placement,
        total_steps: int,
        distributed: DistributedContext,
        stage: str,
        eps: float = 1e-8,
    ) -> None:
        self.params = trainable_parameters(modules)
        self.placement = placement
        self.distributed = distributed
        self.stage = stage
        self.max_grad_norm = float(train.max_grad_norm)
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.params, train.weight_decay),
            lr=train.lr,
            betas=tuple(train.adam_betas),
            eps=eps,
            # One kernel per step on CUDA and on the CPU (where the unfused loop is ~2% of the
            # tiny model's step).
            fused=placement.device.type in ("cuda", "cpu"),
        )
        self.scheduler = get_scheduler(
            train.lr_scheduler,
            self.optimizer,
            num_warmup_steps=round(train.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        self.scaler = placement.grad_scaler()
        self.updates = 0

    def accumulate(
        self,
        network: torch.nn.Module,
        pieces: Sequence[Any],
        piece_loss: PieceLoss,
        denominator: float,
    ) -> dict[str, float]:
        """Forward (under the run's autocast) and backward this process's ``pieces``
        (micro-batches) of a global batch: ``piece_loss(piece)`` gives the piece's loss *sum*
        and metric sums; the gradient becomes that of (the losses' sum over every process's
        pieces) / ``denominator``. Returns the sums over all processes, ``loss`` among them
        (one all-reduce and one device sync per call)."""
        sums: dict[str, torch.Tensor] = {}
        no_sync = getattr(network, "no_sync", None)
        scale = self.distributed.world_size / denominator  # DDP averages over the processes
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with self.placement.autocast():
                    loss_sum, metrics = piece_loss(piece)
                self.scaler.scale(loss_sum * scale).backward()
            for name, value in {"loss": loss_sum, **metrics}.items():
                value = value.detach().float().reshape(())
                sums[name] = sums[name] + value if name in sums else value
        names = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[n] for n in names]), self.distributed)
        return dict(zip(names, totals.tolist(), strict=True))

    def step(self, loss: float, where: str, hint: str = "lower train.lr") -> dict[str, Any]:
        """One update from the accumulated gradients, unless ``loss`` (the global batch's, the
        same number in every process) is not finite: then the gradients are dropped and the run
        stops with the step (``where``) and ``hint`` named. Returns ``train/grad_norm`` (a
        tensor: no device sync here), ``train/lr`` (the rate this update used) and, under fp16,
        ``train/loss_scale``."""
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the {self.stage} loss is {loss} at {where}; {hint}")
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        metrics: dict[str, Any] = {"train/grad_norm": grad_norm.detach(), "train/lr": lr}
        if self.scaler.is_enabled():
            metrics["train/loss_scale"] = self.scaler.get_scale()
        return metrics

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "updates": self.updates,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # absent in checkpoints written before the core had one
            self.scaler.load_state_dict(state["scaler"])
        self.updates = int(state.get("updates", 0))
