"""The pretraining stage: train a causal LM on scored documents with a PHF objective.

Read top to bottom: placement, tokenizer and model, data, step budget, optimizer and schedule,
then the loop (evaluate at start, every ``train.eval_steps`` and at the end; checkpoint every
``train.save_steps`` and at the end), then the final model as an MLflow artifact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_scheduler,
)

from phf.checkpoints import (
    latest_checkpoint,
    load_training_state,
    restore_rng_states,
    save_checkpoint,
    save_pretrained,
)
from phf.data.corpus import Document, iter_documents
from phf.data.packing import batches, training_blocks
from phf.data.transforms import document_filter, token_transform
from phf.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    all_reduce_mean,
    any_process,
    barrier,
    broadcast_object,
    init_distributed,
)
from phf.hardware import Placement, resolve_placement
from phf.models import (
    VALUE_HEAD_FILE,
    Network,
    ValueHead,
    load_model_and_tokenizer,
    save_value_head,
)
from phf.objectives import Objective, build_objective
from phf.preemption import PreemptionGuard
from phf.stages.common import build_evaluator, load_kl_reference, publish_model
from phf.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


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
class Training:
    """What one training step touches: model (and value head), objective, data, optimizer.

    Built by ``Training.build`` from a composed config; ``step()`` runs one optimizer step.
    The stage's loop and scripts/benchmark.py both drive it, so the benchmark measures the
    stage's own code, data pipeline included.
    """

    cfg: DictConfig
    placement: Placement
    model: PreTrainedModel
    value_head: ValueHead | None
    tokenizer: PreTrainedTokenizerBase
    objective: Objective
    train_batches: Iterator[dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    max_steps: int
    micro_batches: int
    network: torch.nn.Module  # model + value head, wrapped in DDP when distributed
    distributed: DistributedContext = SINGLE_PROCESS
    steps_done: int = 0
    tokens_seen: int = 0

    @classmethod
    def build(
        cls,
        cfg: DictConfig,
        placement: Placement,
        distributed: DistributedContext = SINGLE_PROCESS,
    ) -> Training:
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

        # The objective's document filter (filtering) and token transform (conditional).
        keep = document_filter(cfg.objective)

        def train_documents() -> Iterator[Document]:
            documents = iter_documents(cfg.task.name, cfg.task.dataset, cfg.task.train_split)
            return keep(documents) if keep else documents

        blocks = training_blocks(
            train_documents,
            tokenizer,
            train.block_size,
            train.shuffle_buffer,
            cfg.seed,
            token_transform(cfg.objective, tokenizer, cfg.seed),
        )
        max_steps = step_budget(train)
        modules = [model] + ([value_head] if value_head is not None else [])
        optimizer = torch.optim.AdamW(
            [group for m in modules for group in optimizer_groups(m, train.weight_decay)],
            lr=train.lr,
            betas=tuple(train.adam_betas),
            fused=placement.device.type == "cuda",
        )
        scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=round(train.warmup_ratio * max_steps),
            num_training_steps=max_steps,
        )
        network = Network(model, value_head)
        if distributed.enabled:
            device_ids = [placement.device.index] if placement.device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=device_ids)
        per_process_batch = train.batch_size // distributed.world_size
        return cls(
            network=network,
            distributed=distributed,
            cfg=cfg,
            placement=placement,
            model=model,
            value_head=value_head,
            tokenizer=tokenizer,
            objective=objective,
            train_batches=batches(blocks, train.batch_size),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=placement.grad_scaler(),
            max_steps=max_steps,
            micro_batches=math.ceil(per_process_batch / cfg.hardware.micro_batch_size),
        )

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.model] + ([self.value_head] if self.value_head is not None else [])

    def train(self) -> None:
        for module in self.modules:
            module.train()

    def step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step; returns the batch loss, the objective's metrics, the grad norm."""
        batch = next(self.train_batches)
        device = self.placement.device
        # Every process draws the same global batch and trains on its own slice of it.
        world, rank = self.distributed.world_size, self.distributed.rank
        input_ids = batch["input_ids"].tensor_split(world)[rank].to(device, non_blocking=True)
        token_scores = batch["token_scores"].tensor_split(world)[rank].to(device)
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
                f"{self.tokens_seen}); lower train.lr or raise train.warmup_ratio"
            )
        self.scaler.unscale_(self.optimizer)
        parameters = list(self.network.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.cfg.train.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.tokens_seen += batch["input_ids"].numel()  # the global batch
        return loss, metrics, grad_norm

    def training_state(self) -> dict:
        return {
            "step": self.steps_done,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, value head, optimizer, scheduler, loss scaler,
        step, data position and RNG states, so that the run goes on exactly as if it had never
        stopped."""
        state = load_training_state(directory)
        weights = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        self.model.load_state_dict(weights)
        if self.value_head is not None:
            self.value_head.load_state_dict(
                torch.load(directory / VALUE_HEAD_FILE, map_location=self.placement.device)
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # The data stream is deterministic (seeded shuffles): replaying the batches already
        # trained on puts it where it was. Costs tokenization only, no forward passes.
        for _ in range(state["step"]):
            next(self.train_batches)
        self.steps_done, self.tokens_seen = state["step"], state["tokens_seen"]
        restore_rng_states(state["rng"])

    def save(self, directory: Path) -> None:
        """The model (``from_pretrained``-loadable), tokenizer, config and value head."""
        save_pretrained(directory, self.model, self.tokenizer, self.cfg)
        if self.value_head is not None:
            save_value_head(self.value_head, directory)


def run_pretrain(cfg: DictConfig, tracker: Tracker, output_dir: Path) -> float:
    train = cfg.train
    distributed = init_distributed()
    placement = resolve_placement(cfg.hardware, distributed.local_rank)
    training = Training.build(cfg, placement, distributed)
    # Only the main process evaluates, logs and writes checkpoints.
    main = distributed.is_main
    evaluator = (
        build_evaluator(
            cfg,
            training.tokenizer,
            placement,
            load_kl_reference(cfg, training.tokenizer, placement),
        )
        if main
        else None
    )
    model = training.model
    log.info(
        "model: %.2fM parameters on %s (%s)%s; %d steps x %d sequences x %d tokens "
        "(%d micro-batches of <= %d per step%s)",
        sum(p.numel() for p in model.parameters()) / 1e6,
        placement.device,
        placement.precision,
        ", with a value head" if training.value_head is not None else "",
        training.max_steps,
        train.batch_size,
        train.block_size,
        training.micro_batches,
        cfg.hardware.micro_batch_size,
        f", in each of {distributed.world_size} processes" if distributed.enabled else "",
    )
    last_metrics: dict[str, float] = {"score": float("nan")}

    def run_eval(step: int) -> None:
        nonlocal last_metrics
        if evaluator is None:
            return
        last_metrics, tables = evaluator.evaluate(model)
        tracker.log_metrics(last_metrics, training.tokens_seen)
        for name, table in tables.items():
            folder = "samples" if name == "unconditional" else f"samples/{name}"
            tracker.log_table(table, f"{folder}/step_{step:06d}.json")
        log.info(
            "eval step %d: score %.4f, score_max@25 %.4f, eval/lm_loss %.4f%s",
            step,
            last_metrics["score"],
            last_metrics["score_max_at_25"],
            last_metrics.get("eval/lm_loss", float("nan")),
            f", kl {last_metrics['kl']:.3f}" if "kl" in last_metrics else "",
        )

    def checkpoint(step: int) -> None:
        if main:
            save_checkpoint(
                output_dir,
                step,
                training.save,
                training.training_state(),
                train.save_total_limit,
                info={"mlflow_run_id": tracker.run_id},
            )
        barrier(distributed)  # no process runs ahead of a checkpoint it may resume from

    # Rank 0 decides: every process resumes from the checkpoint it wrote.
    resume_from = latest_checkpoint(output_dir) if train.resume and main else None
    resume_from = broadcast_object(resume_from, distributed)
    if resume_from is not None:
        training.restore(resume_from)
        log.info("resumed from %s (step %d)", resume_from, training.steps_done)
    else:
        run_eval(step=0)
    training.train()
    # Train time only: evaluation and checkpointing are left out of tokens/s.
    window_seconds, window_tokens = 0.0, 0
    window_metrics: dict[str, torch.Tensor] = {}
    with PreemptionGuard() as guard:
        # Redraw at most every 30 s when stderr is a log file rather than a terminal.
        interactive = sys.stderr.isatty()
        progress = tqdm(
            range(training.steps_done + 1, training.max_steps + 1),
            initial=training.steps_done,
            total=training.max_steps,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if interactive else 30.0,
        )
        for step in progress:
            step_start = time.perf_counter()
            tokens_before = training.tokens_seen
            try:
                step_loss, metrics, grad_norm = training.step()
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error}. Checkpoints written so far are kept in {output_dir / 'checkpoints'}"
                ) from None
            for name, value in metrics.items():
                window_metrics[name] = window_metrics.get(name, 0.0) + value
            window_tokens += training.tokens_seen - tokens_before
            window_seconds += time.perf_counter() - step_start

            if step % train.log_steps == 0 or step == training.max_steps:
                steps_in_window = (step - 1) % train.log_steps + 1
                logged = {name: float(v) / steps_in_window for name, v in window_metrics.items()}
                logged |= {
                    "train/loss": step_loss.item(),
                    "train/lr": training.scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/tokens_per_s": window_tokens / window_seconds,
                }
                tracker.log_metrics(logged, training.tokens_seen)
                progress.set_postfix(
                    loss=f"{logged['train/loss']:.3f}",
                    tok_s=f"{logged['train/tokens_per_s']:.0f}",
                    refresh=False,  # redraw on tqdm's own schedule (mininterval)
                )
                window_seconds, window_tokens, window_metrics = 0.0, 0, {}
            if step % train.eval_steps == 0 or step == training.max_steps:
                run_eval(step)
            preempted = any_process(guard.requested, distributed)
            if step % train.save_steps == 0 or step == training.max_steps or preempted:
                checkpoint(step)
            if preempted:
                progress.close()
                tracker.mark_preempted(step)
                guard.hand_over()  # requeue and exit (submitit), or raise Preempted
    progress.close()

    if main:
        final_dir = publish_model(training.save, output_dir, cfg, tracker)
        log.info("final model saved to %s", final_dir)
    return last_metrics["score"]
