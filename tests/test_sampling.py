"""The online stages' sampler (phf/sampling.py) and chunked output-layer log-probabilities
(phf/head_logprobs.py), against the plain computations they replace."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import phf.head_logprobs as head_module
import phf.sequences as sequences
import phf.stages.online as online
from phf.hardware import Placement
from phf.head_logprobs import head_logprobs, split_model
from phf.sampling import SamplingConstraint, draw, sample

CPU = Placement(torch.device("cpu"), torch.float32)
VOCAB = 97


def gpt2(vocabulary: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=vocabulary)
    return GPT2LMHeadModel(config).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 4, 2 and 1 tokens."""
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10], [0, 0, 0, 11]])
    mask = (torch.arange(4) >= torch.tensor([[0], [2], [3]])).long()
    return ids, mask


def plain_logprobs(model, query_ids, query_mask, response_ids, constraint):
    """forward_response with full logits (split_model off)."""
    original = sequences.split_model
    sequences.split_model = lambda model: None
    try:
        mask = torch.ones_like(response_ids, dtype=torch.float32)
        return online.forward_response(
            model, None, query_ids, query_mask, response_ids, mask, constraint, CPU
        )
    finally:
        sequences.split_model = original


# --- drawing --------------------------------------------------------------------------------------


def test_draw_follows_the_distribution_and_never_draws_a_banned_token() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    logits = probs.log().expand(20_000, 5).contiguous()  # log 0 = -inf: banned
    drawn = draw(logits).squeeze(1)
    counts = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs, atol=0.015)  # 4.5 standard errors at 20,000 draws


def test_draw_stays_below_the_total_when_the_uniform_draw_is_its_largest(monkeypatch) -> None:
    """The last token has probability 0: a draw scaled to exactly the total must not reach it."""
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape[0]))
    assert draw(logits).item() == 1


# --- sampling -------------------------------------------------------------------------------------


def test_sampled_log_probabilities_are_those_of_a_forward_pass_under_the_constraint() -> None:
    model = gpt2()
    query_ids, query_mask = prompts()
    constraint = SamplingConstraint(temperature=0.7, banned_id=3, banned_positions=5)
    torch.manual_seed(1)
    sampled = sample(model, query_ids, query_mask, 9, constraint, None, 0, CPU)
    assert sampled.tokens.shape == (3, 9)
    assert not (sampled.tokens[:, :5] == 3).any()
    logprobs = plain_logprobs(model, query_ids, query_mask, sampled.tokens, constraint)[0]
    assert torch.allclose(sampled.logprobs, logprobs, atol=1e-5)


