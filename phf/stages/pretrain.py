"""The pretraining stage: train a causal LM on scored documents with a PHF objective.

Read top to bottom: placement, tokenizer and model, data, step budget, optimizer and schedule,
then the loop (evaluate at start, every ``train.eval_steps`` and at the end; checkpoint every
``train.save_steps`` and at the end), then the final model as an MLflow artifact.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_scheduler

from phf.checkpoints import save_checkpoint, save_pretrained
from phf.data.corpus import iter_documents
from phf.data.packing import batches, pack_blocks, training_blocks
from phf.data.prompts import scenario_prompts
from phf.evaluation import evaluate
from phf.hardware import Placement, resolve_placement
from phf.models import build_model, build_tokenizer
from phf.objectives import Objective, build_objective
from phf.scorers import build_scorer
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
    model: torch.nn.Module,
    objective: Objective,
    input_ids: torch.Tensor,
    token_scores: torch.Tensor,
    micro_batches: int,
    placement: Placement,
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward one batch in ``micro_batches`` pieces; returns the batch-mean loss
    and metrics (detached tensors: no CPU-GPU sync here)."""
    step_loss = torch.zeros((), device=input_ids.device)
    step_metrics: dict[str, torch.Tensor] = {}
    for ids, scores in zip(
        input_ids.tensor_split(micro_batches),
        token_scores.tensor_split(micro_batches),
        strict=True,
    ):
        if ids.numel() == 0:
            continue
        with placement.autocast():
            logits = model(input_ids=ids).logits
        loss, metrics = objective.loss(logits, ids, scores)
        # Weigh each micro-batch by its share of the batch so the sum is the batch mean.
        share = ids.size(0) / input_ids.size(0)
        scaler.scale(loss * share).backward()
        step_loss += loss.detach() * share
        for name, value in metrics.items():
            step_metrics[name] = step_metrics.get(name, 0.0) + value * share
    return step_loss, step_metrics


def run_pretrain(cfg: DictConfig, tracker: Tracker, output_dir: Path) -> float:
    train = cfg.train
    placement = resolve_placement(cfg.hardware)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, train.block_size).to(placement.device)
    objective = build_objective(cfg.objective)
    scorer = build_scorer(cfg.scorer)
    log.info(
        "model: %.2fM parameters on %s (%s)",
        sum(p.numel() for p in model.parameters()) / 1e6,
        placement.device,
        placement.precision,
    )

    def train_documents():
        return iter_documents(cfg.task.name, cfg.task.dataset, cfg.task.train_split)

    blocks = training_blocks(
        train_documents, tokenizer, train.block_size, train.shuffle_buffer, cfg.seed
    )
    train_batches = batches(blocks, train.batch_size)
    test_documents = iter_documents(cfg.task.name, cfg.task.dataset, cfg.task.test_split)
    prompts = {
        name: scenario_prompts(scenario, cfg.task, cfg.eval.generation.num_samples)
        for name, scenario in cfg.task.scenarios.items()
    }
    heldout = list(
        islice(pack_blocks(test_documents, tokenizer, train.block_size), cfg.eval.max_blocks)
    )

    max_steps = step_budget(train)
    micro_batches = math.ceil(train.batch_size / cfg.hardware.micro_batch_size)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, train.weight_decay),
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
    scaler = placement.grad_scaler()
    log.info(
        "training %d steps x %d sequences x %d tokens (%d micro-batches of <= %d per step)",
        max_steps,
        train.batch_size,
        train.block_size,
        micro_batches,
        cfg.hardware.micro_batch_size,
    )

    tokens_seen = 0
    last_metrics: dict[str, float] = {}

    def run_eval(step: int) -> None:
        nonlocal last_metrics
        last_metrics, tables = evaluate(model, tokenizer, scorer, prompts, heldout, cfg, placement)
        tracker.log_metrics(last_metrics, tokens_seen)
        for name, table in tables.items():
            folder = "samples" if name == "unconditional" else f"samples/{name}"
            tracker.log_table(table, f"{folder}/step_{step:06d}.json")
        log.info(
            "eval step %d: score %.4f, score_max@25 %.4f, eval/lm_loss %.4f",
            step,
            last_metrics["score"],
            last_metrics["score_max_at_25"],
            last_metrics.get("eval/lm_loss", float("nan")),
        )

    def checkpoint(step: int) -> None:
        save_checkpoint(
            output_dir,
            step,
            model,
            tokenizer,
            cfg,
            {
                "step": step,
                "tokens_seen": tokens_seen,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
            },
            keep=train.save_total_limit,
        )

    run_eval(step=0)
    model.train()
    # Train time only: evaluation and checkpointing are left out of tokens/s.
    window_seconds, window_tokens = 0.0, 0
    window_metrics: dict[str, torch.Tensor] = {}
    # Redraw at most every 30 s when stderr is a log file rather than a terminal.
    interactive = sys.stderr.isatty()
    progress = tqdm(
        range(1, max_steps + 1),
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
    )
    for step in progress:
        step_start = time.perf_counter()
        batch = next(train_batches)
        input_ids = batch["input_ids"].to(placement.device, non_blocking=True)
        token_scores = batch["token_scores"].to(placement.device, non_blocking=True)
        step_loss, metrics = accumulate_gradients(
            model, objective, input_ids, token_scores, micro_batches, placement, scaler
        )
        for name, value in metrics.items():
            window_metrics[name] = window_metrics.get(name, 0.0) + value
        # One CPU-GPU sync per step: a NaN must stop the run before it reaches the weights.
        if not torch.isfinite(step_loss).item():
            raise NonFiniteLossError(
                f"the training loss is {step_loss.item()} at step {step} (tokens seen "
                f"{tokens_seen}); lower train.lr or raise train.warmup_ratio. Checkpoints "
                f"written so far are kept in {output_dir / 'checkpoints'}"
            )
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += input_ids.numel()
        window_tokens += input_ids.numel()
        window_seconds += time.perf_counter() - step_start

        if step % train.log_steps == 0 or step == max_steps:
            steps_in_window = (step - 1) % train.log_steps + 1
            logged = {name: float(v) / steps_in_window for name, v in window_metrics.items()}
            logged |= {
                "train/loss": step_loss.item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_s": window_tokens / window_seconds,
            }
            tracker.log_metrics(logged, tokens_seen)
            progress.set_postfix(
                loss=f"{logged['train/loss']:.3f}",
                tok_s=f"{logged['train/tokens_per_s']:.0f}",
                refresh=False,  # redraw on tqdm's own schedule (mininterval)
            )
            window_seconds, window_tokens, window_metrics = 0.0, 0, {}
        if step % train.eval_steps == 0 or step == max_steps:
            run_eval(step)
        if step % train.save_steps == 0 or step == max_steps:
            checkpoint(step)
    progress.close()

    final_dir = output_dir / "model"
    save_pretrained(final_dir, model, tokenizer, cfg)
    if cfg.tracking.log_model:
        tracker.log_artifacts(final_dir, "model")
    log.info("final model saved to %s", final_dir)
    return last_metrics["score"]
