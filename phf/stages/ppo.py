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
over minibatches. Under data parallelism each process samples, scores and runs the forward
passes of its share of the rollout; the rollout is gathered, so that reward and advantage
whitening are the global batch's, and each process updates on its share of every minibatch
(phf/stages/online.py). The policy and value losses are token means over the whole minibatch,
however it is split into micro-batches and processes.
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
from phf.distributed import DistributedContext, gather_objects
from phf.hardware import Placement
from phf.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from phf.models import VALUE_HEAD_FILE, ValueHead
from phf.stages.online import OnlineStage, ResponseForward, Responses, forward_response
from phf.training import Optimization, check_divisible, training_network

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One rollout batch (the global one): the generated responses and what PPO computes on
    them."""

    prompts: list[str]
    generated: Responses
    logprobs: torch.Tensor  # [n, R] under the policy that generated them
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor  # [n, R]
    scores: torch.Tensor  # [n] the reward, with the missing-stop penalty


class PPOStage(OnlineStage):
    """Policy and value head, reference, reward, prompts, optimization and KL controller;
    ``step()`` collects one rollout batch and updates on it."""

    name = "ppo"
    title = "PPO"
    section = "ppo"
    model_references = ("model.pretrained", "ppo.reward_model", "eval.kl_reference")

    def __init__(self, cfg: DictConfig, placement: Placement, distributed: DistributedContext):
        ppo, train = cfg.ppo, cfg.train
        check_divisible("ppo.rollout_batch_size", ppo.rollout_batch_size, distributed, "rollout")
        check_divisible("ppo.mini_batch_size", ppo.mini_batch_size, distributed, "minibatches")
        policy, tokenizer, reference = self.load_policy(cfg, ppo, placement)
        super().__init__(cfg, placement, distributed, policy, tokenizer, reference)
        self.check_lengths()
        self.value_head = ValueHead(policy.config.hidden_size).to(placement.device)
        forward = ResponseForward(policy, self.value_head, self.constraint, placement)
        self.max_steps = train.max_steps or math.ceil(ppo.total_episodes / ppo.rollout_batch_size)
        optimizer_steps = (
            self.max_steps * ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.mini_batch_size)
        )
        self.optimization = Optimization(
            [forward], train, placement, optimizer_steps, distributed, "PPO", eps=1e-5
        )
        self.network = training_network(forward, cfg.hardware, placement, distributed)
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
        return cls(cfg, placement, distributed)

    def collect_rollout(self) -> Rollout:
        """Sample, score and run the no-gradient forward passes of this process's share of the
        rollout, then gather the whole."""
        ppo, placement = self.settings, self.placement
        prompts, generated = self.sample_share(self.draw_prompts(ppo.rollout_batch_size), "ppo")
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
        pad = self.tokenizer.pad_token_id
        return Rollout(
            prompts=gather_objects(prompts, self.distributed),
            generated=generated.gathered(self.distributed, pad),
            logprobs=self.gather(logprobs),
            ref_logprobs=self.gather(ref_logprobs),
            values=self.gather(values),
            entropy=self.gather(entropy * generated.mask),
            scores=self.gather(scores),
        )

    def step(self) -> dict[str, Any]:
        """Generate and score one rollout batch, then ``ppo_epochs`` passes of minibatch updates;
        returns the iteration's metrics (the ecosystem's names)."""
        ppo = self.settings
        start = time.perf_counter()
        self.ensure_normalized_reward()
        rollout = self.collect_rollout()
        generated = rollout.generated
        mask = generated.mask
        kl_coef = self.kl_controller.value
        rewards, kl = token_rewards(
            rollout.logprobs, rollout.ref_logprobs, rollout.scores, mask, kl_coef
        )
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)

        def piece_loss(piece: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            piece_mask = mask[piece]
            logprobs, values, _ = self.network(
                generated.query_ids[piece],
                generated.query_mask[piece],
                generated.response_ids[piece],
                piece_mask,
            )
            pg_loss, pg = policy_loss(
                logprobs, rollout.logprobs[piece], advantages[piece], piece_mask, ppo.cliprange
            )
            vf_loss, vf = value_loss(
                values, rollout.values[piece], returns[piece], piece_mask, ppo.cliprange_value
            )
            tokens = piece_mask.sum()  # token means, as sums: micro-batches add up
            metrics = {
                "policy/approxkl": pg["approxkl"],
                "policy/clipfrac": pg["clipfrac"],
                "val/ratio": pg["ratio"],
                "val/clipfrac": vf["clipfrac"],
                "loss/policy": pg_loss,
                "loss/value": vf_loss,
            }
            loss = (pg_loss + ppo.vf_coef * vf_loss) * tokens
            return loss, {name: value.detach() * tokens for name, value in metrics.items()}

        means = self.update_on_rollout(
            ppo.ppo_epochs,
            ppo.mini_batch_size,
            piece_loss,
            lambda minibatch: float(mask[minibatch].sum()),  # token means
            "lower train.lr or ppo.cliprange",
        )
        del means["loss"]  # logged as its parts, loss/policy and loss/value

        self.steps_done += 1
        self.progress += ppo.rollout_batch_size
        kl_per_episode = kl.sum(dim=1)
        mean_kl = float(kl_per_episode.mean())
        self.kl_controller.update(mean_kl, ppo.rollout_batch_size)
        self.remember_rollout(rollout.prompts, generated, rollout.scores)
        seconds = time.perf_counter() - start
        scores = rollout.scores
        non_score_reward = float((-kl_coef * kl_per_episode).mean())
        return means | {
            "objective/kl": mean_kl,
            "objective/entropy": float(rollout.entropy.sum(dim=1).mean()),
            "objective/scores": float(scores.mean()),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": float(scores.mean()) + non_score_reward,
            "objective/kl_coef": kl_coef,
            "val/response_length": float(mask.sum(dim=1).mean()),
            "val/stop_fraction": float(generated.found_stop.float().mean()),
            "time/generation_share": generated.seconds / seconds,
        }

    def training_state(self) -> dict[str, Any]:
        return super().training_state() | {"kl_coef": self.kl_controller.value}

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        super().restore(directory, state)
        load_head(self.value_head, directory / VALUE_HEAD_FILE)
        self.kl_controller.value = float(state["kl_coef"])

    def save(self, directory: Path) -> None:
        """The policy (``from_pretrained``-loadable, or its LoRA adapters), tokenizer, config
        and value head."""
        super().save(directory)
        save_head(self.value_head, directory / VALUE_HEAD_FILE)

    def publish(self, directory: Path, tracker: Any) -> None:
        super().publish(directory, tracker)  # the merged policy
        save_head(self.value_head, directory / VALUE_HEAD_FILE)
