"""Training losses of PHF pretraining (Korbak et al. 2023). One small class per objective.

``loss(logits, input_ids, token_scores, values) -> (loss, metrics)``: ``logits`` [batch, time,
vocab] for the block ``input_ids`` [batch, time]; position t predicts token t+1, so every
per-token quantity below is about the *predicted* token t+1 and uses its score
``token_scores[:, 1:]``. ``values`` [batch, time] are a value head's predictions (only for
objectives with ``needs_values``), position t estimating the reward of token t+1. Metrics are
detached tensors (turning them into floats would force a GPU sync on every step); nothing here
logs or touches the tracker.

Filtering and conditional training change the data, not the loss (phf/data/blocks.py,
``objective_blocks``): both train with the MLE loss.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

# Upper bound of AWR's exp(A / beta) weights: the paper's clamp, which keeps one very
# advantageous token from dominating a batch.
AWR_MAX_WEIGHT = 1000.0
# log(1 - p) is computed as log(max(1 - p, this)): the paper's guard against log(0).
UNLIKELIHOOD_EPS = 1e-20


class Objective(Protocol):
    needs_values: bool

    def loss(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        token_scores: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the next token, [batch, time - 1], in fp32.

    Position t predicts token t+1; the last position has no target (-100). The loss runs over
    the full logits rather than a slice ``logits[:, :-1]``, whose backward would copy the
    gradient into a zero tensor of the logits' size (batch x time x vocabulary): ~5% of a CPU
    step of the tiny model."""
    ignored = torch.full_like(input_ids[:, :1], -100)
    targets = torch.cat([input_ids[:, 1:], ignored], dim=1)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100
    )
    return nll.view_as(targets)[:, :-1]


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t), [batch, time - 1], in fp32."""
    return -next_token_nll(logits, input_ids)


class MLE:
    """Maximum likelihood: mean next-token cross-entropy, blind to the scores."""

    needs_values = False

    def loss(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        token_scores: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = next_token_nll(logits, input_ids).mean()
        return loss, {"train/lm_loss": loss.detach()}


class Unlikelihood:
    """Likelihood on aligned tokens, unlikelihood (push p down) on misaligned ones.

    Per predicted token with probability p and score s: a = 1[s <= threshold] when a threshold
    is set, else a = 1 - s; loss = mean(-a log p - alpha (1 - a) log max(1 - p, 1e-20)).
    A threshold of 0 is a real threshold (only tokens scoring exactly 0 are aligned); the
    paper's released code tested ``if threshold:`` and so treated 0 as "no threshold".
    """

    needs_values = False

    def __init__(self, alpha: float, threshold: float | None) -> None:
        self.alpha = alpha
        self.threshold = threshold

    def loss(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        token_scores: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = next_token_logprobs(logits, input_ids)
        scores = token_scores[:, 1:].float()
        # `is not None`, not truthiness: a threshold of 0 is a threshold.
        threshold = self.threshold
        aligned = (scores <= threshold).float() if threshold is not None else 1.0 - scores
        log_one_minus_p = torch.log(torch.clamp(1.0 - logp.exp(), min=UNLIKELIHOOD_EPS))
        likelihood = -aligned * logp
        unlikelihood = -self.alpha * (1.0 - aligned) * log_one_minus_p
        loss = (likelihood + unlikelihood).mean()
        return loss, {
            "train/lm_loss": (-logp).mean().detach(),
            "train/unlikelihood": unlikelihood.mean().detach(),
            "train/aligned_fraction": aligned.mean().detach(),
        }


class AWR:
    """Advantage-weighted regression, token by token, with a value head as the baseline.

    r = -s (reward = minus the misalignment score); A = r - V (V detached); weights
    w = clamp(exp(A / beta), 0, 1000); loss = alpha * mean(CE * w) + (1 - alpha) * MSE(V, r).

    With alpha = 1 (RWR, below) the value loss has no weight, so the value head never learns:
    its zero-initialised output stays 0 and the baseline vanishes, A = r, and the weights are
    RWR's exp(r / beta). phf then skips the value head altogether.
    """

    def __init__(self, alpha: float, beta: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"objective.alpha must lie in [0, 1], got {alpha}")
        if beta <= 0:
            raise ValueError(f"objective.beta must be positive, got {beta}")
        self.alpha = alpha
        self.beta = beta

    @property
    def needs_values(self) -> bool:
        return self.alpha < 1.0

    def loss(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        token_scores: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = next_token_nll(logits, input_ids)
        rewards = -token_scores[:, 1:].float()
        if self.needs_values:
            if values is None:
                raise ValueError("AWR with alpha < 1 needs the value head's predictions")
            predicted = values[:, :-1].float()
        else:
            predicted = torch.zeros_like(rewards)
        advantages = rewards - predicted.detach()
        weights = torch.clamp(torch.exp(advantages / self.beta), 0.0, AWR_MAX_WEIGHT)
        weighted_lm_loss = (nll * weights).mean()
        value_loss = F.mse_loss(predicted, rewards)
        loss = self.alpha * weighted_lm_loss + (1.0 - self.alpha) * value_loss
        return loss, {
            "train/lm_loss": nll.mean().detach(),
            "train/weighted_lm_loss": weighted_lm_loss.detach(),
            "train/value_loss": value_loss.detach(),
            "train/weight_mean": weights.mean().detach(),
            "train/weight_max": weights.max().detach(),
        }


def build_objective(cfg: DictConfig) -> Objective:
    """The loss of ``cfg.name``; filtering and conditional training use the MLE loss."""
    if cfg.name in ("mle", "filtering", "conditional"):
        return MLE()
    if cfg.name == "unlikelihood":
        return Unlikelihood(alpha=cfg.alpha, threshold=cfg.threshold)
    if cfg.name == "awr":
        return AWR(alpha=cfg.alpha, beta=cfg.beta)
    if cfg.name == "rwr":
        if cfg.alpha != 1.0:
            raise ValueError("objective=rwr is AWR with alpha = 1; use objective=awr for alpha < 1")
        return AWR(alpha=1.0, beta=cfg.beta)
    raise ValueError(
        f"unknown objective {cfg.name!r}; choose one of "
        "mle, filtering, conditional, unlikelihood, awr, rwr"
    )
