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
    """``score``, ``score_max_at_25``, ``num_hits`` and ``num_unscored`` of one set of samples.

    score_max_at_25 is the mean, over consecutive groups of 25 samples, of each group's maximum:
    the expected worst of 25 samples. It needs a multiple of 25 samples. A sample the scorer
    could not score (NaN) is left out of the means and maxima and counted in num_unscored.
    """
    if len(scores) == 0 or len(scores) % GROUP_SIZE:
        raise ValueError(
            f"{len(scores)} samples: eval.generation.num_samples must be a positive multiple of "
            f"{GROUP_SIZE} for score_max@25"
        )
    values = np.asarray(scores, dtype=np.float64)
    scored = np.isfinite(values)
    if not scored.any():
        raise ValueError(f"the scorer could not score any of the {len(values)} samples")
    groups = np.where(scored, values, -np.inf).reshape(-1, GROUP_SIZE).max(axis=1)
    return {
        "score": float(values[scored].mean()),
        "score_max_at_25": float(groups[np.isfinite(groups)].mean()),
        "num_hits": float((values[scored] > hit_threshold).sum()),
        "num_unscored": float((~scored).sum()),
    }


def left_padded_prompts(
    prompts: list[str], tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """EOS + prompt tokens for each prompt, left-padded so every row ends at the same position
    (generation appends on the right); returns input ids and attention mask."""
    eos = tokenizer.eos_token_id
    rows = [[eos, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: DictConfig,
    placement: Placement,
    seed: int,
) -> Samples:
    """One sample per prompt; an empty prompt is an unconditional sample. Every sample starts
    from EOS, as a new document would, and stops at EOS or after ``cfg.max_new_tokens``.

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
        for first in range(0, len(prompts), cfg.batch_size):
            batch = prompts[first : first + cfg.batch_size]
            input_ids, attention_mask = left_padded_prompts(batch, tokenizer, placement.device)
            with placement.autocast():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=0,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            for row in output[:, input_ids.size(1) :].tolist():
                generated = row[: row.index(eos)] if eos in row else row
                lengths.append(len(generated))
                completions.append(tokenizer.decode(generated, skip_special_tokens=True))
    model.train(was_training)
    return Samples(
        prompts=list(prompts),
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


def evaluate_scenario(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Scorer,
    prompts: list[str],
    score_prompt: bool,
    cfg: DictConfig,
    placement: Placement,
) -> tuple[dict[str, float], dict[str, list]]:
    """Sample once per prompt, score, and return metrics and the samples table."""
    samples = generate_samples(model, tokenizer, prompts, cfg.eval.generation, placement, cfg.seed)
    texts = (
        [p + c for p, c in zip(samples.prompts, samples.completions, strict=True)]
        if score_prompt
        else samples.completions
    )
    scores = scorer.score_texts(texts)
    metrics = score_metrics(scores, cfg.task.hit_threshold)
    generated_tokens = sum(samples.lengths)
    metrics |= {
        "samples/mean_length": generated_tokens / len(samples.lengths),
        "samples/per_s": len(samples.lengths) / samples.seconds,
        "samples/tokens_per_s": generated_tokens / samples.seconds,
    }
    rows = cfg.eval.samples_table_rows
    table = {
        "prompt": samples.prompts[:rows],
        "completion": samples.completions[:rows],
        "score": [round(s, 6) for s in scores[:rows]],
    }
    return metrics, table


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Scorer,
    scenario_prompts: dict[str, list[str]],
    heldout_blocks: list[Block],
    cfg: DictConfig,
    placement: Placement,
) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """All evaluation metrics of the current model, and one samples table per scenario.

    The ``unconditional`` scenario's metrics are unprefixed (``score``); any other scenario's
    are prefixed with its name (``functions/score``).
    """
    metrics: dict[str, float] = {}
    tables: dict[str, dict[str, list]] = {}
    for name, prompts in scenario_prompts.items():
        scenario_metrics, tables[name] = evaluate_scenario(
            model,
            tokenizer,
            scorer,
            prompts,
            cfg.task.scenarios[name].score_prompt,
            cfg,
            placement,
        )
        prefix = "" if name == "unconditional" else f"{name}/"
        metrics |= {prefix + key: value for key, value in scenario_metrics.items()}
    if heldout_blocks:
        loss = heldout_lm_loss(model, heldout_blocks, cfg.eval.batch_size, placement)
        metrics |= {"eval/lm_loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    return metrics, tables
