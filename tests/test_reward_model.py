"""The reward model (phf/reward_model.py): its losses and metrics against hand computations,
encoding and truncation, the reward read at the last real token whatever the padding, the same
rewards from Hugging Face's AutoModelForSequenceClassification, encoders, and saving and
loading."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from phf.config import Overlong
from phf.data.preferences import Comparison
from phf.hardware import Placement
from phf.losses.preference import comparison_loss, comparison_metrics
from phf.models import position_ids
from phf.reward_model import (
    REWARD_CONFIG_KEY,
    EncodedComparison,
    EncodingStats,
    RewardModel,
    comparison_rewards,
    distinct_pad_token,
    encode_comparisons,
    fit,
    score_texts,
)
from phf.sequences import build_batch
from phf.tokenizer import load_tokenizer
from tests.conftest import tiny_encoder

CPU = Placement(device=torch.device("cpu"), dtype=torch.float32)
EOS = 0  # the tiny model's EOS, also its pad id


def neg_log_sigmoid(d: float) -> float:
    """-log sigmoid(d) = log(1 + exp(-d))."""
    return math.log1p(math.exp(-d))


# --- preference_loss -----------------------------------------------------------------------


def test_pairwise_loss_by_hand_with_best_index_one_and_margins() -> None:
    rewards = torch.tensor([[1.0, 0.5], [0.2, 0.9], [-0.3, 0.4]])
    valid = torch.ones(3, 2, dtype=torch.bool)
    best = torch.tensor([0, 1, 0])
    margins = torch.tensor([0.0, 0.3, 0.0])
    loss = comparison_loss(rewards, valid, best, margins)
    expected = (
        neg_log_sigmoid(1.0 - 0.5 - 0.0)
        + neg_log_sigmoid(0.9 - 0.2 - 0.3)  # best is index 1: chosen 0.9, rejected 0.2
        + neg_log_sigmoid(-0.3 - 0.4)
    ) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_without_margins_is_two_way_cross_entropy() -> None:
    rewards = torch.tensor([[1.0, 0.5], [0.2, 0.9]])
    loss = comparison_loss(
        rewards, torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 1]), torch.zeros(2)
    )
    # -log softmax(r)[best] by hand.
    row0 = -(1.0 - math.log(math.exp(1.0) + math.exp(0.5)))
    row1 = -(0.9 - math.log(math.exp(0.2) + math.exp(0.9)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_n_way_loss_by_hand_with_ragged_valid_mask() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 100.0]])  # 100: not a real response
    valid = torch.tensor([[True, True, True], [True, True, False]])
    best = torch.tensor([2, 0])
    loss = comparison_loss(rewards, valid, best, torch.zeros(2))
    row0 = -(3.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0)))
    row1 = -(0.5 - math.log(math.exp(0.5) + math.exp(-1.0)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_n_way_loss_gradient_is_finite_with_invalid_entries() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    comparison_loss(rewards, valid, torch.tensor([2, 0]), torch.zeros(2)).backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[1, 2].item() == 0.0


def test_center_coef_adds_squared_sums_of_real_rewards() -> None:
    # Pairs: + coef * mean((r0 + r1)^2).
    rewards = torch.tensor([[1.0, 0.5], [0.2, 0.9]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    best, margins = torch.tensor([0, 0]), torch.zeros(2)
    base = (neg_log_sigmoid(0.5) + neg_log_sigmoid(-0.7)) / 2
    loss = comparison_loss(rewards, valid, best, margins, center_coef=0.01)
    assert loss.item() == pytest.approx(base + 0.01 * (1.5**2 + 1.1**2) / 2, rel=1e-6)
    # N-way with a padded entry: the pad's value is not part of its row's sum.
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 100.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    best = torch.tensor([2, 0])
    base = comparison_loss(rewards, valid, best, torch.zeros(2)).item()
    loss = comparison_loss(rewards, valid, best, torch.zeros(2), center_coef=0.1)
    assert loss.item() == pytest.approx(base + 0.1 * (6.0**2 + (-0.5) ** 2) / 2, rel=1e-6)


# --- preference_metrics --------------------------------------------------------------------


def test_metrics_on_pairs_ties_are_wrong() -> None:
    rewards = torch.tensor([[1.0, 0.5], [0.3, 0.3], [0.2, 0.9], [0.1, 0.4]])
    valid = torch.ones(4, 2, dtype=torch.bool)
    best = torch.tensor([0, 0, 0, 1])
    metrics = comparison_metrics(rewards, valid, best)
    # right, tie (wrong), wrong, right
    assert metrics["accuracy"].item() == pytest.approx(2 / 4)
    assert metrics["margin"].item() == pytest.approx((0.5 + 0.0 - 0.7 + 0.3) / 4)
    flat = [1.0, 0.5, 0.3, 0.3, 0.2, 0.9, 0.1, 0.4]
    assert metrics["reward_mean"].item() == pytest.approx(statistics.mean(flat))
    assert metrics["reward_std"].item() == pytest.approx(statistics.stdev(flat), rel=1e-5)


def test_metrics_on_ragged_n_way_rows() -> None:
    rewards = torch.tensor([[2.0, 1.0, 0.5], [1.0, 0.0, 50.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    best = torch.tensor([0, 1, 0])
    metrics = comparison_metrics(rewards, valid, best)
    # row 0: 2 beats 1 and 0.5, margin 2 - 0.75 = 1.25
    # row 1: 0 loses to 1 (50 is no response), margin 0 - 1 = -1
    # row 2: 1 ties 1: wrong, margin 1 - 0.5 = 0.5
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["margin"].item() == pytest.approx((1.25 - 1.0 + 0.5) / 3)
    flat = [2.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert metrics["reward_mean"].item() == pytest.approx(statistics.mean(flat))
    assert metrics["reward_std"].item() == pytest.approx(statistics.stdev(flat), rel=1e-5)


def test_metrics_of_a_single_reward_have_zero_std() -> None:
    metrics = comparison_metrics(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), torch.tensor([0])
    )
    assert metrics["reward_mean"].item() == 1.0
    assert metrics["reward_std"].item() == 0.0


# --- encoding ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """The builtin tokenizer with the reward model's own pad token (as objective=reward)."""
    tokenizer = load_tokenizer("builtin")
    distinct_pad_token(tokenizer)
    return tokenizer


