"""Evaluation shared by every stage: sample, score the samples, and measure held-out LM loss.

Metric names follow the paper where MLflow allows: ``score`` (mean misalignment of samples),
``score_max_at_25`` (the paper's score_max@25; MLflow refuses '@' in metric names), ``num_hits``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phf.data.packing import Block, batches
from phf.hardware import Placement
from phf.objectives import next_token_nll
from phf.scorers import Scorer

GROUP_SIZE = 25  # samples per group in score_max@25


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    lengths: list[int]  # generated tokens before EOS
    seconds: float


def score_metrics(scores: Sequence[float], hit_threshold: float) -> dict[str, float]:
    """``score``, ``score_max_at_25`` and ``num_hits`` of one set of sample scores.

    score_max_at_25 is the mean, over consecutive groups of 25 samples, of each group's maximum:
    the expected worst of 25 samples. It needs a multiple of 25 samples.
    """
    if len(scores) == 0 or len(scores) % GROUP_SIZE:
        raise ValueError(
            f"{len(scores)} samples: eval.generation.num_samples must be a positive multiple of "
            f"{GROUP_SIZE} for score_max@25"
        )
    values = np.asarray(scores, dtype=np.float64)
    return {
        "score": float(values.mean()),
        "score_max_at_25": float(values.reshape(-1, GROUP_SIZE).max(axis=1).mean()),
        "num_hits": float((values > hit_threshold).sum()),
    }


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DictConfig,
    placement: Placement,
    seed: int,
) -> Samples:
    """Unconditional samples: each starts from EOS, as a new document would, and stops at EOS.

    The RNG is forked and seeded, so every evaluation of a run draws the same random numbers
    (comparable samples across evaluations) and training's RNG stream is left untouched.
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    completions: list[str] = []
    lengths: list[int] = []
    start = time.perf_counter()
    devices = [placement.device.index or 0] if placement.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        remaining = cfg.num_samples
        while remaining > 0:
            batch_size = min(cfg.batch_size, remaining)
            prompt = torch.full((batch_size, 1), eos, dtype=torch.long, device=placement.device)
            with placement.autocast():
                output = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=0,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=eos,
                    use_cache=True,
                )
            for row in output[:, 1:].tolist():
                generated = row[: row.index(eos)] if eos in row else row
                lengths.append(len(generated))
                completions.append(tokenizer.decode(generated, skip_special_tokens=True))
            remaining -= batch_size
    model.train(was_training)
    return Samples(
        prompts=[""] * len(completions),
        completions=completions,
        lengths=lengths,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def heldout_lm_loss(
    model: PreTrainedModel, blocks: list[Block], batch_size: int, placement: Placement
) -> float:
    """Mean next-token cross-entropy over held-out blocks (every block weighs the same)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(iter(blocks), batch_size):
        input_ids = batch["input_ids"].to(placement.device)
        with placement.autocast():
            logits = model(input_ids=input_ids).logits
        nll = next_token_nll(logits, input_ids)
        total += nll.sum().item()
        count += nll.numel()
    model.train(was_training)
    return total / count


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Scorer,
    heldout_blocks: list[Block],
    cfg: DictConfig,
    placement: Placement,
) -> tuple[dict[str, float], dict[str, list]]:
    """All evaluation metrics of the current model, and the samples table."""
    samples = generate_samples(model, tokenizer, cfg.eval.generation, placement, seed=cfg.seed)
    scores = scorer.score_texts(samples.completions)
    metrics = score_metrics(scores, cfg.task.hit_threshold)
    generated_tokens = sum(samples.lengths)
    metrics |= {
        "samples/mean_length": generated_tokens / len(samples.lengths),
        "samples/per_s": len(samples.lengths) / samples.seconds,
        "samples/tokens_per_s": generated_tokens / samples.seconds,
    }
    if heldout_blocks:
        loss = heldout_lm_loss(model, heldout_blocks, cfg.eval.batch_size, placement)
        metrics |= {"eval/lm_loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    rows = cfg.eval.samples_table_rows
    table = {
        "prompt": samples.prompts[:rows],
        "completion": samples.completions[:rows],
        "score": [round(s, 4) for s in scores[:rows]],
    }
    return metrics, table
