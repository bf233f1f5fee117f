"""The pretraining stage: train a causal LM on scored documents with a PHF objective.

Read top to bottom: the tokenizer and model (and, for AWR, a value head), the token stores of
both splits (prepared once per corpus and tokenizer, phf/data/store.py), the objective's blocks
cut from them (phf/data/blocks.py), the step budget, the optimizer and schedule; then one
optimizer step, the evaluation, and the state a checkpoint holds. phf/stages/loop.py drives it,
as it drives every stage, and scripts/benchmark.py drives the same object.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from phf.checkpoints import load_head, load_weights, save_head, save_pretrained
from phf.data.blocks import PackedBlocks, objective_blocks, training_batches
from phf.data.store import TokenStore
from phf.distributed import SINGLE_PROCESS, DistributedContext, all_reduce_mean
from phf.evaluation import Evaluator
from phf.hardware import Placement
from phf.models import VALUE_HEAD_FILE, Network, ValueHead, load_model_and_tokenizer
from phf.objectives import Objective, build_objective
from phf.stages.common import (
    build_evaluator,
    dataset_record,
    load_kl_reference,
    publish_model,
    scenario_tables,
    token_store,
)
from phf.stages.loop import NonFiniteLossError, Tables
from phf.tracking import Tracker

log = logging.getLogger(__name__)


def step_budget(train: DictConfig) -> int:
    """``train.max_steps``, or the steps that consume ``train.num_tokens`` tokens."""
    if train.max_steps is not None:
        return train.max_steps
    tokens_per_step = train.batch_size * train.block_size
    return max(1, math.ceil(train.num_tokens / tokens_per_step))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw(
    modules: list[torch.nn.Module], train: DictConfig, placement: Placement, eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over ``modules`` (weight decay on matrices only), fused: one kernel per step on
    CUDA and on the CPU (where the unfused loop is ~2% of the tiny model's step)."""
    return torch.optim.AdamW(
        [group for m in modules for group in optimizer_groups(m, train.weight_decay)],
        lr=train.lr,
        betas=tuple(train.adam_betas),
        eps=eps,
        fused=placement.device.type in ("cuda", "cpu"),
    )


