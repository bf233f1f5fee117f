"""The arithmetic of PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), on
tensors: per-token KL penalty and sequence reward, GAE, whitening, clipped losses, and the KL
coefficient's controllers. phf/stages/ppo.py drives these; tests check them on hand-built numbers.

Shapes: [episodes, response tokens]; ``mask`` is 1 on the response's real tokens (up to and
including the stop token) and 0 on padding, whichever side the padding is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from phf.models import last_token_index


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    squared = masked_mean((values - mean) ** 2, mask)
    return squared * count / (count - 1).clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """Scale to unit variance over the masked entries; ``shift_mean`` also centres them on 0
    (rewards keep their mean, advantages lose it). Padding stays 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (log pi - log pi_ref), with each episode's sequence score
    added at its last real response token (never at a pad). Returns (rewards, per-token KL)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each episode's real tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where a
    position past the episode's end (a pad, or the end of the tensor) has V = 0 and A = 0: the
    episode ends at its last real token. Returns (advantages, returns = advantages + values),
    0 on padding.
    """
    rewards, values, mask = rewards * mask, values * mask, mask.to(rewards.dtype)
    length = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        # Under left padding a pad may follow nothing real; under right padding it follows the
        # end. Either way a masked position contributes nothing and resets the recursion.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_advantage = advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = pi / pi_old. Metrics: clipfrac (share of tokens where the clipped term won), approxkl
    (0.5 * mean (log r)^2), ratio (mean r)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean over real tokens of max((V - R)^2, (V_clipped - R)^2), where V_clipped stays
    within cliprange_value of the rollout's value. Metric: clipfrac."""
    clipped_values = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position, in nats (a banned token, logit -inf, adds 0)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(dim=-1)


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, so the
    KL per episode drifts towards ``target`` at a rate set by ``horizon`` (in episodes)."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_episodes: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
