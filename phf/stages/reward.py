"""The reward-model stage (objective=reward): learn which response to a prompt is preferred.

Read top to bottom: placement, the trunk (model.pretrained, e.g. runs:/<id>/model of a
pretraining run, or a random tiny GPT-2) with a scalar head, the comparisons of both splits,
the step budget, then the loop (evaluate at start, every ``train.eval_steps`` and at the end),
then reward normalisation on policy samples, and the model as an MLflow artifact ``model``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, get_scheduler

from phf.data.preferences import Comparison, load_comparisons
from phf.evaluation import generate_samples
from phf.hardware import Placement, resolve_placement
from phf.models import load_model_and_tokenizer, resolve_source
from phf.reward_model import (
    EncodedComparison,
    RewardModel,
    comparison_rewards,
    encode_comparisons,
    preference_loss,
    preference_metrics,
    score_texts,
)
from phf.stages.common import publish_model
from phf.stages.pretrain import optimizer_groups
from phf.tracking import Tracker

log = logging.getLogger(__name__)


def _value(option: object) -> str:
    return str(getattr(option, "value", option))


def batch_tensors(
    batch: Sequence[EncodedComparison], margin: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    best = torch.tensor([c.best for c in batch], device=device)
    margins = torch.tensor([margin + c.margin for c in batch], device=device)
    return best, margins


@torch.no_grad()
def evaluate(
    model: RewardModel,
    comparisons: Sequence[EncodedComparison],
    cfg: DictConfig,
    pad_id: int,
    placement: Placement,
) -> dict[str, float]:
    """eval/loss, eval/accuracy, eval/margin, eval/reward_mean, eval/reward_std over the test
    comparisons (raw rewards: normalisation comes after training)."""
    model.eval()
    all_rewards, all_valid, all_best, losses = [], [], [], []
    width = max(len(c.sequences) for c in comparisons)  # best-of-N rows may differ in N
    for first in range(0, len(comparisons), cfg.eval.batch_size):
        batch = comparisons[first : first + cfg.eval.batch_size]
        rewards, valid = comparison_rewards(model, batch, pad_id, placement)
        best, margins = batch_tensors(batch, cfg.reward.margin, rewards.device)
        loss = preference_loss(rewards, valid, best, margins, cfg.reward.center_rewards_coef)
        losses.append(float(loss) * len(batch))
        pad = width - rewards.size(1)
        all_rewards.append(torch.nn.functional.pad(rewards, (0, pad)))
        all_valid.append(torch.nn.functional.pad(valid, (0, pad)))
        all_best.append(best)
    model.train()
    metrics = preference_metrics(torch.cat(all_rewards), torch.cat(all_valid), torch.cat(all_best))
    return {"eval/loss": sum(losses) / len(comparisons)} | {
        f"eval/{name}": float(value) for name, value in metrics.items()
    }


def normalization_texts(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    test: Sequence[Comparison],
    train: Sequence[Comparison],
    placement: Placement,
) -> tuple[list[str], list[str], str]:
    """(prompts, responses, what they are) to normalise rewards on: samples of the policy
    (reward.normalization_policy, else model.pretrained) continuing the test prompts, as in
    lm-human-preferences; with no policy, the train split's responses."""
    policy = cfg.reward.normalization_policy or cfg.model.pretrained
    n = cfg.reward.normalization_samples
    if policy is None:
        log.warning(
            "no policy to normalise rewards on (model.pretrained and "
            "reward.normalization_policy are null): using %d train responses instead",
            n,
        )
        pairs = [(c.prompt, r) for c in train for r in c.responses][:n]
        return [p for p, _ in pairs], [r for _, r in pairs], "train responses"
    lm = AutoModelForCausalLM.from_pretrained(resolve_source(policy)).to(placement.device)
    prompts = [test[i % len(test)].prompt for i in range(n)]
    # Long prompts are cut to their last 64 tokens' worth of text: samples only need context.
    prompts = [tokenizer.decode(tokenizer.encode(p)[-64:]) for p in prompts]
    samples = generate_samples(lm, tokenizer, prompts, cfg.eval.generation, placement, cfg.seed)
    return prompts, samples.completions, f"samples of {policy}"