def schedule(
    optimizer: torch.optim.Optimizer, train: DictConfig, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """train.lr_scheduler with linear warm-up over train.warmup_ratio of ``steps``."""
    return get_scheduler(
        train.lr_scheduler,
        optimizer,
        num_warmup_steps=round(train.warmup_ratio * steps),
        num_training_steps=steps,
    )


def compiled(network: torch.nn.Module, hardware: DictConfig, placement: Placement):
    """torch.compile of ``network`` when hardware.compile says so (null: on CUDA only)."""
    enabled = hardware.compile
    if enabled is None:
        enabled = placement.device.type == "cuda"
    return torch.compile(network) if enabled else network


def accumulate_gradients(
    network: torch.nn.Module,
    objective: Objective,
    input_ids: torch.Tensor,
    token_scores: torch.Tensor,
    micro_batches: int,
    placement: Placement,
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward one batch in ``micro_batches`` pieces; returns the batch-mean loss
    and metrics (detached tensors: no CPU-GPU sync here). Under DDP, gradients are averaged
    across processes only on the last piece (``no_sync`` before it)."""
    step_loss = torch.zeros((), device=input_ids.device)
    step_metrics: dict[str, torch.Tensor] = {}
    pieces = [
        (ids, scores)
        for ids, scores in zip(
            input_ids.tensor_split(micro_batches),
            token_scores.tensor_split(micro_batches),
            strict=True,
        )
        if ids.numel()
    ]
    for index, (ids, scores) in enumerate(pieces):
        last = index == len(pieces) - 1
        no_sync = getattr(network, "no_sync", None)
        with (
            placement.autocast(),
            contextlib.nullcontext() if last or no_sync is None else no_sync(),
        ):
            logits, values = network(ids)
            loss, metrics = objective.loss(logits, ids, scores, values)
            # Weigh each micro-batch by its share of the batch so the sum is the batch mean.
            share = ids.size(0) / input_ids.size(0)
            scaler.scale(loss * share).backward()
        step_loss += loss.detach() * share
        for name, value in metrics.items():
            step_metrics[name] = step_metrics.get(name, 0.0) + value * share
    return step_loss, step_metrics


@dataclass
class PretrainStage:
    """What one training step touches: model (and value head), objective, blocks, optimizer.

    Built by ``PretrainStage.build`` from a composed config; ``step()`` runs one optimizer step.
    """

    progress_metric = "tokens_seen"
    progress_label = "tokens"
    rate_metric = "train/tokens_per_s"
    headline = "score"

    cfg: DictConfig
    placement: Placement
    model: PreTrainedModel
    value_head: ValueHead | None
    tokenizer: PreTrainedTokenizerBase
    objective: Objective
    train_store: TokenStore
    blocks: PackedBlocks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    max_steps: int
    micro_batches: int
    network: torch.nn.Module  # model + value head, wrapped in DDP (and compiled) as asked
    evaluator: Evaluator | None
    distributed: DistributedContext = SINGLE_PROCESS
    steps_done: int = 0
    progress: int = 0  # tokens seen, over all processes
    _batches: Iterator[dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        cfg: DictConfig,
        placement: Placement,
        distributed: DistributedContext = SINGLE_PROCESS,
    ) -> PretrainStage:
        train = cfg.train
        if train.batch_size % distributed.world_size:
            raise ValueError(
                f"train.batch_size={train.batch_size} must be a multiple of the "
                f"{distributed.world_size} data-parallel processes"
            )
        objective = build_objective(cfg.objective)
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, train.block_size, control_tokens=cfg.objective.name == "conditional"
        )
        model.to(placement.device)
        value_head = (
            ValueHead(model.config.hidden_size).to(placement.device)
            if objective.needs_values
            else None
        )
        # The split's tokens, prepared once per corpus and tokenizer; a bad row fails here,
        # before any evaluation or training.
        train_store = token_store(cfg, cfg.task.train_split, tokenizer)
        blocks = objective_blocks(cfg.objective, train_store, tokenizer, train.block_size, cfg.seed)
        max_steps = step_budget(train)
        optimizer = adamw([model] + ([value_head] if value_head else []), train, placement)
        network: torch.nn.Module = Network(model, value_head)
        if distributed.enabled:
            device_ids = [placement.device.index] if placement.device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=device_ids)
        evaluator = None
        if distributed.is_main:
            evaluator = build_evaluator(
                cfg, tokenizer, placement, load_kl_reference(cfg, tokenizer, placement)
            )
        per_process_batch = train.batch_size // distributed.world_size
        stage = cls(
            cfg=cfg,
            placement=placement,
            model=model,
            value_head=value_head,
            tokenizer=tokenizer,
            objective=objective,
            train_store=train_store,
            blocks=blocks,
            optimizer=optimizer,
            scheduler=schedule(optimizer, train, max_steps),
            scaler=placement.grad_scaler(),
            max_steps=max_steps,
            micro_batches=math.ceil(per_process_batch / cfg.hardware.micro_batch_size),
            network=compiled(network, cfg.hardware, placement),
            evaluator=evaluator,
            distributed=distributed,
        )
        log.info(
            "model: %.2fM parameters on %s (%s)%s; %d steps x %d sequences x %d tokens "
            "(%d micro-batches of <= %d per step%s); %d of %d documents, %d tokens per epoch",
            sum(p.numel() for p in model.parameters()) / 1e6,
            placement.device,
            placement.precision,
            ", with a value head" if value_head is not None else "",
            max_steps,
            train.batch_size,
            train.block_size,
            stage.micro_batches,
            cfg.hardware.micro_batch_size,
            f", in each of {distributed.world_size} processes" if distributed.enabled else "",
            len(blocks.documents),
            train_store.num_documents,
            blocks.tokens_per_epoch,
        )
        return stage

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.model] + ([self.value_head] if self.value_head is not None else [])

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._batches is None:  # from the current step: a resumed run reads on from there
            self._batches = training_batches(
                self.blocks,
                self.cfg.train.batch_size,
                self.steps_done,
                self.max_steps,
                self.cfg.hardware.loader_workers,
                pin_memory=self.placement.device.type == "cuda",
            )
        return next(self._batches)

    def step(self) -> dict[str, Any]:
        """One optimizer step; its metrics as detached tensors (no CPU-GPU sync but one)."""
        for module in self.modules:
            module.train()
        batch = self._next_batch()
        device = self.placement.device
        # Every process draws the same global batch and trains on its own slice of it.
        world, rank = self.distributed.world_size, self.distributed.rank
        input_ids = batch["input_ids"].tensor_split(world)[rank].to(device, non_blocking=True)
        token_scores = batch["token_scores"].tensor_split(world)[rank].to(device, non_blocking=True)
        loss, metrics = accumulate_gradients(
            self.network,
            self.objective,
            input_ids,
            token_scores,
            self.micro_batches,
            self.placement,
            self.scaler,
        )
        loss = all_reduce_mean(loss, self.distributed)  # every process sees the same loss
        # One CPU-GPU sync per step: a NaN must stop the run before it reaches the weights.
        if not torch.isfinite(loss).item():
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {self.steps_done + 1} (tokens seen "
                f"{self.progress}); lower train.lr or raise train.warmup_ratio"
            )
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            list(self.network.parameters()), self.cfg.train.max_grad_norm, foreach=True
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.progress += batch["input_ids"].numel()  # the global batch
        return metrics | {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr}

    def evaluate(self) -> tuple[dict[str, float], Tables]:
        assert self.evaluator is not None, "only the main process evaluates"
        metrics, tables = self.evaluator.evaluate(self.model)
        return metrics, scenario_tables(tables)

    def describe(self, metrics: dict[str, float]) -> str:
        text = (
            f"score {metrics['score']:.4f}, score_max_at_25 {metrics['score_max_at_25']:.4f}, "
            f"eval/lm_loss {metrics.get('eval/lm_loss', float('nan')):.4f}"
        )
        return text + (f", kl {metrics['kl']:.3f}" if "kl" in metrics else "")

    def training_state(self) -> dict[str, Any]:
        return {
            "step": self.steps_done,
            "progress": self.progress,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        """Weights, value head, optimizer, scheduler, loss scaler and position: the blocks are a
        function of the step, so the data stream goes on exactly where it was."""
        load_weights(self.model, directory)
        if self.value_head is not None:
            load_head(self.value_head, directory / VALUE_HEAD_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps_done, self.progress = state["step"], state["progress"]
        self._batches = None

    def save(self, directory: Path) -> None:
        """The model (``from_pretrained``-loadable), tokenizer, config and value head."""
        save_pretrained(directory, self.model, self.tokenizer, self.cfg)
        if self.value_head is not None:
            save_head(self.value_head, directory / VALUE_HEAD_FILE)

    def publish(self, directory: Path, tracker: Tracker) -> None:
        publish_model(self.save, directory, self.cfg, tracker)

    def datasets(self) -> list[dict[str, Any]]:
        test = self.cfg.task.test_split
        train = dataset_record(
            self.cfg,
            self.train_store,
            self.cfg.task.train_split,
            "training",
            documents_trained_on=len(self.blocks.documents),
        )
        test_store = token_store(self.cfg, test, self.tokenizer)
        return [train, dataset_record(self.cfg, test_store, test, "evaluation")]
