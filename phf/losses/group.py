"""The arithmetic of critic-free online RL, on tensors: GRPO's group-normalised and RLOO's
leave-one-out advantages, the k3 KL estimator, the clipped token-level ratio objective and its
aggregations. phf/stages/grpo.py drives these; tests check them on hand-built numbers.

Episodes come in groups of ``group`` consecutive rows, the responses to one prompt. Shapes:
rewards [episodes]; per-token quantities [episodes, response tokens] with ``mask`` 1 on the
response's real tokens (up to and including its stop token), 0 on padding.
"""

from __future__ import annotations

import torch

GROUP_STD_EPS = 1e-4  # GRPO's epsilon: a group whose rewards are all equal has advantage 0


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - mean of its group) / (std of its group + eps); without
    ``scale``, r - mean (Dr. GRPO, Liu et al. 2025)."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the other k - 1 of its group."""
    grouped = rewards.view(-1, group)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)
    return (grouped - others).reshape(-1)


def group_std(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """The mean over groups of each group's reward std (TRL's ``reward_std``)."""
    return rewards.view(-1, group).std(dim=1).mean()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = log pi_ref -
    log pi; unbiased, and never negative."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def clipped_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = pi / pi_old, with each
    episode's advantage [episodes] on all its tokens; and where the clipped term won."""
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, response_length: int
) -> torch.Tensor:
    """The loss of a batch from per-token losses: ``grpo`` each sequence's token mean, then the
    mean over sequences; ``dapo`` the mean over every token of the batch; ``dr_grpo`` the
    token sum / (sequences x response_length), a constant normaliser."""
    per_token = per_token * mask
    if loss_type == "grpo":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return per_token.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return per_token.sum() / (per_token.size(0) * response_length)
    raise ValueError(f"grpo.loss_type={loss_type!r} is not one of grpo, dapo, dr_grpo")


def aggregation_weight(loss_type: str, mask: torch.Tensor) -> torch.Tensor:
    """What one ``aggregate`` of a micro-batch weighs in its minibatch's: its sequences, or its
    tokens for ``dapo``. The minibatch's loss is the sum over its micro-batches (on every
    process) of aggregate x weight, divided by the minibatch's total weight, so that any split
    into micro-batches and processes gives the loss of the whole."""
    if loss_type == "dapo":
        return mask.sum()
    return torch.tensor(float(mask.size(0)), device=mask.device)