def run_reward(cfg: DictConfig, tracker: Tracker, output_dir: Path) -> float:
    train, reward = cfg.train, cfg.reward
    placement = resolve_placement(cfg.hardware)
    lm, tokenizer = load_model_and_tokenizer(cfg.model, reward.max_length)
    if reward.dropout is not None:
        for module in lm.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = reward.dropout
    model = RewardModel(lm, reward.max_length).to(placement.device)

    train_comparisons = load_comparisons(reward, cfg.task, reward.train_split, cfg.seed)
    test_comparisons = load_comparisons(reward, cfg.task, reward.test_split, cfg.seed)
    test_comparisons = test_comparisons[: reward.max_eval_comparisons]
    overlong = _value(reward.overlong)
    train_encoded, train_stats = encode_comparisons(
        train_comparisons, tokenizer, reward.max_length, overlong
    )
    test_encoded, test_stats = encode_comparisons(
        test_comparisons, tokenizer, reward.max_length, overlong
    )
    train_stats.warn(f"{reward.dataset} ({reward.train_split})", reward.max_length)
    test_stats.warn(f"{reward.dataset} ({reward.test_split})", reward.max_length)
    if not train_encoded or not test_encoded:
        raise ValueError(
            f"no comparisons left in reward.dataset={reward.dataset} after reward.overlong=drop "
            f"(train {len(train_encoded)}, test {len(test_encoded)}); raise reward.max_length "
            "or use reward.overlong=truncate"
        )
    tracker.log_metrics(
        {
            "data/train_comparisons": len(train_encoded),
            "data/test_comparisons": len(test_encoded),
            "data/truncated": train_stats.truncated + test_stats.truncated,
            "data/dropped": train_stats.dropped + test_stats.dropped,
        },
        0,
        "comparisons_seen",
    )

    steps_per_epoch = math.ceil(len(train_encoded) / train.batch_size)
    max_steps = train.max_steps or max(1, math.ceil(reward.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, train.weight_decay),
        lr=train.lr,
        betas=tuple(train.adam_betas),
    )
    scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer,
        num_warmup_steps=round(train.warmup_ratio * max_steps),
        num_training_steps=max_steps,
    )
    log.info(
        "reward model: %.2fM parameters on %s (%s); %d train / %d test comparisons; "
        "%d steps of %d comparisons",
        sum(p.numel() for p in model.parameters()) / 1e6,
        placement.device,
        placement.precision,
        len(train_encoded),
        len(test_encoded),
        max_steps,
        train.batch_size,
    )
    pad_id = tokenizer.pad_token_id
    seen = 0

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(model, test_encoded, cfg, pad_id, placement)
        tracker.log_metrics(metrics, seen, "comparisons_seen")
        log.info(
            "eval step %d: accuracy %.3f, loss %.4f, margin %.3f",
            step,
            metrics["eval/accuracy"],
            metrics["eval/loss"],
            metrics["eval/margin"],
        )
        return metrics

    metrics = run_eval(0)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    micro = cfg.hardware.micro_batch_size
    model.train()
    for step in range(1, max_steps + 1):
        if len(order) < train.batch_size:  # a new epoch: a fresh seeded shuffle
            fresh = list(range(len(train_encoded)))
            rng.shuffle(fresh)
            order += fresh
        batch = [train_encoded[i] for i in order[: train.batch_size]]
        del order[: train.batch_size]
        step_metrics: dict[str, float] = {}
        for first in range(0, len(batch), micro):
            piece = batch[first : first + micro]
            rewards, valid = comparison_rewards(model, piece, pad_id, placement)
            best, margins = batch_tensors(piece, reward.margin, rewards.device)
            loss = preference_loss(rewards, valid, best, margins, reward.center_rewards_coef)
            (loss * len(piece) / len(batch)).backward()
            piece_metrics = {"loss": loss.detach()} | preference_metrics(
                rewards.detach(), valid, best
            )
            for name, value in piece_metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + float(value) * len(piece)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(batch)
        if step % train.log_steps == 0 or step == max_steps:
            logged = {f"train/{k}": v / len(batch) for k, v in step_metrics.items()}
            logged |= {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)}
            tracker.log_metrics(logged, seen, "comparisons_seen")
        if step % train.eval_steps == 0 or step == max_steps:
            metrics = run_eval(step)

    if reward.normalize:
        prompts, responses, source = normalization_texts(
            cfg, tokenizer, test_comparisons, train_comparisons, placement
        )
        raw = score_texts(
            model, tokenizer, prompts, responses, cfg.eval.batch_size, placement, normalized=False
        )
        mean, std = float(raw.mean()), float(raw.std())
        model.gain, model.bias = 1.0 / max(std, 1e-6), -mean / max(std, 1e-6)
        normalization = {"gain": model.gain, "bias": model.bias, "raw_mean": mean, "raw_std": std}
        tracker.log_metrics(
            {f"reward/{k}": v for k, v in normalization.items()}, seen, "comparisons_seen"
        )
        log.info(
            "rewards normalised on %d %s: gain %.4f, bias %.4f",
            len(raw),
            source,
            model.gain,
            model.bias,
        )
    else:
        source = "not normalised"

    info = {"normalized_on": source, "seed": cfg.seed, "eval_accuracy": metrics["eval/accuracy"]}
    final_dir = publish_model(
        lambda directory: model.save(directory, tokenizer, cfg, info), output_dir, cfg, tracker
    )
    log.info("reward model saved to %s", final_dir)
    return metrics["eval/accuracy"]
