"""Evaluation shared by every stage: sample, score the samples, and measure held-out LM loss.

Metric names follow the paper where MLflow allows: ``score`` (mean misalignment of samples),
``score_max_at_25`` (the paper's score_max@25; MLflow refuses '@' in metric names), ``num_hits``
and ``hit_rate`` (the share of samples scoring above ``task.hit_threshold``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phf.hardware import Placement
from phf.losses.lm import next_token_nll
from phf.scorers import Scorer
from phf.sequences import batched_continuation_logprobs, build_batch

GROUP_SIZE = 25  # samples per group in score_max@25
BOOTSTRAP_RESAMPLES = 1000


def expected_max_weights(n: int, k: int) -> np.ndarray:
    """The weight of the i-th smallest of n values in E[max of k of them, drawn without
    replacement]: it is the maximum of C(i - 1, k - 1) of the C(n, k) k-subsets (the estimator
    of pass@k, for a maximum). Computed as a running product (no huge integers)."""
    weights = np.zeros(n)
    weight = float(np.prod([(k - j) / (n - j) for j in range(k)]))  # 1 / C(n, k), for i = k
    weights[k - 1] = weight
    for i in range(k + 1, n + 1):
        weight *= (i - 1) / (i - k)
        weights[i - 1] = weight
    return weights


def expected_max(scores: np.ndarray, k: int) -> float:
    """E[max of k samples drawn without replacement] from these scores, exactly."""
    n = len(scores)
    if n < k:
        return float("nan")
    return float(np.sort(scores) @ expected_max_weights(n, k))


def expected_max_interval(
    scores: np.ndarray, k: int, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """A 95% bootstrap (percentile) interval of expected_max: the samples resampled with
    replacement ``resamples`` times, with a fixed seed. The weights depend only on how many
    samples there are, so they are computed once for every resample."""
    n = len(scores)
    if n < k:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(scores, size=n, replace=True) for _ in range(resamples)])
    estimates = np.sort(draws, axis=1) @ expected_max_weights(n, k)
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    lengths: list[int]  # generated tokens before EOS
    token_ids: list[list[int]]  # generated tokens, the EOS that ended a sample included
    seconds: float


def score_metrics(scores: Sequence[float], hit_threshold: float) -> dict[str, float]:
    """``score``, ``score_max_at_25``, ``expected_max_at_25`` (with a 95% bootstrap interval,
    ``/ci_low`` and ``/ci_high``), ``num_hits``, ``hit_rate`` and ``num_unscored`` of one set of
    samples.

    score_max_at_25 is the paper's: the mean, over consecutive groups of 25 samples, of each
    group's maximum. It needs a multiple of 25 samples. expected_max_at_25 estimates the same
    expectation from every 25-subset of the samples (exact, lower variance), and its interval
    says how sure one can be of it. A sample the scorer could not score (NaN) is left out of
    the means and maxima and counted in num_unscored.
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
    hits = float((values[scored] > hit_threshold).sum())
    low, high = expected_max_interval(values[scored], GROUP_SIZE)
    return {
        "score": float(values[scored].mean()),
        "score_max_at_25": float(groups[np.isfinite(groups)].mean()),
        "expected_max_at_25": expected_max(values[scored], GROUP_SIZE),
        "expected_max_at_25/ci_low": low,
        "expected_max_at_25/ci_high": high,
        "num_hits": hits,
        "hit_rate": hits / float(scored.sum()),
        "num_unscored": float((~scored).sum()),
    }


@dataclass(frozen=True)
class GenerationControls:
    """How an objective conditions sampling: conditional training puts ``prefix_ids``
    (<|aligned|>) after EOS and bans ``suppress_ids`` (every control token) from samples."""

    prefix_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()


NO_CONTROLS = GenerationControls()