def tiny_reward_model(tokenizer, max_length: int = 64) -> RewardModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_layer=1,
        n_embd=16,
        n_head=2,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=1,
    )
    return RewardModel(GPT2ForSequenceClassification(config), tokenizer, max_length).eval()


def test_a_causal_model_reads_eos_prompt_response_eos(tokenizer) -> None:
    model = tiny_reward_model(tokenizer)
    body = tokenizer.encode("Hello there, friend.", add_special_tokens=False)
    assert model.causal and not model.adds_special_tokens
    assert model.encode("Hello there,", " friend.", tokenizer) == [EOS, *body, EOS]
    assert tokenizer.pad_token_id not in (EOS, None)  # a pad of its own: EOS is read, not padding
    foreign = RewardModel(model.model, tokenizer, 64, final_eos=False)  # not trained by phf
    assert foreign.encode("Hello there,", " friend.", tokenizer) == [EOS, *body]


def test_an_encoder_reads_its_own_special_tokens(tmp_path: Path) -> None:
    encoder, encoder_tokenizer = tiny_encoder(tmp_path)
    model = RewardModel(encoder, encoder_tokenizer, 32)
    ids = model.encode("Hello", " there", encoder_tokenizer)
    assert not model.causal and model.adds_special_tokens
    assert ids[0] == encoder_tokenizer.cls_token_id and ids[-1] == encoder_tokenizer.sep_token_id


def test_fit_keeps_the_first_token_and_the_last_max_length_minus_one() -> None:
    ids = [0, 11, 12, 13, 14, 15, 0]
    assert fit(ids, 4) == [0, 14, 15, 0]
    assert fit(ids, 2) == [0, 0]
    assert fit(ids, 7) == ids
    assert fit(ids, 100) == ids
    assert fit([0, 5, 0], 3) == [0, 5, 0]


