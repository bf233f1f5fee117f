"""Sampling rollouts from a causal LM, fast: the online stages' generation (PPO, GRPO, RLOO).

Each step runs the model on the last sampled token with its KV cache and draws the next token by
inverting the CDF of its distribution with one uniform number per row. ``generate``'s
``torch.multinomial`` draws a vocabulary's worth of exponential variates per row and step instead,
which on a CPU took 43% of a rollout (64 rows x 64 tokens, the 5.3M-parameter model, vocabulary
8,192); this loop also writes keys and values into a cache preallocated for the rollout
(``PreallocatedLayer``) and attends to prefixes of a preallocated attention mask, where
``generate`` concatenates both at every step. Together: 1.33 s -> 0.45 s for that rollout. The
distribution sampled is the same; the draws for a given seed differ from ``generate``'s.

The log-probability of each sampled token under the distribution it was drawn from comes for
free, so a stage that needs the sampling policy's log-probabilities only to measure them (RLOO's
KL in the reward) is spared a forward pass. Evaluation keeps ``generate`` (top-p, suppressed
tokens), so that its samples stay comparable with every evaluation recorded before.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from phf.hardware import Placement
from phf.models import position_ids


@dataclass(frozen=True)
class SamplingConstraint:
    """The distribution a response is sampled from: the policy's at ``temperature``, with token
    ``banned_id`` given probability 0 at the first ``banned_positions`` response positions (a
    stop token that cannot end a response before its minimum length)."""

    temperature: float
    banned_id: int | None = None
    banned_positions: int = 0

    def apply(self, logits: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """Constrained float32 logits from raw ones ([..., positions, vocab], or [rows, vocab]
        for one position), the first of them at response position ``first_position``."""
        logits = logits.float() / self.temperature  # a new tensor: the ban below is safe
        banned = self.banned_positions - first_position
        if self.banned_id is not None and banned > 0:
            if logits.dim() == 2:
                logits[:, self.banned_id] = float("-inf")
            else:
                logits[..., :banned, self.banned_id] = float("-inf")
        return logits

    def apply_rows(self, logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
        """``apply`` for rows [rows, vocab] of mixed response positions, ``banned`` [rows]
        marking those where the banned token is out of reach; float32 ``logits`` are changed
        in place when the temperature is 1."""
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if banned is not None:
            logits[:, self.banned_id] = torch.where(
                banned, float("-inf"), logits[:, self.banned_id]
            )
        return logits


def draw(logits: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], by inverse CDF: the first token whose
    cumulative probability exceeds a uniform draw (``uniform`` [rows], else drawn here) scaled
    to the row's total. The scaled draw is kept strictly below the total, so a token of
    probability 0 is never drawn."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, device=logits.device)
    target = uniform.reshape(total.shape).to(total.device) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)


class PreallocatedLayer(DynamicLayer):
    """A layer's KV cache in buffers sized for the whole rollout: each step writes its token's
    keys and values in place and attends to a view of the filled prefix. ``DynamicLayer``
    concatenates instead, copying the layer's whole cache at every step (on a CPU, 58% of a
    rollout's time once sampling itself was fast)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads = key_states.shape[:2]
        self.key_buffer = key_states.new_empty(rows, heads, self.capacity, key_states.size(-1))
        self.value_buffer = value_states.new_empty(
            rows, heads, self.capacity, value_states.size(-1)
        )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.size(-2)
        if end > self.capacity:
            raise ValueError(f"the rollout cache holds {self.capacity} positions; {end} asked")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.length = 0


@dataclass
class Sampled:
    tokens: torch.Tensor  # [rows, generated], right-padded with the pad id after the stop token
    logprobs: torch.Tensor  # [rows, generated] float32, 0 on the padding


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    constraint: SamplingConstraint,
    stop_id: int | None,
    pad_id: int,
    placement: Placement,
    uniforms: torch.Tensor | None = None,
) -> Sampled:
    """Up to ``max_new_tokens`` tokens per left-padded prompt row, sampled from ``model`` under
    ``constraint``; a row ends at ``stop_id`` (kept) and is padded after it, and the loop ends
    early once every row has ended. ``uniforms`` [rows, max_new_tokens] are the uniform numbers
    each row's tokens are drawn with (a row's tokens then depend on its own numbers only, not
    on which other rows share the batch: what makes N data-parallel processes sample one
    process's rollout); without them the global RNG draws. The caller puts the model in eval
    mode."""
    rows, width = input_ids.shape
    device = input_ids.device
    mask = torch.cat(
        [attention_mask, attention_mask.new_ones(rows, max_new_tokens)], dim=1
    )  # preallocated: each step attends to a prefix of it
    prompt_positions = position_ids(attention_mask)
    positions = prompt_positions[:, -1:]
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, device=device)
    running = torch.ones(rows, dtype=torch.bool, device=device)
    cache = Cache(layer_class_to_replicate=partial(PreallocatedLayer, width + max_new_tokens))
    with placement.autocast():
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=prompt_positions,
            past_key_values=cache,
            use_cache=True,
        )
    generated = 0
    for step in range(max_new_tokens):
        logits = constraint.apply(output.logits[:, -1], first_position=step)
        token = draw(logits, None if uniforms is None else uniforms[:, step])  # [rows, 1]
        chosen = torch.log_softmax(logits, dim=-1).gather(1, token).squeeze(1)
        tokens[:, step] = torch.where(running, token.squeeze(1), pad_id)
        logprobs[:, step] = torch.where(running, chosen, 0.0)
        generated = step + 1
        if stop_id is not None:
            running &= tokens[:, step] != stop_id
            if not bool(running.any()):
                break
        if step + 1 == max_new_tokens:
            break
        positions = positions + 1
        with placement.autocast():
            output = model(
                input_ids=tokens[:, step : step + 1],
                attention_mask=mask[:, : width + step + 1],
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
    return Sampled(tokens[:, :generated], logprobs[:, :generated])
