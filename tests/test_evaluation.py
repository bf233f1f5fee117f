"""Evaluation metrics on hand-built inputs, sampling and held-out loss on a tiny model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from phf.evaluation import (
    KLReference,
    distinct_n,
    generate_samples,
    heldout_lm_loss,
    left_padded_prompts,
    score_metrics,
    sequence_logprobs,
)
from phf.hardware import Placement
from phf.losses.lm import MLE, next_token_nll
from phf.tokenizer import load_tokenizer

CPU = Placement(device=torch.device("cpu"), dtype=torch.float32)


def test_score_metrics_by_hand() -> None:
    group_one = [0.1] * 24 + [0.9]  # max 0.9
    group_two = [0.2] * 25  # max 0.2
    metrics = score_metrics(group_one + group_two, hit_threshold=0.5)
    assert metrics["score"] == pytest.approx((24 * 0.1 + 0.9 + 25 * 0.2) / 50)
    assert metrics["score_max_at_25"] == pytest.approx((0.9 + 0.2) / 2)
    assert metrics["num_hits"] == 1


def test_unscorable_samples_are_left_out_and_counted() -> None:
    nan = float("nan")
    group_one = [nan] * 24 + [0.5]  # only one scored sample: its max is 0.5
    group_two = [nan] * 25  # nothing scored: no max
    metrics = score_metrics(group_one + group_two, hit_threshold=0.4)
    assert metrics["score"] == 0.5 and metrics["score_max_at_25"] == 0.5
    assert metrics["num_hits"] == 1 and metrics["num_unscored"] == 49
    with pytest.raises(ValueError, match="could not score any"):
        score_metrics([nan] * 25, hit_threshold=0.5)


def test_hits_count_strictly_above_the_threshold() -> None:
    metrics = score_metrics([0.5] * 24 + [0.51], hit_threshold=0.5)
    assert metrics["num_hits"] == 1


@pytest.mark.parametrize("n", [0, 24, 30])
def test_score_max_at_25_needs_a_multiple_of_25(n: int) -> None:
    with pytest.raises(ValueError, match="multiple of 25"):
        score_metrics([0.0] * n, hit_threshold=0.5)


def test_next_token_nll_by_hand() -> None:
    # Two-token vocabulary, uniform logits: every next-token NLL is log 2.
    logits = torch.zeros(1, 3, 2)
    input_ids = torch.tensor([[0, 1, 1]])
    nll = next_token_nll(logits, input_ids)
    assert nll.shape == (1, 2)
    assert torch.allclose(nll, torch.full((1, 2), torch.log(torch.tensor(2.0)).item()))
    # Logits that put all mass on the right token give ~0 loss, MLE averages per token.
    sharp = torch.tensor([[[0.0, 20.0], [0.0, 20.0], [0.0, 0.0]]])
    loss, metrics = MLE().loss(sharp, input_ids, torch.zeros(1, 3))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert set(metrics) == {"train/lm_loss"}


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=64)
    return GPT2LMHeadModel(config).eval(), tokenizer


def test_heldout_loss_matches_the_models_own_loss(tiny_model) -> None:
    model, _ = tiny_model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    blocks = ids
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert heldout_lm_loss(model, blocks, batch_size=2, placement=CPU) == pytest.approx(
        expected, rel=1e-5
    )


def test_samples_are_seeded_bounded_and_leave_the_global_rng_alone(tiny_model) -> None:
    model, tokenizer = tiny_model
    cfg = OmegaConf.create(
        {"num_samples": 6, "batch_size": 4, "max_new_tokens": 5, "temperature": 1.0, "top_p": 0.9}
    )
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_samples(model, tokenizer, [""] * 6, cfg, CPU, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    second = generate_samples(model, tokenizer, [""] * 6, cfg, CPU, seed=7)
    assert first.completions == second.completions
    assert len(first.completions) == 6 and all(0 <= n <= 5 for n in first.lengths)
    assert any(first.completions)


def test_left_padded_prompts_generate_as_if_alone(tiny_model) -> None:
    """A batch of prompts of different lengths, left-padded, continues each prompt exactly as
    that prompt alone would (near-zero temperature makes sampling greedy)."""
    model, tokenizer = tiny_model
    cfg = OmegaConf.create(
        {"batch_size": 8, "max_new_tokens": 6, "temperature": 1e-4, "top_p": 1.0}
    )
    prompts = ["def f(x):\n", "A much longer prompt with many more tokens in it than the other"]
    together = generate_samples(model, tokenizer, prompts, cfg, CPU, seed=0)
    alone = [generate_samples(model, tokenizer, [p], cfg, CPU, seed=0) for p in prompts]
    assert together.prompts == prompts
    assert together.completions == [a.completions[0] for a in alone]


def test_left_padding_layout(tiny_model) -> None:
    _, tokenizer = tiny_model
    ids, mask = left_padded_prompts(["", "Hello there"], tokenizer, torch.device("cpu"))
    hello = tokenizer.encode("Hello there", add_special_tokens=False)
    assert ids.shape == (2, 1 + len(hello))
    assert ids[0, -1] == tokenizer.eos_token_id and mask[0].sum() == 1 and mask[0, -1] == 1
    assert ids[1].tolist() == [tokenizer.eos_token_id, *hello] and mask[1].all()


def test_sequence_logprobs_by_hand(tiny_model) -> None:
    model, tokenizer = tiny_model
    eos = tokenizer.eos_token_id
    sequences = [[5, 6, 7], [8]]
    got = sequence_logprobs(model, sequences, eos, (), batch_size=2, placement=CPU)
    for seq, value in zip(sequences, got, strict=True):
        ids = torch.tensor([[eos, *seq]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        expected = sum(logp[t, token].item() for t, token in enumerate(seq))
        assert value.item() == pytest.approx(expected, abs=1e-4)


def test_kl_is_zero_to_itself_and_positive_to_another_model(tiny_model) -> None:
    model, tokenizer = tiny_model
    reference = KLReference.sample(model, tokenizer, 8, 6, 4, CPU, seed=0)
    assert len(reference.sequences) == 8
    assert reference.kl(model, tokenizer.eos_token_id, (), 4, CPU) == pytest.approx(0, abs=1e-5)
    # A peaked model (logits x 50) gives the reference's near-uniform samples far less mass.
    other = GPT2LMHeadModel(model.config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.lm_head.weight.mul_(50.0)
    assert reference.kl(other, tokenizer.eos_token_id, (), 4, CPU) > 10.0


def test_distinct_n_by_hand() -> None:
    texts = ["a b a b", "a c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # {a, b, c} of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # {ab, ba, ac} of ab ba ab ac
    assert distinct_n(["", "x"], 2) == 0.0


def test_expected_max_over_25_is_exact_and_its_interval_holds_it() -> None:
    import itertools

    import numpy as np

    from phf.evaluation import expected_max, expected_max_interval

    rng = np.random.default_rng(0)
    few = rng.random(7)
    by_hand = np.mean([max(c) for c in itertools.combinations(few, 3)])
    assert expected_max(few, 3) == pytest.approx(by_hand)
    assert expected_max(np.array([0.1] * 30 + [0.9]), 25) == pytest.approx(0.1 + 0.8 * 25 / 31)
    assert np.isnan(expected_max(few, 8))  # fewer samples than the group
    scores = rng.beta(1, 10, size=100)
    low, high = expected_max_interval(scores, 25)
    assert low < expected_max(scores, 25) < high
    assert expected_max_interval(scores, 25) == (low, high)  # seeded


def test_hit_rate_and_expected_max_in_score_metrics() -> None:
    metrics = score_metrics([0.1] * 24 + [0.9] + [0.2] * 25, hit_threshold=0.5)
    assert metrics["hit_rate"] == pytest.approx(1 / 50)
    assert metrics["expected_max_at_25/ci_low"] <= metrics["expected_max_at_25"]
    assert metrics["expected_max_at_25"] <= metrics["expected_max_at_25/ci_high"]
    # Half of the 25-subsets of these 50 hold the 0.9: the expected maximum is near 0.55.
    assert metrics["expected_max_at_25"] == pytest.approx(0.9 * 0.5 + 0.2 * 0.5, abs=0.01)
