"""The critic-free online RL stages: GRPO (objective=grpo) and RLOO (objective=rloo).

Both sample ``num_generations`` responses per prompt (``rollout_batch_size`` responses per
iteration, whole groups), score them with the shared reward (phf/stages/online.py: a scorer,
weighted scorers, or a reward model), and take ``num_iterations`` passes of clipped token-level
ratio updates over minibatches, without a value model. They differ in the advantage and where
the KL to the frozen reference goes (phf/losses/group.py):

- GRPO: advantage (r - group mean) / (group std + eps) (``grpo.scale_rewards=false``: r - group
  mean), the k3 KL estimator in the loss, weighted by ``grpo.beta`` (0: no reference is kept),
  the loss aggregated per ``grpo.loss_type``;
- RLOO: the sequence's KL, ``rloo.kl_coef`` x sum over its tokens of (log pi - log pi_ref), taken
  off its reward, and the advantage r - mean of the other k - 1 rewards of its group.

The rollout's KL from the reference is logged as PPO logs it, ``objective/kl``: the mean over
episodes of the sum over their tokens of log pi - log pi_ref (GRPO's k3 loss term as
``train/kl_k3``), so that online methods compare on one measure (and the evaluation's ``kl``, on
samples, across every method).

With one iteration the ratio is exactly 1 (the old log-probabilities are the current ones,
detached): no extra forward pass; RLOO's KL then uses the log-probabilities sampling computed.
Under data parallelism each process samples, scores and runs the forward passes of whole
groups (its share of the rollout's prompts); the rollout is gathered, so that group baselines,
RLOO's advantage whitening and every logged mean are the global batch's, and each process
updates on its share of every minibatch (phf/stages/online.py).

Metrics carry TRL's names: ``reward``, ``reward_std``,
``completions/mean_length``, ``completions/clipped_ratio``, ``clip_ratio``, ``entropy``.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig

from phf.distributed import DistributedContext
from phf.hardware import Placement
from phf.losses.group import (
    aggregate,
    aggregation_weight,
    clipped_objective,
    group_advantages,
    group_std,
    k3_kl,
    leave_one_out_advantages,
)
from phf.losses.ppo import masked_mean, masked_whiten
from phf.stages.online import OnlineStage, ResponseForward, Responses, forward_response
from phf.training import Optimization, check_divisible, training_network

log = logging.getLogger(__name__)


class GroupStage(OnlineStage, abc.ABC):
    """What GRPO and RLOO share; subclasses give ``advantages``, the clip range and the loss's
    KL term."""

    def __init__(
        self, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> None:
        settings, train = cfg[self.section], cfg.train
        groups = settings.rollout_batch_size // settings.num_generations
        check_divisible(
            f"{self.section}.rollout_batch_size / num_generations",
            groups,
            distributed,
            "groups of a rollout (whole groups on each process)",
        )
        mini = settings.mini_batch_size or settings.rollout_batch_size
        if settings.rollout_batch_size % mini:
            raise ValueError(
                f"{self.section}.rollout_batch_size={settings.rollout_batch_size} must be a "
                f"multiple of {self.section}.mini_batch_size={mini}"
            )
        check_divisible(f"{self.section}.mini_batch_size", mini, distributed, "minibatches")
        keep_reference = self.needs_reference(settings)
        policy, tokenizer, reference = self.load_policy(cfg, settings, placement, keep_reference)
        super().__init__(cfg, placement, distributed, policy, tokenizer, reference)
        self.keeps_reference = keep_reference
        self.check_lengths()
        self.group = int(settings.num_generations)
        self.max_steps = train.max_steps or math.ceil(
            settings.total_episodes / settings.rollout_batch_size
        )
        self.mini_batch_size = mini
        updates = self.max_steps * settings.num_iterations * (settings.rollout_batch_size // mini)
        forward = ResponseForward(policy, None, self.constraint, placement)
        self.optimization = Optimization(
            [forward], train, placement, updates, distributed, self.section.upper()
        )
        self.network = training_network(forward, cfg.hardware, placement, distributed)
        log.info(
            "%s: policy %.2fM parameters on %s (%s); reward: %s; %d iterations x %d prompts x "
            "%d responses, %d update(s) of %d episodes each",
            self.section.upper(),
            sum(p.numel() for p in policy.parameters()) / 1e6,
            placement.device,
            placement.precision,
            self.reward.description,
            self.max_steps,
            settings.rollout_batch_size // self.group,
            self.group,
            settings.num_iterations * (settings.rollout_batch_size // mini),
            mini,
        )

    @classmethod
    def build(
        cls, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> GroupStage:
        return cls(cfg, placement, distributed)

    # ------------------------------------------------------------------ subclasses

    @staticmethod
    @abc.abstractmethod
    def needs_reference(settings: DictConfig) -> bool:
        """Whether the stage keeps a reference (its log-probabilities are computed)."""

    @abc.abstractmethod
    def advantages(
        self,
        scores: torch.Tensor,
        logprobs: torch.Tensor,
        ref: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each episode's advantage [episodes] and metrics, from the rollout's scores and the
        sampling policy's and the reference's log-probabilities (the reference's None where
        no reference is kept)."""

    def kl_penalty(self, logprobs: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
        """The per-token KL term of the loss (GRPO), or None (RLOO: it is in the reward)."""
        return None

    def loss_type(self) -> str:
        return "dapo"  # token mean

    @abc.abstractmethod
    def clip_range(self) -> tuple[float, float]:
        """(epsilon below 1, epsilon above 1) of the clipped ratio."""

    # ------------------------------------------------------------------ the step

    def rollout(
        self,
    ) -> tuple[list[str], Responses, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``rollout_batch_size // group`` prompts, each ``group`` times in a row; this
        process samples, scores and runs the no-gradient forward passes of its whole groups,
        then the rollout is gathered: (prompts, responses, scores, the sampling policy's
        log-probabilities as the training forward computes them (only with more than one
        iteration), the reference's)."""
        settings, placement = self.settings, self.placement
        prompts = self.draw_prompts(settings.rollout_batch_size // self.group)
        repeated = [p for p in prompts for _ in range(self.group)]
        mine, generated = self.sample_share(repeated, self.section)
        batch = (generated.query_ids, generated.query_mask, generated.response_ids, generated.mask)
        constraint = (self.constraint, placement)
        self.policy.eval()
        with torch.no_grad():
            scores = self.scores(mine, generated)
            # Ratios from the second update on need the sampling policy's log-probabilities as
            # the training forward computes them (a ratio of exactly 1 at the first update);
            # RLOO's KL takes them as sampling computed them (no extra forward pass).
            old = None
            if settings.num_iterations > 1:
                old, _, _ = forward_response(
                    self.policy, None, *batch, *constraint, with_entropy=False
                )
            ref = self.reference_logprobs(*batch, *constraint) if self.keeps_reference else None
        self.policy.train()
        return (
            repeated,
            generated.gathered(self.distributed, self.tokenizer.pad_token_id),
            self.gather(scores),
            None if old is None else self.gather(old),
            None if ref is None else self.gather(ref),
        )

    def step(self) -> dict[str, Any]:
        settings = self.settings
        start = time.perf_counter()
        self.ensure_normalized_reward()
        prompts, generated, scores, old, ref = self.rollout()
        mask = generated.mask
        batch = (generated.query_ids, generated.query_mask, generated.response_ids, mask)
        sampling = old if old is not None else generated.logprobs
        advantages, extra = self.advantages(scores, sampling, ref, mask)
        loss_type = self.loss_type()
        epsilon_low, epsilon_high = self.clip_range()

        def piece_loss(piece: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            piece_mask = mask[piece]
            logprobs, _, entropy = self.network(*(part[piece] for part in batch), True)
            piece_old = logprobs.detach() if old is None else old[piece]
            per_token, clipped = clipped_objective(
                logprobs, piece_old, advantages[piece], epsilon_low, epsilon_high
            )
            kl = self.kl_penalty(logprobs, ref[piece]) if ref is not None else None
            if kl is not None:
                per_token = per_token + kl
            weight = aggregation_weight(loss_type, piece_mask)
            loss = aggregate(per_token, piece_mask, loss_type, settings.response_length)
            metrics = {
                "clip_ratio": masked_mean(clipped.float(), piece_mask),
                "entropy": masked_mean(entropy, piece_mask),
            }
            if kl is not None:
                metrics["train/kl_k3"] = masked_mean(kl.detach(), piece_mask)
            # Weighted, so that the micro-batches of every process add up to the minibatch's.
            return loss * weight, {name: value * weight for name, value in metrics.items()}

        means = self.update_on_rollout(
            settings.num_iterations,
            self.mini_batch_size,
            piece_loss,
            lambda minibatch: float(aggregation_weight(loss_type, mask[minibatch])),
        )

        self.steps_done += 1
        self.progress += settings.rollout_batch_size
        self.remember_rollout(prompts, generated, scores)
        seconds = time.perf_counter() - start
        lengths = mask.sum(dim=1)
        if ref is not None:  # the sampling policy's KL from the reference, per episode
            extra["objective/kl"] = float(((sampling - ref) * mask).sum(dim=1).mean())
        return (
            means
            | extra
            | {
                "reward": float(scores.mean()),
                "reward_std": float(group_std(scores, self.group)),
                "completions/mean_length": float(lengths.mean()),
                "completions/clipped_ratio": float((~generated.found_stop).float().mean()),
                "time/generation_share": generated.seconds / seconds,
            }
        )


class GRPOStage(GroupStage):
    """GRPO: group-normalised advantages, the k3 KL in the loss (module docstring)."""

    name = "grpo"
    title = "GRPO"
    section = "grpo"
    model_references = ("model.pretrained", "grpo.reward_model", "eval.kl_reference")

    @staticmethod
    def needs_reference(settings: DictConfig) -> bool:
        return float(settings.beta) > 0

    def advantages(
        self,
        scores: torch.Tensor,
        logprobs: torch.Tensor,
        ref: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return group_advantages(scores, self.group, bool(self.settings.scale_rewards)), {}

    def kl_penalty(self, logprobs: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """beta x k3 (the metric train/kl_k3 is this term, beta included)."""
        return float(self.settings.beta) * k3_kl(logprobs, ref)

    def loss_type(self) -> str:
        return str(getattr(self.settings.loss_type, "value", self.settings.loss_type))

    def clip_range(self) -> tuple[float, float]:
        settings = self.settings
        return float(settings.epsilon), float(settings.epsilon_high or settings.epsilon)


class RLOOStage(GroupStage):
    """RLOO: the sequence KL in the reward, leave-one-out advantages (module docstring)."""

    name = "rloo"
    title = "RLOO"
    section = "rloo"
    model_references = ("model.pretrained", "rloo.reward_model", "eval.kl_reference")

    @staticmethod
    def needs_reference(settings: DictConfig) -> bool:
        return True

    def advantages(
        self, scores: torch.Tensor, logprobs: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        settings = self.settings
        sequence_kl = ((logprobs - ref) * mask).sum(dim=1)
        rewards = scores - float(settings.kl_coef) * sequence_kl
        advantages = leave_one_out_advantages(rewards, self.group)
        if settings.normalize_advantages:
            advantages = masked_whiten(advantages[:, None], torch.ones_like(advantages[:, None]))[
                :, 0
            ]
        return advantages, {"objective/rlhf_reward": float(rewards.mean())}

    def clip_range(self) -> tuple[float, float]:
        cliprange = float(self.settings.cliprange)
        return cliprange, cliprange
