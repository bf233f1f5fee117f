"""Token sequences as model input, and their log-probabilities: written once for every stage.

A ``Batch`` is rows of token ids padded to one width (on the right, or on the left for prompts
that generation continues), their attention mask, which tokens *count* (the response of an
example, the continuation after a context, a rollout's response) and the positions of the real
tokens. ``build_batch`` makes one from rows of ids; ``joined`` from a left-padded query and the
right-padded responses sampled after it.

``token_logprobs`` gives log p(token t+1 | tokens <= t) of a batch's tokens (optionally only from
position ``first`` on, under a sampling constraint, with a value head's values and the
entropy), and ``continuation_logprobs`` sums them over the counted tokens: the KL of the
evaluation, SFT's loss, DPO's log-ratios and the online stages' ratios all come from here. The
output layer runs in row chunks (phf/head_logprobs.py) where that pays and the model allows it:
the online stages, whose [episodes, response, vocabulary] logits would otherwise be built and
walked a dozen times (1.6x faster rollout updates, measured when it was written); SFT and DPO
keep full logits and one fused cross-entropy, which measured 0.89-0.91x with chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from phf.hardware import Placement
from phf.head_logprobs import head_logprobs, split_model
from phf.losses.lm import next_token_logprobs
from phf.losses.ppo import entropy_from_logits
from phf.models import position_ids
from phf.sampling import SamplingConstraint


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # [rows, width] long: 1 on real tokens
    counted: torch.Tensor  # [rows, width] float: 1 on the tokens whose log-probability counts

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions that count real tokens only: a left-padded row is seen as itself unpadded."""
        return position_ids(self.attention_mask)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    @property
    def targets(self) -> torch.Tensor:
        """[rows, width - 1]: 1 where position t's prediction (token t + 1) counts."""
        return self.counted[:, 1:]


def build_batch(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    *,
    left: bool = False,
    counted_from: Sequence[int] | None = None,
) -> Batch:
    """Rows of ids padded with ``pad_id`` to the longest, on the right (or ``left``); row i's
    tokens from index ``counted_from[i]`` to its end count (none without ``counted_from``)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    counted = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        offset = width - len(row) if left else 0
        input_ids[i, offset : offset + len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        attention[i, offset : offset + len(row)] = 1
        if counted_from is not None:
            counted[i, offset + counted_from[i] : offset + len(row)] = 1.0
    return Batch(input_ids.to(device), attention.to(device), counted.to(device))


def joined(
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> Batch:
    """A left-padded query and the right-padded responses sampled after it, as one batch whose
    counted tokens are the responses' real ones (``response_mask``)."""
    return Batch(
        torch.cat([query_ids, response_ids], dim=1),
        torch.cat([query_mask, response_mask.long()], dim=1),
        torch.cat([torch.zeros_like(query_mask, dtype=torch.float32), response_mask.float()], 1),
    )


@dataclass
class TokenLogprobs:
    logprobs: torch.Tensor  # [rows, width - 1 - first], of tokens first + 1 ...
    values: torch.Tensor | None  # [rows, width - 1 - first]: the states they were drawn from
    entropy: torch.Tensor | None  # [rows, width - 1 - first], no gradient


def token_logprobs(
    model: PreTrainedModel,
    batch: Batch,
    placement: Placement,
    *,
    first: int = 0,
    constraint: SamplingConstraint | None = None,
    chunked: bool = False,
    value_head: torch.nn.Module | None = None,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """log p(token t + 1 | tokens <= t) for t >= ``first`` (fp32), under ``constraint`` (the
    distribution responses were sampled from: temperature and banned token) when given; with a
    ``value_head``, its values of the hidden states at those positions; with ``with_entropy``,
    the entropy of each position's distribution. ``chunked`` runs the output layer in row
    chunks when the model splits into decoder and linear head (module docstring)."""
    inputs = batch.model_inputs()
    split = split_model(model) if chunked else None
    targets = batch.input_ids[:, first + 1 :]
    entropy = None
    with placement.autocast():
        if split is not None:
            decoder, head = split
            hidden = decoder(**inputs).last_hidden_state[:, first:-1]
            logprobs, entropy = head_logprobs(
                hidden,
                head,
                targets,
                constraint or SamplingConstraint(1.0),
                placement.dtype,
                with_entropy,
            )
            entropy = entropy if with_entropy else None
        else:
            output = model(**inputs, output_hidden_states=value_head is not None)
            hidden = output.hidden_states[-1][:, first:-1] if value_head is not None else None
            if constraint is None and first == 0:
                # One fused cross-entropy over the full logits (no slice to back-propagate).
                logprobs = next_token_logprobs(output.logits, batch.input_ids)
                logits = output.logits[:, :-1] if with_entropy else None
            else:
                logits = output.logits[:, first:-1]
                logits = constraint.apply(logits) if constraint else logits.float()
                logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])
                logprobs = logprobs.squeeze(-1)
            if with_entropy:
                entropy = entropy_from_logits(logits.detach())
    values = value_head(hidden).float() if value_head is not None else None
    return TokenLogprobs(logprobs, values, entropy)


def continuation_logprobs(
    model: PreTrainedModel, batch: Batch, placement: Placement
) -> torch.Tensor:
    """log p(counted tokens | the tokens before them) of each row [rows], fp32, summed."""
    logprobs = token_logprobs(model, batch, placement).logprobs
    return (logprobs * batch.targets.to(logprobs.dtype)).sum(dim=1)


@torch.no_grad()
def batched_continuation_logprobs(
    model: PreTrainedModel,
    rows: Sequence[Sequence[int]],
    counted_from: Sequence[int],
    pad_id: int,
    batch_size: int,
    placement: Placement,
) -> torch.Tensor:
    """``continuation_logprobs`` of many rows, ``batch_size`` at a time, in eval mode; [rows]
    on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for first in range(0, len(rows), batch_size):
        batch = build_batch(
            rows[first : first + batch_size],
            pad_id,
            placement.device,
            counted_from=counted_from[first : first + batch_size],
        )
        out.append(continuation_logprobs(model, batch, placement).cpu())
    model.train(was_training)
    return torch.cat(out)
