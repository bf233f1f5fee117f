"""The arithmetic of direct preference optimisation, on tensors: sequence log-probabilities of
responses and the DPO, IPO and hinge losses with TRL's metrics. phf/stages/dpo.py drives these;
tests check them on hand-built numbers.

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

from phf.objectives import next_token_logprobs


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log p(response | prompt) per row [batch], summed over the response's tokens only.

    ``response_mask`` [batch, time] is 1 on response tokens (not the prompt, not padding, on
    whichever side it is); position t's logits score token t+1, so the mask of the targets is
    ``response_mask[:, 1:]``.
    """
    logp = next_token_logprobs(logits, input_ids)
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(dim=1)


def preference_loss(
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


def preference_metrics(
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
