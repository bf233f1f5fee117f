"""The PPO stage (objective=ppo): fine-tune a policy against a reward, with a KL penalty to the
policy it started from.

The policy is model.pretrained (a hub id, a path, or runs:/<id>/model of a pretraining run) with
a zero-initialised value head on its last hidden state: one trunk for both, as in Ziegler et al.
2019's shared-trunk variant and TRL's value-head models (half the memory and forward passes of a
separate value model). The frozen reference is a copy of the initial policy; reward, prompts,
generation and evaluation are phf/stages/online.py's, shared with the other online stages.

Each iteration (one step of phf/stages/loop.py): generate ``rollout_batch_size`` responses (the
*generation* share of the time), score them, compute log-probabilities, values and per-token
rewards with the KL penalty, GAE, then ``ppo_epochs`` passes of clipped policy and value updates
over minibatches.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from phf.checkpoints import load_head, save_head
from phf.distributed import DistributedContext
from phf.hardware import Placement
from phf.models import VALUE_HEAD_FILE, Network, ValueHead
from phf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from phf.stages.loop import NonFiniteLossError
from phf.stages.online import OnlineStage, Responses, forward_response, generate_responses
from phf.stages.pretrain import adamw, schedule

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One rollout batch: the generated responses and what PPO computes on them."""

    prompts: list[str]
    generated: Responses
    logprobs: torch.Tensor  # [n, R] under the policy that generated them
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor  # [n, R]
    scores: torch.Tensor  # [n] the reward, with the missing-stop penalty


