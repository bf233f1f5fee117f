"""The optimization core under every stage (phf/training.py): decay groups, accumulation,
clipping of trainable parameters, the non-finite check and the fp16 loss scaler."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from phf.distributed import SINGLE_PROCESS
from phf.hardware import Placement
from phf.training import NonFiniteLossError, Optimization, check_divisible, optimizer_groups
from tests.conftest import TINY_RUN

CPU = Placement(torch.device("cpu"), torch.float32)
TRAIN = OmegaConf.create(
    {
        "lr": 0.1,
        "adam_betas": [0.9, 0.999],
        "weight_decay": 0.1,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
    }
)


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))


def test_matrices_decay_and_biases_and_gains_do_not() -> None:
    params = list(model().parameters())
    decay, no_decay = optimizer_groups(params, 0.1)
    assert [p.shape for p in decay["params"]] == [(3, 4), (1, 3)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # two biases, the LayerNorm's gain and bias


def test_micro_batches_give_the_whole_batchs_gradient() -> None:
    inputs, targets = torch.randn(6, 4), torch.randn(6, 1)

    def gradients(split: int) -> list[torch.Tensor]:
        net = model()
        core = Optimization([net], TRAIN, CPU, 10, SINGLE_PROCESS, "test")

        def piece_loss(rows: slice) -> tuple[torch.Tensor, dict]:
            error = (net(inputs[rows]) - targets[rows]) ** 2
            return error.sum(), {"error": error.detach().sum()}

        pieces = [slice(i, i + split) for i in range(0, 6, split)]
        sums = core.accumulate(net, pieces, piece_loss, denominator=6)
        assert sums["loss"] == pytest.approx(sums["error"])
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(gradients(6), gradients(2), strict=True):
        torch.testing.assert_close(a, b)


def test_clipping_counts_trainable_parameters_only() -> None:
    net = model()
    net[0].requires_grad_(False)
    core = Optimization([net], TRAIN, CPU, 10, SINGLE_PROCESS, "test")
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)  # the frozen layer's would dominate the norm
    trained = [p for p in net.parameters() if p.requires_grad]
    expected = torch.cat([torch.full((p.numel(),), 100.0) for p in trained]).norm()
    frozen_before = net[0].weight.clone()
    update = core.step(1.0, "step 1")
    assert float(update["train/grad_norm"]) == pytest.approx(float(expected))
    assert torch.equal(net[0].weight, frozen_before)
    assert update["train/lr"] == 0.1 and "train/loss_scale" not in update


def test_a_non_finite_loss_stops_before_the_weights_move() -> None:
    net = model()
    core = Optimization([net], TRAIN, CPU, 10, SINGLE_PROCESS, "DPO")
    before = [p.clone() for p in net.parameters()]
    net(torch.randn(2, 4)).sum().backward()
    with pytest.raises(NonFiniteLossError, match=r"the DPO loss is nan at step 3; lower train.lr"):
        core.step(float("nan"), "step 3")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(p.grad is None for p in net.parameters())


def test_a_batch_that_processes_cannot_share_is_refused() -> None:
    from phf.distributed import DistributedContext

    with pytest.raises(ValueError, match=r"ppo.mini_batch_size=6 must be a multiple of the 4"):
        check_divisible("ppo.mini_batch_size", 6, DistributedContext(0, 4, 0), "minibatches")
    check_divisible("ppo.mini_batch_size", 8, DistributedContext(0, 4, 0), "minibatches")


def test_fp16_loss_scaling_skips_an_overflowing_reward_model_step_and_lowers_the_scale(
    compose_cfg,
) -> None:
    """The core driven with an enabled GradScaler (torch's CPU one: fp16 autocast needs a GPU)
    in the reward stage: a scale so large that the gradients overflow skips the update and
    halves the scale, until the scale fits and the weights move."""
    from phf.stages.reward import RewardStage

    cfg = compose_cfg([*TINY_RUN, "objective=reward", "train.max_steps=20"])
    stage = RewardStage.build(cfg, CPU, SINGLE_PROCESS)
    core = stage.optimization
    core.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    weights = lambda: [p.detach().clone() for p in core.params]  # noqa: E731
    scales, moved = [], []
    for _ in range(12):
        before = weights()
        metrics = stage.step()
        scales.append(metrics["train/loss_scale"])
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, weights(), strict=True)))
        if moved[-1]:
            break
    assert not moved[0] and moved[-1]  # skipped while overflowing, then stepped
    assert scales[0] == 2.0**126  # halved after the first overflow
    assert all(b == a / 2 for a, b in zip(scales, scales[1:-1], strict=False))
    assert all(torch.isfinite(p).all() for p in core.params)
    assert stage.steps_done == len(scales)
