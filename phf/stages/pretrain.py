"""The pretraining stage: train a causal LM on scored documents with a PHF objective.

Read top to bottom: the tokenizer and model (and, for AWR, a value head), the token stores of
both splits (prepared once per corpus and tokenizer, phf/data/store.py), the objective's blocks
cut from them (phf/data/blocks.py), the step budget, the optimizer and schedule; then one
optimizer step, the evaluation, and the state a checkpoint holds. phf/stages/loop.py drives it,
as it drives every stage, and scripts/benchmark.py drives the same object.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phf.checkpoints import load_head, load_weights, save_head, save_pretrained
from phf.data.blocks import PackedBlocks, objective_blocks, training_batches
from phf.data.store import TokenStore
from phf.distributed import SINGLE_PROCESS, DistributedContext
from phf.evaluation import Evaluator
from phf.hardware import Placement
from phf.losses.lm import Objective, build_objective
from phf.models import VALUE_HEAD_FILE, Network, ValueHead, load_model_and_tokenizer
from phf.stages.common import (
    build_evaluator,
    dataset_record,
    load_kl_reference,
    publish_model,
    scenario_tables,
    token_store,
)
from phf.stages.loop import Tables
from phf.tracking import Tracker
from phf.training import Optimization, check_divisible, training_network

log = logging.getLogger(__name__)


def step_budget(train: DictConfig) -> int:
    """``train.max_steps``, or the steps that consume ``train.num_tokens`` tokens."""
    if train.max_steps is not None:
        return train.max_steps
    tokens_per_step = train.batch_size * train.block_size
    return max(1, math.ceil(train.num_tokens / tokens_per_step))


@dataclass
class PretrainStage:
    """What one training step touches: model (and value head), objective, blocks, optimizer.

    Built by ``PretrainStage.build`` from a composed config; ``step()`` runs one optimizer step.
    """

    name = "pretrain"
    title = "PHF pretraining"
    section = None
    model_references = ("model.pretrained", "eval.kl_reference")
    data_parallel = "each process trains on its slice of every global batch of blocks"
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
    optimization: Optimization
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
        check_divisible("train.batch_size", train.batch_size, distributed, "blocks of a step")
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
        network = Network(model, value_head)
        optimization = Optimization([network], train, placement, max_steps, distributed, "training")
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
            optimization=optimization,
            max_steps=max_steps,
            micro_batches=math.ceil(per_process_batch / cfg.hardware.micro_batch_size),
            network=training_network(
                network, cfg.hardware, placement, distributed, fixed_shapes=True
            ),
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
        """One optimizer step: the objective's loss on this process's slice of the global batch,
        in micro-batches, handed to the core."""
        for module in self.modules:
            module.train()
        batch = self._next_batch()
        device = self.placement.device
        # Every process draws the same global batch and trains on its own slice of it.
        world, rank = self.distributed.world_size, self.distributed.rank
        input_ids = batch["input_ids"].tensor_split(world)[rank].to(device, non_blocking=True)
        token_scores = batch["token_scores"].tensor_split(world)[rank].to(device, non_blocking=True)
        pieces = [
            piece
            for piece in zip(
                input_ids.tensor_split(self.micro_batches),
                token_scores.tensor_split(self.micro_batches),
                strict=True,
            )
            if piece[0].numel()
        ]

        def piece_loss(piece: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            ids, scores = piece
            logits, values = self.network(ids)
            loss, metrics = self.objective.loss(logits, ids, scores, values)
            rows = ids.size(0)  # the objective's loss is a mean over its rows
            return loss * rows, {name: value * rows for name, value in metrics.items()}

        rows = batch["input_ids"].size(0)
        sums = self.optimization.accumulate(self.network, pieces, piece_loss, rows)
        metrics = {name: value / rows for name, value in sums.items()}
        loss = metrics.pop("loss")
        update = self.optimization.step(
            loss,
            f"step {self.steps_done + 1} (tokens seen {self.progress})",
            "lower train.lr or raise train.warmup_ratio",
        )
        self.steps_done += 1
        self.progress += batch["input_ids"].numel()  # the global batch
        return metrics | {"train/loss": loss} | update

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
        return {"step": self.steps_done, "progress": self.progress} | self.optimization.state()

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        """Weights, value head, optimizer, scheduler, loss scaler and position: the blocks are a
        function of the step, so the data stream goes on exactly where it was."""
        load_weights(self.model, directory)
        if self.value_head is not None:
            load_head(self.value_head, directory / VALUE_HEAD_FILE)
        self.optimization.load_state(state)
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
