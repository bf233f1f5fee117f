"""PPO's arithmetic (phf/losses/ppo.py) against hand computations: masked statistics, the per-token
KL penalty and sequence reward, GAE under either padding side, the clipped losses, entropy and
the KL coefficient's controllers."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from phf.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from phf.models import last_token_index

GARBAGE = 99.0  # on padding: must never reach a result


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- masked statistics ---------------------------------------------------------------------

VALUES = t([[1.0, 2.0, GARBAGE], [4.0, GARBAGE, GARBAGE]])
MASK = t([[1, 1, 0], [1, 0, 0]])
REAL = [1.0, 2.0, 4.0]


def test_masked_mean_ignores_padding() -> None:
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7.0 / 3.0)


def test_masked_var_is_unbiased() -> None:
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 42/9; divided by n - 1 = 2.
    assert masked_var(VALUES, MASK).item() == pytest.approx(7.0 / 3.0)
    assert masked_var(VALUES, MASK).item() == pytest.approx(statistics.variance(REAL))


def test_masked_whiten_shifts_and_scales_and_keeps_padding_zero() -> None:
    mean, std = 7.0 / 3.0, math.sqrt(7.0 / 3.0 + 1e-8)
    whitened = masked_whiten(VALUES, MASK)
    expected = t([[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]])
    assert torch.allclose(whitened, expected)
    # Unit variance, zero mean over the real entries.
    assert masked_mean(whitened, MASK).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(whitened, MASK).item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_without_shift_keeps_the_mean() -> None:
    mean, std = 7.0 / 3.0, math.sqrt(7.0 / 3.0 + 1e-8)
    whitened = masked_whiten(VALUES, MASK, shift_mean=False)
    expected = t(
        [
            [(1 - mean) / std + mean, (2 - mean) / std + mean, 0.0],
            [(4 - mean) / std + mean, 0.0, 0.0],
        ]
    )
    assert torch.allclose(whitened, expected)
    assert masked_mean(whitened, MASK).item() == pytest.approx(mean)


# --- last real token ---------------------------------------------------------------------


def test_last_token_index_right_and_left_padding() -> None:
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [1, 1, 1, 1, 1],  # none
            [1, 0, 0, 0, 0],  # a single real token
            [0, 0, 0, 0, 1],  # a single real token, left padded
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 4, 0, 4]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 4, 0, 4]


# --- token rewards ---------------------------------------------------------------------


def test_token_rewards_right_padding() -> None:
    logprobs = t([[-1.0, -2.0, -0.5, GARBAGE], [-0.1, -0.2, -0.3, -0.4]])
    ref_logprobs = t([[-1.5, -1.0, -0.5, -GARBAGE], [-0.3, -0.2, -0.1, -0.8]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = t([2.0, -1.0])
    rewards, kl = token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef=0.1)
    # kl = logp - ref on real tokens: row 0: 0.5, -1.0, 0.0, (pad); row 1: 0.2, 0.0, -0.2, 0.4.
    assert torch.allclose(kl, t([[0.5, -1.0, 0.0, 0.0], [0.2, 0.0, -0.2, 0.4]]))
    expected = t(
        [
            [-0.05, 0.1, 0.0 + 2.0, 0.0],  # the score on the last real token, never on the pad
            [-0.02, 0.0, 0.02, -0.04 - 1.0],
        ]
    )
    assert torch.allclose(rewards, expected)


def test_token_rewards_left_padding() -> None:
    logprobs = t([[GARBAGE, GARBAGE, -1.0, -2.0], [-0.1, -0.2, -0.3, -0.4]])
    ref_logprobs = t([[0.0, -GARBAGE, -1.5, -1.0], [-0.3, -0.2, -0.1, -0.8]])
    mask = t([[0, 0, 1, 1], [1, 1, 1, 1]])
    scores = t([3.0, 0.5])
    rewards, kl = token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef=0.2)
    assert torch.allclose(kl, t([[0.0, 0.0, 0.5, -1.0], [0.2, 0.0, -0.2, 0.4]]))
    expected = t([[0.0, 0.0, -0.1, 0.2 + 3.0], [-0.04, 0.0, 0.04, -0.08 + 0.5]])
    assert torch.allclose(rewards, expected)
    assert rewards[0, :2].abs().sum().item() == 0.0  # padding gets nothing


def test_token_rewards_score_lands_before_trailing_pads_with_zero_kl_coef() -> None:
    mask = t([[1, 0, 0], [0, 1, 0]])
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    rewards, _ = token_rewards(zeros, zeros, t([1.0, 2.0]), mask, kl_coef=0.0)
    assert torch.allclose(rewards, t([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))


# --- GAE ---------------------------------------------------------------------------------

GAMMA, LAM = 0.9, 0.8
R = [0.1, -0.2, 1.0]
V = [0.5, 0.3, 0.4]


def hand_gae() -> tuple[list[float], list[float]]:
    # delta_t = r_t + gamma V_{t+1} - V_t (V_3 = 0); A_t = delta_t + gamma lam A_{t+1} (A_3 = 0).
    d2 = 1.0 - 0.4  # 0.6
    a2 = d2
    d1 = -0.2 + 0.9 * 0.4 - 0.3  # -0.14
    a1 = d1 + 0.72 * a2  # 0.292
    d0 = 0.1 + 0.9 * 0.3 - 0.5  # -0.13
    a0 = d0 + 0.72 * a1  # 0.08024
    advantages = [a0, a1, a2]
    return advantages, [a + v for a, v in zip(advantages, V, strict=True)]


def test_gae_by_hand_on_a_three_token_episode() -> None:
    advantages, returns = gae(t([R]), t([V]), t([[1, 1, 1]]), GAMMA, LAM)
    hand_advantages, hand_returns = hand_gae()
    assert hand_advantages == pytest.approx([0.08024, 0.292, 0.6])
    assert advantages[0].tolist() == pytest.approx(hand_advantages)
    assert returns[0].tolist() == pytest.approx(hand_returns)
    assert hand_returns == pytest.approx([0.58024, 0.592, 1.0])


def test_gae_right_padded_equals_unpadded() -> None:
    rewards = t([[*R, GARBAGE, GARBAGE], [0.0, 0.0, 0.0, 0.0, 1.0]])
    values = t([[*V, GARBAGE, -GARBAGE], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)
    hand_advantages, hand_returns = hand_gae()
    assert advantages[0].tolist() == pytest.approx([*hand_advantages, 0.0, 0.0])
    assert returns[0].tolist() == pytest.approx([*hand_returns, 0.0, 0.0])
    # Row 1 (zero values, one reward of 1 at the end): A_t = (gamma lam)^(4 - t).
    assert advantages[1].tolist() == pytest.approx([0.72**k for k in (4, 3, 2, 1, 0)])


def test_gae_left_padded_equals_unpadded() -> None:
    rewards = t([[GARBAGE, GARBAGE, *R]])
    values = t([[GARBAGE, -GARBAGE, *V]])
    mask = t([[0, 0, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)
    hand_advantages, hand_returns = hand_gae()
    assert advantages[0].tolist() == pytest.approx([0.0, 0.0, *hand_advantages])
    assert returns[0].tolist() == pytest.approx([0.0, 0.0, *hand_returns])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    advantages, returns = gae(t([R]), t([V]), t([[1, 1, 1]]), 1.0, 1.0)
    to_go = [sum(R[i:]) for i in range(3)]
    assert returns[0].tolist() == pytest.approx(to_go)
    assert advantages[0].tolist() == pytest.approx([g - v for g, v in zip(to_go, V, strict=True)])


# --- clipped losses ------------------------------------------------------------------------


def test_policy_loss_clipping_by_hand() -> None:
    eps = 0.2
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    advantages = [1.0, 1.0, -1.0, -1.0, 2.0]
    # max(-A r, -A clip(r)) per token:
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2  clipped term wins
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   r=1.5, A=-1: max( 1.5,  1.2) =  1.5
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8  clipped term wins
    #   r=1.1, A=+2: max(-2.2, -2.2) = -2.2  a tie is not clipping
    per_token = [-1.2, -0.5, 1.5, 0.8, -2.2]
    old_logprobs = t([[-1.0] * 5 + [-3.0]])
    logprobs = t([[-1.0 + math.log(r) for r in ratios] + [GARBAGE]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, metrics = policy_loss(logprobs, old_logprobs, t([[*advantages, GARBAGE]]), mask, eps)
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert loss.item() == pytest.approx(-0.32)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 5)
    assert metrics["approxkl"].item() == pytest.approx(
        0.5 * sum(math.log(r) ** 2 for r in ratios) / 5
    )
    assert metrics["ratio"].item() == pytest.approx(sum(ratios) / 5)
    assert metrics["ratio"].item() == pytest.approx(1.02)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    logprobs = t([[-0.7, -1.3], [-2.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    loss, metrics = policy_loss(logprobs, logprobs, t([[0.5, -1.5], [2.0, 7.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(-(0.5 - 1.5 + 2.0) / 3)
    assert metrics["clipfrac"].item() == 0.0
    assert metrics["approxkl"].item() == 0.0
    assert metrics["ratio"].item() == pytest.approx(1.0)


def test_value_loss_clipped_and_unclipped_by_hand() -> None:
    # cliprange_value 0.2 around old values of 0:
    #   V=1.0, R=0.5: clipped V 0.2; errors 0.25 (unclipped), 0.09 (clipped) -> 0.25
    #   V=1.0, R=2.0: clipped V 0.2; errors 1.00, 3.24 -> 3.24 (the clipped error wins)
    #   V=0.1, R=1.0: within range; errors 0.81, 0.81 -> 0.81 (a tie is not clipping)
    values = t([[1.0, 1.0, 0.1, GARBAGE]])
    old_values = t([[0.0, 0.0, 0.0, 0.0]])
    returns = t([[0.5, 2.0, 1.0, -GARBAGE]])
    mask = t([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old_values, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 3.24 + 0.81) / 3)
    assert metrics["clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_clips_below_the_old_value_too() -> None:
    # old 1.0, V = 0.0 -> clipped V = 0.8; R = 1.0: errors 1.0 (unclipped) and 0.04 -> 1.0.
    # old 1.0, V = 0.0 -> clipped V = 0.8; R = -1.0: errors 1.0 and 3.24 -> 3.24, clipped.
    loss, metrics = value_loss(t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1.0, -1.0]]), t([[1, 1]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 3.24) / 2)
    assert metrics["clipfrac"].item() == pytest.approx(0.5)


# --- entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 50])
def test_entropy_of_uniform_logits_is_log_k(k: int) -> None:
    logits = torch.full((2, 3, k), 4.2)
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (2, 3)
    assert torch.allclose(entropy, torch.full((2, 3), math.log(k)))


def test_entropy_of_two_outcomes_by_hand() -> None:
    # softmax([0, ln 3]) = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4).
    entropy = entropy_from_logits(torch.tensor([[0.0, math.log(3.0)]]))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_entropy_of_a_certain_outcome_is_zero() -> None:
    assert entropy_from_logits(torch.tensor([[0.0, -1e4, -1e4]])).item() == pytest.approx(0.0)


# --- KL controllers --------------------------------------------------------------------


def test_fixed_kl_controller_never_moves_where_the_adaptive_one_would() -> None:
    """Fed the KL that moves the adaptive controller both ways, the fixed one stays put."""
    fixed = FixedKLController(0.05)
    adaptive = AdaptiveKLController(value=0.05, target=6.0, horizon=64)
    values = []
    for kl in (100.0, 0.0):
        fixed.update(kl, 64)
        adaptive.update(kl, 64)
        values.append(adaptive.value)
        assert fixed.value == 0.05
    assert values[0] == pytest.approx(0.05 * 1.2) and values[1] == pytest.approx(0.05 * 1.2 * 0.8)


def test_adaptive_kl_controller_above_target_is_clipped_at_plus_02() -> None:
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    controller.update(12.0, 64)  # 12 / 6 - 1 = 1, clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))


def test_adaptive_kl_controller_below_target() -> None:
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    controller.update(3.0, 64)  # 3 / 6 - 1 = -0.5, clipped to -0.2
    assert controller.value == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    controller.update(5.4, 64)  # 5.4 / 6 - 1 = -0.1, within the clip
    assert controller.value == pytest.approx(0.1 * (1 - 0.1 * 64 / 10000))


def test_adaptive_kl_controller_two_updates_compound() -> None:
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    controller.update(6.6, 10)  # error 0.1
    controller.update(12.0, 10)  # error 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.1 * 10 / 100) * (1 + 0.2 * 10 / 100))


@pytest.mark.parametrize("kl", [math.nan, math.inf, -math.inf])
def test_adaptive_kl_controller_ignores_non_finite_kl(kl: float) -> None:
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    controller.update(kl, 64)
    assert controller.value == 0.1
