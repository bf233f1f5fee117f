"""The reward-model stage (objective=reward): learn which response to a prompt is preferred.

Read top to bottom: the reward model (``model.pretrained``, e.g. runs:/<id>/model of a
pretraining run or any sequence-classification architecture, or a random tiny GPT-2, with a
one-output head: phf/reward_model.py), the comparisons of both splits, the step budget, one
optimizer step over a seeded shuffle of the comparisons, the evaluation, and at the end reward
normalisation on policy samples and the model as the run's MLflow Model (text-classification).
phf/stages/loop.py drives it, checkpoints and resumes it, as every stage.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from phf.data.corpus import split_source
from phf.data.preferences import Comparison, load_comparisons
from phf.distributed import DistributedContext
from phf.evaluation import generate_samples
from phf.hardware import Placement
from phf.lora import merged, with_lora
from phf.losses.preference import comparison_loss, comparison_metrics
from phf.models import resolve_source
from phf.reward_model import (
    EncodedComparison,
    EncodingStats,
    RewardModel,
    build_trunk,
    comparison_rewards,
    distinct_pad_token,
    encode_comparisons,
    score_texts,
)
from phf.stages.common import (
    EpochShuffle,
    ExampleStage,
    process_share,
    publish_model,
)
from phf.stages.loop import Tables
from phf.tokenizer import load_tokenizer
from phf.tracking import Tracker
from phf.training import Optimization, check_divisible, training_network

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
def evaluate_comparisons(
    model: RewardModel,
    comparisons: Sequence[EncodedComparison],
    cfg: DictConfig,
    pad_id: int,
    placement: Placement,
) -> dict[str, float]:
    """eval/loss, eval/accuracy, eval/margin, eval/reward_mean, eval/reward_std over the test
    comparisons (raw rewards: normalisation comes after training)."""
    was_training = model.training
    model.eval()
    all_rewards, all_valid, all_best, losses = [], [], [], []
    width = max(len(c.sequences) for c in comparisons)  # best-of-N rows may differ in N
    for first in range(0, len(comparisons), cfg.eval.batch_size):
        batch = comparisons[first : first + cfg.eval.batch_size]
        rewards, valid = comparison_rewards(model, batch, pad_id, placement)
        best, margins = batch_tensors(batch, cfg.reward.margin, rewards.device)
        loss = comparison_loss(rewards, valid, best, margins, cfg.reward.center_rewards_coef)
        losses.append(float(loss) * len(batch))
        pad = width - rewards.size(1)
        all_rewards.append(torch.nn.functional.pad(rewards, (0, pad)))
        all_valid.append(torch.nn.functional.pad(valid, (0, pad)))
        all_best.append(best)
    model.train(was_training)
    metrics = comparison_metrics(torch.cat(all_rewards), torch.cat(all_valid), torch.cat(all_best))
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
    source = resolve_source(policy)
    lm = AutoModelForCausalLM.from_pretrained(source).to(placement.device)
    policy_tokenizer = load_tokenizer(source)
    prompts = [test[i % len(test)].prompt for i in range(n)]
    # Long prompts are cut to their last 64 tokens' worth of text: samples only need context.
    prompts = [policy_tokenizer.decode(policy_tokenizer.encode(p)[-64:]) for p in prompts]
    samples = generate_samples(
        lm, policy_tokenizer, prompts, cfg.eval.generation, placement, cfg.seed
    )
    return prompts, samples.completions, f"samples of {policy}"


def comparisons_digest(comparisons: Sequence[Comparison]) -> str:
    digest = hashlib.sha256()
    for c in comparisons:
        digest.update("\x00".join([c.prompt, *c.responses, str(c.best)]).encode())
    return digest.hexdigest()[:16]


@dataclass
class RewardStage(ExampleStage):
    """A reward model, its comparisons and optimizer; ``step()`` is one optimizer step."""

    name = "reward"
    title = "Reward model"
    section = "reward"
    model_references = ("model.pretrained", "reward.normalization_policy")
    data_parallel = "each process trains on its share of every global batch of comparisons"
    progress_metric = "comparisons_seen"
    progress_label = "comparisons"
    rate_metric = "train/comparisons_per_s"
    headline = "eval/accuracy"

    cfg: DictConfig
    placement: Placement
    model: RewardModel
    tokenizer: PreTrainedTokenizerBase
    train_comparisons: list[Comparison]
    test_comparisons: list[Comparison]
    train_encoded: list[EncodedComparison]
    test_encoded: list[EncodedComparison]
    data_metrics: dict[str, float]
    optimization: Optimization
    network: torch.nn.Module  # the model, in DDP under data parallelism
    distributed: DistributedContext
    max_steps: int
    shuffle: EpochShuffle
    steps_done: int = 0
    progress: int = 0  # comparisons seen

    @classmethod
    def build(
        cls, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> RewardStage:
        train, reward = cfg.train, cfg.reward
        check_divisible("train.batch_size", train.batch_size, distributed, "comparisons of a step")
        tokenizer_name = cfg.model.tokenizer or cfg.model.pretrained
        tokenizer = load_tokenizer(resolve_source(tokenizer_name))
        distinct_pad_token(tokenizer)
        trunk = build_trunk(cfg.model, tokenizer, reward.max_length)
        if reward.dropout is not None:
            for module in trunk.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = reward.dropout
        trunk = with_lora(trunk, cfg.model.lora, "SEQ_CLS")  # SEQ_CLS: the head trains too
        model = RewardModel(trunk, tokenizer, reward.max_length).to(placement.device)

        train_comparisons = load_comparisons(reward, cfg.task, reward.train_split, cfg.seed)
        test_comparisons = load_comparisons(reward, cfg.task, reward.test_split, cfg.seed)
        test_comparisons = test_comparisons[: reward.max_eval_comparisons]
        overlong = _value(reward.overlong)
        train_encoded, train_stats = encode_comparisons(
            train_comparisons, model, tokenizer, overlong
        )
        test_encoded, test_stats = encode_comparisons(test_comparisons, model, tokenizer, overlong)
        train_stats.warn(f"{reward.dataset} ({reward.train_split})", reward.max_length)
        test_stats.warn(f"{reward.dataset} ({reward.test_split})", reward.max_length)
        if not train_encoded or not test_encoded:
            raise ValueError(
                f"no comparisons left in reward.dataset={reward.dataset} after "
                f"reward.overlong=drop (train {len(train_encoded)}, test {len(test_encoded)}); "
                "raise reward.max_length or use reward.overlong=truncate"
            )
        steps_per_epoch = math.ceil(len(train_encoded) / train.batch_size)
        max_steps = train.max_steps or max(1, math.ceil(reward.epochs * steps_per_epoch))
        optimization = Optimization([model], train, placement, max_steps, distributed, "reward")
        log.info(
            "reward model: %.2fM parameters (%s) on %s (%s); %d train / %d test comparisons; "
            "%d steps of %d comparisons",
            sum(p.numel() for p in model.parameters()) / 1e6,
            type(trunk).__name__,
            placement.device,
            placement.precision,
            len(train_encoded),
            len(test_encoded),
            max_steps,
            train.batch_size,
        )
        return cls(
            cfg=cfg,
            placement=placement,
            model=model,
            tokenizer=tokenizer,
            train_comparisons=train_comparisons,
            test_comparisons=test_comparisons,
            train_encoded=train_encoded,
            test_encoded=test_encoded,
            data_metrics=_data_metrics(train_encoded, test_encoded, train_stats, test_stats),
            optimization=optimization,
            network=training_network(model, cfg.hardware, placement, distributed),
            distributed=distributed,
            max_steps=max_steps,
            shuffle=EpochShuffle(len(train_encoded), cfg.seed),
        )

    def step(self) -> dict[str, Any]:
        """One optimizer step on a global batch of comparisons, each process taking its share."""
        train, reward = self.cfg.train, self.cfg.reward
        batch = [self.train_encoded[i] for i in self.shuffle.next(train.batch_size)]
        mine = process_share(batch, self.distributed)
        micro = self.cfg.hardware.micro_batch_size
        pieces = [mine[first : first + micro] for first in range(0, len(mine), micro)]
        pad_id = self.tokenizer.pad_token_id
        self.model.train()

        def piece_loss(piece: list[EncodedComparison]) -> tuple[torch.Tensor, dict]:
            rewards, valid = comparison_rewards(self.network, piece, pad_id, self.placement)
            best, margins = batch_tensors(piece, reward.margin, rewards.device)
            loss = comparison_loss(rewards, valid, best, margins, reward.center_rewards_coef)
            metrics = comparison_metrics(rewards.detach(), valid, best)
            real = rewards.detach()[valid]
            # Means over the piece's comparisons, as sums: pieces of any size add up. The
            # rewards' spread from their sums and squares, which add up too.
            spread = ("reward_mean", "reward_std")
            sums = {k: v * len(piece) for k, v in metrics.items() if k not in spread}
            sums["rewards"] = real.new_tensor(float(real.numel()))
            sums["rewards_sum"] = real.sum()
            sums["rewards_squared"] = real.square().sum()
            return loss * len(piece), sums

        sums = self.optimization.accumulate(self.network, pieces, piece_loss, len(batch))
        count, total = sums.pop("rewards"), sums.pop("rewards_sum")
        squares = sums.pop("rewards_squared")
        variance = (squares - total**2 / count) / max(count - 1, 1)
        metrics = {f"train/{name}": value / len(batch) for name, value in sums.items()}
        metrics["train/reward_mean"] = total / count
        metrics["train/reward_std"] = math.sqrt(max(variance, 0.0))
        update = self.optimization.step(
            metrics["train/loss"],
            f"step {self.steps_done + 1}",
            "lower train.lr (or look for extreme margins in the data)",
        )
        self.steps_done += 1
        self.progress += len(batch)
        return metrics | update

    def evaluate(self) -> tuple[dict[str, float], Tables]:
        metrics = evaluate_comparisons(
            self.model, self.test_encoded, self.cfg, self.tokenizer.pad_token_id, self.placement
        )
        return metrics | self.data_metrics, {}

    def describe(self, metrics: dict[str, float]) -> str:
        return (
            f"accuracy {metrics['eval/accuracy']:.3f}, loss {metrics['eval/loss']:.4f}, "
            f"margin {metrics['eval/margin']:.3f}"
        )

    @property
    def trained(self) -> torch.nn.Module:
        return self.model.model  # the classifier (or its LoRA adapters and score head)

    def publish(self, directory: Path, tracker: Tracker) -> None:
        """Normalise rewards on policy samples (gain and bias in the model's config), then save
        and log the model."""
        cfg = self.cfg
        source = "not normalised"
        if cfg.reward.normalize:
            prompts, responses, source = normalization_texts(
                cfg, self.tokenizer, self.test_comparisons, self.train_comparisons, self.placement
            )
            raw = score_texts(
                self.model,
                self.tokenizer,
                prompts,
                responses,
                cfg.eval.batch_size,
                self.placement,
                normalized=False,
            )
            mean, std = float(raw.mean()), float(raw.std())
            self.model.gain, self.model.bias = 1.0 / max(std, 1e-6), -mean / max(std, 1e-6)
            normalization = {
                "gain": self.model.gain,
                "bias": self.model.bias,
                "raw_mean": mean,
                "raw_std": std,
            }
            tracker.log_metrics(
                {f"reward/{k}": v for k, v in normalization.items()},
                self.steps_done,
                {self.progress_metric: self.progress},
            )
            log.info(
                "rewards normalised on %d %s: gain %.4f, bias %.4f",
                len(raw),
                source,
                self.model.gain,
                self.model.bias,
            )
        info = {"normalized": bool(cfg.reward.normalize), "normalized_on": source, "seed": cfg.seed}
        self.model.model = merged(self.model.model)  # LoRA adapters into the weights
        self.model.inner = self.model.model
        publish_model(
            lambda d: self.model.save(d, self.tokenizer, cfg, info),
            directory,
            cfg,
            tracker,
            task="text-classification",
        )

    def datasets(self) -> list[dict[str, Any]]:
        reward = self.cfg.reward
        records = []
        for split, comparisons, context in (
            (reward.train_split, self.train_comparisons, "training"),
            (reward.test_split, self.test_comparisons, "evaluation"),
        ):
            if reward.dataset == "builtin":
                path = split_source(self.cfg.task.name, self.cfg.task.dataset, split).path
                source, kind = (str(path), "local") if path else (self.cfg.task.dataset, "hub")
            elif Path(reward.dataset).expanduser().exists():
                source, kind = str(Path(reward.dataset).expanduser().resolve()), "local"
            else:
                source, kind = reward.dataset, "hub"
            records.append(
                {
                    "name": f"{reward.dataset}/{split} comparisons",
                    "source": source,
                    "source_type": kind,
                    "split": split,
                    "digest": comparisons_digest(comparisons),
                    "context": context,
                    "profile": {"comparisons": len(comparisons)},
                }
            )
        return records


def _data_metrics(
    train: list[EncodedComparison],
    test: list[EncodedComparison],
    train_stats: EncodingStats,
    test_stats: EncodingStats,
) -> dict[str, float]:
    return {
        "data/train_comparisons": float(len(train)),
        "data/test_comparisons": float(len(test)),
        "data/truncated": float(train_stats.truncated + test_stats.truncated),
        "data/dropped": float(train_stats.dropped + test_stats.dropped),
    }