class PPOStage(OnlineStage):
    """Policy and value head, reference, reward, prompts, optimizer and KL controller;
    ``step()`` collects one rollout batch and updates on it."""

    section = "ppo"

    def __init__(self, cfg: DictConfig, placement: Placement) -> None:
        ppo, train = cfg.ppo, cfg.train
        policy, tokenizer, reference = self.load_policy(cfg, ppo, placement)
        super().__init__(cfg, placement, policy, tokenizer, reference)
        self.check_lengths()
        self.value_head = ValueHead(policy.config.hidden_size).to(placement.device)
        self.network = Network(policy, self.value_head)
        self.max_steps = train.max_steps or math.ceil(ppo.total_episodes / ppo.rollout_batch_size)
        optimizer_steps = (
            self.max_steps * ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.mini_batch_size)
        )
        self.optimizer = adamw([self.network], train, placement, eps=1e-5)
        self.scheduler = schedule(self.optimizer, train, optimizer_steps)
        self.kl_controller = (
            AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
            if ppo.adaptive_kl
            else FixedKLController(ppo.kl_coef)
        )
        log.info(
            "PPO: policy %.2fM parameters + value head on %s (%s); reward: %s; %d rollouts x "
            "%d episodes, %d epochs x %d minibatches of %d",
            sum(p.numel() for p in policy.parameters()) / 1e6,
            placement.device,
            placement.precision,
            self.reward.description,
            self.max_steps,
            ppo.rollout_batch_size,
            ppo.ppo_epochs,
            ppo.rollout_batch_size // ppo.mini_batch_size,
            ppo.mini_batch_size,
        )

    @classmethod
    def build(
        cls, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> PPOStage:
        if distributed.enabled:
            raise ValueError("objective=ppo trains in one process; launch it without torchrun")
        return cls(cfg, placement)

    def collect_rollout(self) -> Rollout:
        ppo, placement = self.settings, self.placement
        prompts = self.draw_prompts(ppo.rollout_batch_size)
        generated = generate_responses(
            self.policy, self.tokenizer, prompts, self.stop_id, ppo, placement
        )
        batch = (generated.query_ids, generated.query_mask, generated.response_ids, generated.mask)
        constraint = (self.constraint, placement)
        self.policy.eval()
        with torch.no_grad():
            scores = self.scores(prompts, generated)
            logprobs, values, entropy = forward_response(
                self.policy, self.value_head, *batch, *constraint
            )
            ref_logprobs = self.reference_logprobs(*batch, *constraint)
        self.policy.train()
        return Rollout(
            prompts=prompts,
            generated=generated,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            entropy=entropy * generated.mask,
            scores=scores,
        )

    def step(self) -> dict[str, Any]:
        """Generate and score one rollout batch, then ``ppo_epochs`` passes of minibatch updates;
        returns the iteration's metrics (the ecosystem's names)."""
        ppo = self.settings
        start = time.perf_counter()
        self.ensure_normalized_reward()
        rollout = self.collect_rollout()
        mask = rollout.generated.mask
        kl_coef = self.kl_controller.value
        rewards, kl = token_rewards(
            rollout.logprobs, rollout.ref_logprobs, rollout.scores, mask, kl_coef
        )
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)

        sums: dict[str, float] = {}
        updates = 0
        micro = self.cfg.hardware.micro_batch_size
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(ppo.rollout_batch_size)
            for minibatch in order.split(ppo.mini_batch_size):
                for piece in minibatch.split(micro):
                    share = len(piece) / len(minibatch)
                    piece_metrics = self._update_piece(rollout, advantages, returns, piece, share)
                    for name, value in piece_metrics.items():
                        sums[name] = sums.get(name, 0.0) + float(value) * share
                torch.nn.utils.clip_grad_norm_(
                    self.network.parameters(), self.cfg.train.max_grad_norm
                )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1

        self.steps_done += 1
        self.progress += ppo.rollout_batch_size
        kl_per_episode = kl.sum(dim=1)
        mean_kl = float(kl_per_episode.mean())
        self.kl_controller.update(mean_kl, ppo.rollout_batch_size)
        self.remember_rollout(rollout.prompts, rollout.generated, rollout.scores)
        seconds = time.perf_counter() - start
        scores = rollout.scores
        non_score_reward = float((-kl_coef * kl_per_episode).mean())
        return {name: value / updates for name, value in sums.items()} | {
            "objective/kl": mean_kl,
            "objective/entropy": float(rollout.entropy.sum(dim=1).mean()),
            "objective/scores": float(scores.mean()),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": float(scores.mean()) + non_score_reward,
            "objective/kl_coef": kl_coef,
            "val/response_length": float(mask.sum(dim=1).mean()),
            "val/stop_fraction": float(rollout.generated.found_stop.float().mean()),
            "train/lr": self.scheduler.get_last_lr()[0],
            "time/generation_share": rollout.generated.seconds / seconds,
        }

    def _update_piece(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        piece: torch.Tensor,
        share: float,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward one micro-batch of a minibatch (weighed by its ``share``)."""
        ppo = self.settings
        generated = rollout.generated
        mask = generated.mask[piece]
        logprobs, values, _ = forward_response(
            self.policy,
            self.value_head,
            generated.query_ids[piece],
            generated.query_mask[piece],
            generated.response_ids[piece],
            mask,
            self.constraint,
            self.placement,
        )
        pg_loss, pg_metrics = policy_loss(
            logprobs, rollout.logprobs[piece], advantages[piece], mask, ppo.cliprange
        )
        vf_loss, vf_metrics = value_loss(
            values, rollout.values[piece], returns[piece], mask, ppo.cliprange_value
        )
        loss = pg_loss + ppo.vf_coef * vf_loss
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the PPO loss is {float(loss.detach())} at iteration {self.steps_done + 1}; lower "
                "train.lr or ppo.cliprange"
            )
        (loss * share).backward()
        return {
            "policy/approxkl": pg_metrics["approxkl"],
            "policy/clipfrac": pg_metrics["clipfrac"],
            "val/ratio": pg_metrics["ratio"],
            "val/clipfrac": vf_metrics["clipfrac"],
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
        }

    def training_state(self) -> dict[str, Any]:
        return self.common_state() | {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_coef": self.kl_controller.value,
        }

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        self.restore_common(directory, state)
        load_head(self.value_head, directory / VALUE_HEAD_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.value = float(state["kl_coef"])

    def save(self, directory: Path) -> None:
        """The policy (``from_pretrained``-loadable, or its LoRA adapters), tokenizer, config
        and value head."""
        super().save(directory)
        save_head(self.value_head, directory / VALUE_HEAD_FILE)

    def publish(self, directory: Path, tracker: Any) -> None:
        super().publish(directory, tracker)  # the merged policy
        save_head(self.value_head, directory / VALUE_HEAD_FILE)
