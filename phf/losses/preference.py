"""The arithmetic of preferences, on tensors: the DPO, IPO and hinge losses with TRL's metrics
(from the responses' log-probabilities, phf/sequences.py), and the reward model's loss on
comparisons (Bradley-Terry for pairs, N-way cross-entropy for best-of-N rows). phf/stages/dpo.py
and phf/stages/reward.py drive these; tests check them on hand-built numbers.

With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the log-ratio margin
of the chosen response y_w over the rejected y_l:
- sigmoid (DPO, Rafailov et al. 2023): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h),
  e = label_smoothing (conservative DPO; 0 is DPO itself);
- ipo (Azar et al. 2023): (h - 1 / (2 beta))^2;
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).

RPO (Pang et al. 2024) adds alpha times the chosen response's negative log-likelihood per token
(``chosen_nll``) to any of the three: the margin can then grow only by pushing the rejected
response down, not by pulling both down, which is what moves a policy far from its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The per-pair loss [pairs] (see the module docstring for the three forms)."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    raise ValueError(f"dpo.loss_type={loss_type!r} is not one of sigmoid, ipo, hinge")


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen response's negative log-likelihood per token [pairs] (RPO's term, normalised
    by each response's length as in the paper): ``policy_chosen`` summed log-probabilities,
    ``chosen_tokens`` how many tokens each sum covers."""
    return -policy_chosen / chosen_tokens.to(policy_chosen.dtype)


def dpo_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics, as sums over the pairs (divide by the number of pairs): implicit
    rewards beta (log pi - log pi_ref) of each side, their margin, the share of pairs whose
    chosen reward is strictly higher, and the policy's log-probabilities."""
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
    }


# ---------------------------------------------------------------- reward models


def comparison_loss(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    best: torch.Tensor,
    margins: torch.Tensor,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """The reward model's loss on a batch of comparisons (raw rewards [comparisons, responses],
    ``valid`` marking real entries, ``best`` the preferred response's index).

    Pairs: -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT's, TRL's); N-way
    comparisons: cross-entropy of the softmax over the N rewards against the best one
    (lm-human-preferences). For pairs without margins the two are the same number. ``center_coef``
    adds coef * (sum of a comparison's rewards)^2 (TRL's center_rewards_coefficient).
    """
    if rewards.size(1) == 2 and bool(valid.all()):
        chosen = rewards.gather(1, best[:, None]).squeeze(1)
        rejected = rewards.gather(1, (1 - best)[:, None]).squeeze(1)
        loss = -F.logsigmoid(chosen - rejected - margins).mean()
    else:
        loss = F.cross_entropy(rewards.masked_fill(~valid, float("-inf")), best)
    if center_coef:
        loss = loss + center_coef * (rewards * valid).sum(dim=1).pow(2).mean()
    return loss


def comparison_metrics(
    rewards: torch.Tensor, valid: torch.Tensor, best: torch.Tensor
) -> dict[str, torch.Tensor]:
    """accuracy: the best response's reward is strictly above every other's (a tie is wrong);
    margin: the best response's reward minus the mean of the others'; reward mean and std over
    every response."""
    best_reward = rewards.gather(1, best[:, None]).squeeze(1)
    others = valid.clone()
    others.scatter_(1, best[:, None], False)
    beaten = torch.where(others, rewards < best_reward[:, None], torch.ones_like(others))
    other_mean = (rewards * others).sum(dim=1) / others.sum(dim=1)
    real = rewards[valid]
    return {
        "accuracy": beaten.all(dim=1).float().mean(),
        "margin": (best_reward - other_mean).mean(),
        "reward_mean": real.mean(),
        "reward_std": real.std() if real.numel() > 1 else torch.zeros(()),
    }
