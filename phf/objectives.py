"""Training losses. Each objective is a small class with a pure-tensor ``loss``.

``loss(logits, input_ids, token_scores) -> (loss, metrics)``: logits are [batch, time, vocab] for
the block ``input_ids`` [batch, time]; position t predicts token t+1. ``token_scores`` [batch,
time] is the misalignment score of each token, which the PHF objectives weigh the loss with.
Metrics are detached tensors (turning them into floats would force a GPU sync on every step);
nothing here logs or touches the tracker.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig


class Objective(Protocol):
    def loss(
        self, logits: torch.Tensor, input_ids: torch.Tensor, token_scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the next token, [batch, time - 1], in fp32."""
    shifted_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


class MLE:
    """Maximum likelihood: mean next-token cross-entropy, blind to the scores."""

    def loss(
        self, logits: torch.Tensor, input_ids: torch.Tensor, token_scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = next_token_nll(logits, input_ids)
        loss = nll.mean()
        return loss, {"train/lm_loss": loss.detach()}


def build_objective(cfg: DictConfig) -> Objective:
    objectives = {"mle": MLE}
    if cfg.name not in objectives:
        raise ValueError(f"unknown objective {cfg.name!r}; choose one of {sorted(objectives)}")
    return objectives[cfg.name]()