def test_encode_comparisons_drop_and_truncate(tokenizer) -> None:
    max_length = 12
    model = tiny_reward_model(tokenizer, max_length=max_length)

    def length(prompt: str, response: str) -> int:
        return len(model.full_ids(prompt, response, tokenizer))

    long_text = " and then another word" * 10
    comparisons = [
        Comparison("Q:", (" yes", " no"), 0, 0.5, "row 1"),
        Comparison("Q:", (" fine", long_text), 1, 0.0, "row 2"),
        Comparison("Q:", (long_text, long_text + " more", " ok"), 2, 0.0, "row 3"),
    ]
    assert max(length("Q:", r) for r in comparisons[0].responses) <= max_length
    assert length("Q:", long_text) > max_length

    kept, stats = encode_comparisons(comparisons, model, tokenizer, "drop")
    assert stats == EncodingStats(comparisons=3, truncated=0, dropped=2)
    assert len(kept) == 1
    assert kept[0].sequences == [
        model.encode("Q:", " yes", tokenizer),
        model.encode("Q:", " no", tokenizer),
    ]
    assert (kept[0].best, kept[0].margin) == (0, 0.5)

    kept, stats = encode_comparisons(comparisons, model, tokenizer, Overlong.truncate)
    assert stats == EncodingStats(comparisons=3, truncated=2, dropped=0)
    assert [c.best for c in kept] == [0, 1, 2]
    for comparison in kept[1:]:
        for sequence in comparison.sequences:
            assert len(sequence) <= max_length and sequence[0] == EOS == sequence[-1]
    # Short responses of a truncated comparison stay whole; long ones keep their end.
    assert kept[1].sequences[0] == model.encode("Q:", " fine", tokenizer)
    full = model.full_ids("Q:", long_text, tokenizer)
    assert kept[1].sequences[1] == [full[0], *full[-(max_length - 1) :]]
    assert Overlong.drop == "drop"  # the config's enum works where a string is compared