def test_the_same_seed_samples_the_same_tokens_and_another_seed_others() -> None:
    model = gpt2()
    query_ids, query_mask = prompts()
    constraint = SamplingConstraint(1.0)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(sample(model, query_ids, query_mask, 6, constraint, None, 0, CPU).tokens)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_a_rows_tokens_depend_on_its_own_uniform_numbers_only() -> None:
    """With the uniform numbers given, a row samples the same tokens whatever rows share its
    batch: how N data-parallel processes sample one process's rollout."""
    model = gpt2()
    query_ids, query_mask = prompts()
    constraint = SamplingConstraint(0.9)
    uniforms = torch.rand(3, 6, generator=torch.Generator().manual_seed(7))
    whole = sample(model, query_ids, query_mask, 6, constraint, None, 0, CPU, uniforms)
    for rows in ([0], [1, 2], [2]):
        ids, mask = query_ids[rows], query_mask[rows]
        width = int(mask.sum(dim=1).max())  # as a process holding only these rows pads them
        part = sample(
            model, ids[:, -width:], mask[:, -width:], 6, constraint, None, 0, CPU, uniforms[rows]
        )
        assert torch.equal(part.tokens, whole.tokens[rows])
        torch.testing.assert_close(part.logprobs, whole.logprobs[rows], atol=1e-5, rtol=1e-5)
    other = torch.rand(3, 6, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(
        sample(model, query_ids, query_mask, 6, constraint, None, 0, CPU, other).tokens,
        whole.tokens,
    )


def test_rows_are_padded_after_their_stop_token_and_sampling_ends_when_all_stopped() -> None:
    model = gpt2(vocabulary=12)
    with torch.no_grad():  # zero (tied) embeddings and output layer: every logit 0, uniform
        model.lm_head.weight.zero_()
    query_ids, query_mask = prompts()
    # Stop token 4 has probability 1/12 at each position after the first two: every row stops
    # long before 200 tokens (all but surely), and none in the first two.
    constraint = SamplingConstraint(1.0, banned_id=4, banned_positions=2)
    torch.manual_seed(0)
    sampled = sample(model, query_ids, query_mask, 200, constraint, 4, 0, CPU)
    tokens = sampled.tokens
    assert tokens.size(1) < 200  # ended early: every row had stopped
    for row, logprobs in zip(tokens.tolist(), sampled.logprobs.tolist(), strict=True):
        stop = row.index(4)
        assert stop >= 2
        assert all(t == 0 for t in row[stop + 1 :])
        assert all(lp == 0.0 for lp in logprobs[stop + 1 :])
        assert all(lp == pytest.approx(-math.log(11)) for lp in logprobs[:2])


# --- chunked output-layer log-probabilities -------------------------------------------------------


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_chunked_log_probabilities_and_gradients_equal_the_full_logits(
    precision: torch.dtype, monkeypatch
) -> None:
    """Through the whole model, across several chunks (4 rows each), with a temperature and a
    ban: the same log-probabilities, entropies and parameter gradients as full logits."""
    monkeypatch.setattr(head_module, "CPU_CHUNK_ELEMENTS", 4 * VOCAB)
    placement = Placement(torch.device("cpu"), precision)
    model = gpt2()
    query_ids, query_mask = prompts()
    response = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    response[:, :3] = torch.where(response[:, :3] == 3, 5, response[:, :3])  # not the banned id
    constraint = SamplingConstraint(temperature=0.8, banned_id=3, banned_positions=3)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    results = []
    for split in (True, False):
        model.zero_grad()
        if not split:
            monkeypatch.setattr(sequences, "split_model", lambda model: None)
        mask = torch.ones(3, 7)
        logprobs, _, entropy = online.forward_response(
            model, None, query_ids, query_mask, response, mask, constraint, placement
        )
        (logprobs * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logprobs.detach(), entropy, grads))
    (fused, fused_entropy, fused_grads), (full, full_entropy, full_grads) = results
    tolerance = 1e-5 if precision == torch.float32 else 2e-2
    assert torch.allclose(fused, full, atol=tolerance)
    assert torch.allclose(fused_entropy, full_entropy, atol=tolerance)
    for a, b in zip(fused_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=tolerance * max(1.0, float(b.abs().max())))


def test_an_output_layer_with_a_bias_gets_its_gradient(monkeypatch) -> None:
    monkeypatch.setattr(head_module, "CPU_CHUNK_ELEMENTS", 3 * 11)
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    constraint = SamplingConstraint(1.0)
    logprobs, _ = head_logprobs(hidden, head, tokens, constraint, torch.float32)
    logprobs.sum().backward()
    fused = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    full = torch.log_softmax(head(hidden), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(logprobs, full, atol=1e-6)
    full.sum().backward()
    for a, b in zip(fused, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_models_split_where_their_logits_are_a_linear_map_of_the_last_state() -> None:
    assert split_model(gpt2()) is not None
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
        )
    )
    assert split_model(neox) is not None
    adapted = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    decoder, head = split_model(adapted)
    assert head is adapted.get_base_model().lm_head
    on_head = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn", "lm_head"]))
    assert split_model(on_head) is None  # the adapted head is not a plain linear layer


def test_a_lora_policy_split_gives_the_same_log_probabilities_as_its_full_forward() -> None:
    model = get_peft_model(
        gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    )
    model.eval()
    query_ids, query_mask = prompts()
    response = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(5))
    constraint = SamplingConstraint(1.0)
    mask = torch.ones(3, 5)
    fused = online.forward_response(
        model, None, query_ids, query_mask, response, mask, constraint, CPU
    )
    full = plain_logprobs(model, query_ids, query_mask, response, constraint)
    assert torch.allclose(fused[0], full[0], atol=1e-5)
