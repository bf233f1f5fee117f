"""Data parallelism over the GPUs of one node (or CPU processes): one process per device.

Started by torchrun (``torchrun --nproc_per_node=4 -m phf.run ...``, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or by SLURM with several tasks per node
(``hydra.launcher.tasks_per_node=4``: submitit's TorchDistributedEnvironment exports the same
variables). Every process builds the same global batch from the same seeded data stream and
trains on its slice of it; DDP averages the gradients, so the result is that of one process
with the whole batch. Only rank 0 logs to MLflow, evaluates and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_JOB_ID" in os.environ else 1


def init_distributed() -> DistributedContext:
    """Join the process group when launched as several processes; else one process."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), _local_rank())
    if "WORLD_SIZE" not in os.environ and _slurm_tasks() > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank())
    return DistributedContext(dist.get_rank(), dist.get_world_size(), _local_rank())


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of ``value`` over all processes (itself in a single process)."""
    if not context.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The sum of ``value`` over all processes (itself in a single process)."""
    if not context.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_object(value: object, context: DistributedContext) -> object:
    """Rank 0's ``value`` in every process (e.g. the checkpoint that all of them resume from)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_signal(signum: int | None, context: DistributedContext) -> int | None:
    """The stop signal any process got (the largest number if several did), in every process,
    so that all of them take the same branch to a collective checkpoint; None if none did.
    Under DDP this is one small all-reduce per step."""
    if not context.enabled:
        return signum
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float(signum or 0)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) or None


def gather_rows(
    value: torch.Tensor, context: DistributedContext, pad_value: float = 0, left: bool = False
) -> torch.Tensor:
    """Every process's rows of ``value`` (each process holding as many), concatenated in rank
    order, in every process. A [rows, width, ...] tensor is first padded with ``pad_value`` to
    the widest process's width, on the right (or the ``left``)."""
    if not context.enabled:
        return value
    if value.dim() >= 2:
        width = torch.tensor([value.size(1)], device=value.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        missing = int(width.item()) - value.size(1)
        if missing:
            pad = [0, 0] * (value.dim() - 2) + ([missing, 0] if left else [0, missing])
            value = F.pad(value, pad, value=pad_value)
    boolean = value.dtype == torch.bool
    value = value.to(torch.uint8) if boolean else value.contiguous()
    parts = [torch.empty_like(value) for _ in range(context.world_size)]
    dist.all_gather(parts, value)
    gathered = torch.cat(parts)
    return gathered.bool() if boolean else gathered


def gather_objects(items: list, context: DistributedContext) -> list:
    """Every process's ``items``, concatenated in rank order, in every process."""
    if not context.enabled:
        return items
    parts: list = [None] * context.world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