def test_build_batch_pads_on_either_side_and_marks_what_counts(tokenizer) -> None:
    right = build_batch([[0, 5, 6, 0], [0, 7]], pad_id=3, counted_from=[2, 1])
    assert right.input_ids.tolist() == [[0, 5, 6, 0], [0, 7, 3, 3]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right.counted.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert right.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    left = build_batch([[0, 5, 6, 0], [0, 7]], pad_id=3, left=True, counted_from=[2, 1])
    assert left.input_ids.tolist() == [[0, 5, 6, 0], [3, 3, 0, 7]]
    assert left.counted.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert left.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


# --- the model ----------------------------------------------------------------------------


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tokenizer) -> None:
    model = tiny_reward_model(tokenizer)
    a = [EOS, 5, 7, 9, 11, EOS]
    b = [EOS, 3, EOS]
    with torch.no_grad():
        alone_a = model(torch.tensor([a]), torch.ones(1, len(a), dtype=torch.long))
        alone_b = model(torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
        pad = [EOS] * (len(a) - len(b))  # padded even with EOS's id: the mask decides
        right = model(
            torch.tensor([a, b + pad]),
            torch.tensor([[1] * len(a), [1] * len(b) + [0] * len(pad)]),
        )
        left = model(
            torch.tensor([a, pad + b]),
            torch.tensor([[1] * len(a), [0] * len(pad) + [1] * len(b)]),
        )
        # Reading a padded position would give another number.
        padded_read = model(torch.tensor([b + pad]), torch.ones(1, len(a), dtype=torch.long))
    assert right.shape == left.shape == (2,)
    assert right.dtype == torch.float32
    expected = torch.cat([alone_a, alone_b])
    assert torch.allclose(right, expected, atol=1e-5)
    assert torch.allclose(left, expected, atol=1e-5)
    assert not torch.allclose(padded_read, alone_b, atol=1e-4)


def test_hugging_faces_own_model_gives_phfs_rewards(tmp_path: Path, tokenizer) -> None:
    """The saved model, loaded by AutoModelForSequenceClassification as TRL loads it, gives the
    rewards phf computes: right-padded as is, left-padded with the position ids phf passes."""
    model = tiny_reward_model(tokenizer)
    cfg = OmegaConf.create({"seed": 0})
    model.save(tmp_path / "rm", tokenizer, cfg, {})
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    sequences = [
        model.encode("A prompt", " and a longer response here", tokenizer),
        model.encode("Q:", " short", tokenizer),
    ]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    right = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    left = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
    left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    with torch.no_grad():
        phf_rewards = model(right, right_mask)
        hf_right = hf(input_ids=right, attention_mask=right_mask).logits[:, 0]
        hf_left = hf(
            input_ids=left, attention_mask=left_mask, position_ids=position_ids(left_mask)
        ).logits[:, 0]
        phf_left = model(left, left_mask)
    assert torch.allclose(hf_right, phf_rewards, atol=1e-5)
    assert torch.allclose(hf_left, phf_rewards, atol=1e-5)
    assert torch.allclose(phf_left, phf_rewards, atol=1e-5)


def test_an_encoder_pools_its_own_way_whatever_the_padding(tmp_path: Path) -> None:
    encoder, encoder_tokenizer = tiny_encoder(tmp_path)
    model = RewardModel(encoder.eval(), encoder_tokenizer, 32).eval()
    short = model.encode("Hi", " there", encoder_tokenizer)
    long = model.encode("A longer prompt", " with a longer answer", encoder_tokenizer)
    pad = encoder_tokenizer.pad_token_id
    with torch.no_grad():
        alone = model(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        batch = model(
            torch.tensor([long, short + [pad] * (len(long) - len(short))]),
            torch.tensor([[1] * len(long), [1] * len(short) + [0] * (len(long) - len(short))]),
        )
        hf = encoder(input_ids=torch.tensor([short])).logits[:, 0]
    assert torch.allclose(batch[1:], alone, atol=1e-5) and torch.allclose(alone, hf, atol=1e-5)


def test_comparison_rewards_lays_out_ragged_rows(tokenizer) -> None:
    model = tiny_reward_model(tokenizer)
    seqs = [[EOS, 1, EOS], [EOS, 2, 3, EOS], [EOS, 4, EOS], [EOS, 5, 6, 7, EOS], [EOS, 8, EOS]]
    batch = [EncodedComparison(seqs[:3], 0, 0.0), EncodedComparison(seqs[3:], 1, 0.0)]
    with torch.no_grad():
        rewards, valid = comparison_rewards(model, batch, EOS, CPU)
        alone = [
            model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in seqs
        ]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    assert rewards[0].tolist() == pytest.approx(alone[:3], abs=1e-5)
    assert rewards[1, :2].tolist() == pytest.approx(alone[3:], abs=1e-5)
    assert rewards[1, 2].item() == 0.0


def test_save_and_load_round_trip(tmp_path: Path, tokenizer) -> None:
    model = tiny_reward_model(tokenizer, max_length=48)
    model.gain, model.bias = 2.5, -0.75
    cfg = OmegaConf.create({"reward": {"max_length": 48}, "seed": 0})
    model.save(tmp_path / "rm", tokenizer, cfg, {"normalized": True, "accuracy": 0.9})
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config[REWARD_CONFIG_KEY] == {
        "gain": 2.5,
        "bias": -0.75,
        "max_length": 48,
        "final_eos": True,
        "normalized": True,
        "accuracy": 0.9,
    }
    assert AutoConfig.from_pretrained(tmp_path / "rm").num_labels == 1

    loaded, loaded_tokenizer = RewardModel.load(str(tmp_path / "rm"))
    loaded.eval()
    assert (loaded.gain, loaded.bias, loaded.max_length) == (2.5, -0.75, 48)
    assert loaded.normalized and not tiny_reward_model(tokenizer).normalized
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    input_ids = torch.tensor([[0, 100, 200, 300, 0], [0, 400, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids, mask), model(input_ids, mask))


def test_a_model_that_is_not_a_reward_model_is_refused(tmp_path: Path, tokenizer) -> None:
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="is not a reward model.*GPT2LMHeadModel"):
        RewardModel.load(str(tmp_path / "lm"))


def test_score_texts_applies_gain_and_bias(tokenizer) -> None:
    model = tiny_reward_model(tokenizer)
    model.gain, model.bias = 2.0, -0.5
    prompts = ["Hello", "A much longer prompt, with words", ""]
    responses = [" world.", " and a reply.", "Just a response"]
    with torch.no_grad():
        alone = []
        for p, r in zip(prompts, responses, strict=True):
            ids = model.encode(p, r, tokenizer)
            alone.append(
                model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
            )
    model.train()
    raw = score_texts(model, tokenizer, prompts, responses, 2, CPU, normalized=False)
    normalized = score_texts(model, tokenizer, prompts, responses, 2, CPU)
    assert model.training  # restored
    assert raw.tolist() == pytest.approx(alone, abs=1e-5)
    assert normalized.tolist() == pytest.approx([2.0 * x - 0.5 for x in alone], abs=1e-5)
    assert model.normalize(torch.tensor([1.0, -2.0])).tolist() == [1.5, -4.5]