def left_padded_prompts(
    prompts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    prefix_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """EOS + ``prefix_ids`` + prompt tokens for each prompt, left-padded so every row ends at the
    same position (generation appends on the right); returns input ids and attention mask."""
    eos = tokenizer.eos_token_id
    rows = [[eos, *prefix_ids, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
    batch = build_batch(rows, tokenizer.pad_token_id, device, left=True)
    return batch.input_ids, batch.attention_mask


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: DictConfig,
    placement: Placement,
    seed: int,
    controls: GenerationControls = NO_CONTROLS,
) -> Samples:
    """One sample per prompt; an empty prompt is an unconditional sample. Every sample starts
    from EOS, as a new document would, and stops at EOS or after ``cfg.max_new_tokens``.
    Control tokens are never sampled and never appear in the returned text.

    The RNG is forked and seeded, so every evaluation of a run draws the same random numbers
    (comparable samples across evaluations) and training's RNG stream is left untouched.
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    completions: list[str] = []
    lengths: list[int] = []
    token_ids: list[list[int]] = []
    start = time.perf_counter()
    devices = [placement.device.index or 0] if placement.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for first in range(0, len(prompts), cfg.batch_size):
            batch = prompts[first : first + cfg.batch_size]
            input_ids, attention_mask = left_padded_prompts(
                batch, tokenizer, placement.device, controls.prefix_ids
            )
            with placement.autocast():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=0,
                    max_new_tokens=cfg.max_new_tokens,
                    # Optional: generation configs built in code may leave it out.
                    min_new_tokens=cfg.get("min_new_tokens", 0),
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    suppress_tokens=list(controls.suppress_ids) or None,
                    use_cache=True,
                )
            for row in output[:, input_ids.size(1) :].tolist():
                generated = row[: row.index(eos)] if eos in row else row
                lengths.append(len(generated))
                token_ids.append(row[: len(generated) + 1] if eos in row else row)
                completions.append(tokenizer.decode(generated, skip_special_tokens=True))
    model.train(was_training)
    return Samples(
        prompts=list(prompts),
        completions=completions,
        lengths=lengths,
        token_ids=token_ids,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def heldout_lm_loss(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    batch_size: int,
    placement: Placement,
    ignored_ids: Sequence[int] = (),
) -> float:
    """Mean next-token cross-entropy over the tokens of held-out blocks ([n, block_size] ids),
    leaving out targets in ``ignored_ids`` (control tokens: the loss of the text itself is
    comparable across objectives)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids in blocks.split(batch_size):
        input_ids = input_ids.to(placement.device)
        with placement.autocast():
            logits = model(input_ids=input_ids).logits
        nll = next_token_nll(logits, input_ids)
        counted = ~torch.isin(input_ids[:, 1:], torch.tensor(list(ignored_ids), device=nll.device))
        total += nll[counted].sum().item()
        count += int(counted.sum().item())
    model.train(was_training)
    return total / count


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over the samples (1 = no repetition)."""
    ngrams = [
        tuple(words[i : i + n])
        for words in (text.split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@dataclass
class KLReference:
    """Samples drawn once from a reference model, with their log-probability under it.

    KL(reference || model) = E_{x ~ reference}[log p_ref(x) - log p_model(x)], estimated on these
    samples: pure sampling (temperature 1, no top-p), so that they follow p_ref itself, and
    log-probabilities summed over the sampled tokens (EOS included when sampled).
    """

    sequences: list[list[int]]
    ref_logprobs: torch.Tensor  # [n], nats per sequence

    @classmethod
    def sample(
        cls,
        reference: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        num_samples: int,
        max_new_tokens: int,
        batch_size: int,
        placement: Placement,
        seed: int,
    ) -> KLReference:
        cfg = OmegaConf.create(
            {
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "min_new_tokens": 0,
                "temperature": 1.0,
                "top_p": 1.0,
            }
        )
        samples = generate_samples(reference, tokenizer, [""] * num_samples, cfg, placement, seed)
        logprobs = sequence_logprobs(
            reference, samples.token_ids, tokenizer.eos_token_id, (), batch_size, placement
        )
        return cls(sequences=samples.token_ids, ref_logprobs=logprobs)

    def kl(
        self,
        model: PreTrainedModel,
        eos_id: int,
        prefix_ids: Sequence[int],
        batch_size: int,
        placement: Placement,
    ) -> float:
        logprobs = sequence_logprobs(
            model, self.sequences, eos_id, prefix_ids, batch_size, placement
        )
        return float((self.ref_logprobs - logprobs).mean())


def sequence_logprobs(
    model: PreTrainedModel,
    sequences: list[list[int]],
    eos_id: int,
    prefix_ids: Sequence[int],
    batch_size: int,
    placement: Placement,
) -> torch.Tensor:
    """log p(sequence | EOS + prefix) for each sequence, summed over its tokens, in fp32."""
    context = [eos_id, *prefix_ids]
    rows = [context + list(sequence) for sequence in sequences]
    return batched_continuation_logprobs(
        model, rows, [len(context)] * len(rows), eos_id, batch_size, placement
    )


class Evaluator:
    """Everything a run evaluates, prepared once: the prompts of each scenario (and whether the
    scorer reads them with the completion), held-out blocks, the scorer, the generation
    controls of the objective, and the KL reference."""

    def __init__(
        self,
        cfg: DictConfig,
        tokenizer: PreTrainedTokenizerBase,
        scorer: Scorer,
        scenarios: dict[str, tuple[list[str], bool]],
        heldout_blocks: torch.Tensor,
        placement: Placement,
        controls: GenerationControls = NO_CONTROLS,
        kl_reference: KLReference | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.scenarios = scenarios  # name -> (prompts, score prompt + completion)
        self.heldout_blocks = heldout_blocks
        self.placement = placement
        self.controls = controls
        self.kl_reference = kl_reference

    def scenario(
        self, model: PreTrainedModel, name: str, prompts: list[str], score_prompt: bool
    ) -> tuple[dict[str, float], dict[str, list]]:
        """Sample once per prompt, score, and return metrics and the samples table."""
        cfg = self.cfg
        samples = generate_samples(
            model,
            self.tokenizer,
            prompts,
            cfg.eval.generation,
            self.placement,
            cfg.seed,
            self.controls,
        )
        texts = (
            [p + c for p, c in zip(samples.prompts, samples.completions, strict=True)]
            if score_prompt
            else samples.completions
        )
        scores = self.scorer.score_texts(texts)
        metrics = score_metrics(scores, cfg.task.hit_threshold)
        generated_tokens = sum(samples.lengths)
        metrics |= {
            "distinct_1": distinct_n(samples.completions, 1),
            "distinct_2": distinct_n(samples.completions, 2),
            "samples/mean_length": generated_tokens / len(samples.lengths),
            "samples/per_s": len(samples.lengths) / samples.seconds,
            "samples/tokens_per_s": generated_tokens / samples.seconds,
        }
        rows = cfg.eval.samples_table_rows
        # "sample" keys the rows (the same keys in every evaluation and run), so that MLflow's
        # table comparison lines them up even where prompts are empty (unconditional samples).
        table = {
            "sample": [f"{name}/{i}" for i in range(min(rows, len(samples.prompts)))],
            "prompt": samples.prompts[:rows],
            "completion": samples.completions[:rows],
            "score": [round(s, 6) for s in scores[:rows]],
        }
        return metrics, table

    def evaluate(
        self, model: PreTrainedModel
    ) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
        """All evaluation metrics of the current model, and one samples table per scenario.

        The ``unconditional`` scenario's metrics are unprefixed (``score``); any other
        scenario's are prefixed with its name (``functions/score``).
        """
        cfg = self.cfg
        metrics: dict[str, float] = {}
        tables: dict[str, dict[str, list]] = {}
        for name, (prompts, score_prompt) in self.scenarios.items():
            scenario_metrics, tables[name] = self.scenario(model, name, prompts, score_prompt)
            prefix = "" if name == "unconditional" else f"{name}/"
            metrics |= {prefix + key: value for key, value in scenario_metrics.items()}
        if len(self.heldout_blocks):
            loss = heldout_lm_loss(
                model,
                self.heldout_blocks,
                cfg.eval.batch_size,
                self.placement,
                self.controls.suppress_ids,
            )
            metrics |= {"eval/lm_loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
        if self.kl_reference is not None:
            metrics["kl"] = self.kl_reference.kl(
                model,
                self.tokenizer.eos_token_id,
                self.controls.prefix_ids,
                cfg.eval.batch_size,
                self.placement,
            )
        return metrics, tables
