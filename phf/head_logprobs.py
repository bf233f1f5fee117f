"""Log-probabilities of given tokens through a causal LM's output layer, computed in row chunks
so that the [tokens, vocabulary] logits never exist all at once, in the forward pass or the
backward.

An online RL update needs, for each response token, log p(token) and the softmax's entropy. The
plain way materialises logits for every position ([64, 64, 8,192] floats = 134 MB for a
64-episode rollout of the 5.3M-parameter model) and then runs a dozen elementwise passes over
them (temperature, ban, log-softmax, gather, entropy; in backward, zeros for the gather's and
the slice's gradients and the log-softmax's): on a CPU those passes took longer than every matrix
product of the model together. Here each chunk of rows goes through the output layer, the
constrained log-softmax and the entropy while it is in cache; backward recomputes the chunk's
logits (one extra output-layer product) and accumulates the gradients of the hidden states and
of the output layer's weight and bias. Numbers agree with the plain computation to float
rounding (tests/test_sampling.py).

It applies where the logits are exactly ``head(decoder(...).last_hidden_state)`` with a linear
``head`` (GPT-2, GPT-NeoX/Pythia, Llama and their kin; LoRA adapters in the decoder are fine);
``split_model`` says None otherwise (a scaled or soft-capped output, adapters on the head) and
the caller computes full logits.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from phf.sampling import SamplingConstraint

# Rows per chunk: a chunk's logits of about 2**20 floats (4 MB) stay in a CPU core's cache; a
# GPU wants large chunks to stay busy.
CPU_CHUNK_ELEMENTS = 2**20
GPU_CHUNK_ELEMENTS = 2**27
# Config attributes of output layers that are not a plain linear map of the last hidden state.
NONLINEAR_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def split_model(model: Any) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, output layer) of a causal LM whose logits are ``head(last_hidden_state)``, or
    None. A PEFT model is split through its base model: its adapters stay in the decoder."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PreTrainedModel):
        return None
    head = inner.get_output_embeddings()
    decoder = inner.base_model
    if type(head) is not torch.nn.Linear or decoder is inner:
        return None
    if any(getattr(inner.config, name, None) for name in NONLINEAR_HEAD_ATTRIBUTES):
        return None
    return decoder, head


def _chunk_logits(
    part: slice,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    banned: torch.Tensor | None,
    constraint: SamplingConstraint,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Constrained float32 logits of the rows ``part`` of ``hidden``; ``banned`` marks the rows
    whose banned token is out of reach."""
    logits = (hidden[part].to(dtype) @ weight.to(dtype).t()).float()
    if bias is not None:
        logits = logits + bias.float()
    return constraint.apply_rows(logits, None if banned is None else banned[part])


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tokens: torch.Tensor,
        banned: torch.Tensor | None,
        constraint: SamplingConstraint,
        dtype: torch.dtype,
        chunk: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.size(0)
        logprobs = hidden.new_empty(rows, dtype=torch.float32)
        entropy = hidden.new_zeros(rows, dtype=torch.float32)
        lse = hidden.new_empty(rows, dtype=torch.float32)
        for first in range(0, rows, chunk):
            part = slice(first, first + chunk)
            logits = _chunk_logits(part, hidden, weight, bias, banned, constraint, dtype)
            norm = torch.logsumexp(logits, dim=-1)
            lse[part] = norm
            logprobs[part] = logits.gather(1, tokens[part, None]).squeeze(1) - norm
            if with_entropy:
                probs = torch.exp(logits - norm[:, None])
                # A banned token (logit -inf, probability 0) adds nothing.
                entropy[part] = norm - (probs * logits.nan_to_num(neginf=0.0)).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, bias, tokens, banned, lse)
        ctx.constraint, ctx.dtype, ctx.chunk = constraint, dtype, chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor, _grad_entropy: Any) -> tuple:  # type: ignore[override]
        hidden, weight, bias, tokens, banned, lse = ctx.saved_tensors
        constraint, dtype, chunk = ctx.constraint, ctx.dtype, ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        compute_weight = weight.to(dtype)
        for first in range(0, hidden.size(0), chunk):
            part = slice(first, first + chunk)
            logits = _chunk_logits(part, hidden, weight, bias, banned, constraint, dtype)
            # d log p(t) / d logits = onehot(t) - softmax, times the incoming gradient.
            grad = torch.exp(logits - lse[part, None]).mul_(-grad_logprobs[part, None])
            grad.scatter_add_(1, tokens[part, None], grad_logprobs[part, None])
            if constraint.temperature != 1.0:
                grad /= constraint.temperature
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[part] = (grad @ compute_weight).to(hidden.dtype)
            grad_weight += (grad.t() @ hidden[part].to(dtype)).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(dim=0)
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    tokens: torch.Tensor,
    constraint: SamplingConstraint,
    dtype: torch.dtype,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) [n, R] and the entropy [n, R] (no gradient; zeros unless
    ``with_entropy``) of the constrained softmax of ``head(hidden)`` at each response position;
    ``hidden`` [n, R, d] are the states predicting ``tokens`` [n, R], the first of them at
    response position 0. ``dtype`` is the products' (the autocast dtype; float32 without
    autocast)."""
    rows, length, width = hidden.shape
    vocabulary = head.weight.size(0)
    banned = None
    if constraint.banned_id is not None and constraint.banned_positions > 0:
        position = torch.arange(length, device=hidden.device).expand(rows, length)
        banned = (position < constraint.banned_positions).reshape(-1)
    budget = GPU_CHUNK_ELEMENTS if hidden.device.type == "cuda" else CPU_CHUNK_ELEMENTS
    chunk = max(1, budget // vocabulary)
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, entropy = _HeadLogprobs.apply(
            hidden.reshape(-1, width),
            head.weight,
            head.bias,
            tokens.reshape(-1),
            banned,
            constraint,
            dtype,
            chunk,
            with_entropy,
        )
    return logprobs.view(rows, length), entropy.view(rows, length)
