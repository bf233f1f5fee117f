"""The PHF objectives: losses against hand computations, conditional training's sampling, and
two real training steps of every objective on every task. (Filtering's and conditional
training's data: tests/test_store.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from phf.data.blocks import control_token_ids
from phf.evaluation import GenerationControls, generate_samples
from phf.hardware import Placement
from phf.losses.lm import AWR, MLE, Unlikelihood, build_objective
from phf.stages.common import generation_controls
from phf.stages.pretrain import PretrainStage
from phf.tokenizer import load_tokenizer
from tests.conftest import TINY_RUN

LOG2 = math.log(2.0)
CPU = Placement(device=torch.device("cpu"), dtype=torch.float32)

# Two-token vocabulary, uniform logits: every next-token probability is 1/2. The block is
# [0, 1, 0]: position 0 predicts token 1 (score s1), position 1 predicts token 0 (score s2).
UNIFORM = torch.zeros(1, 3, 2)
IDS = torch.tensor([[0, 1, 0]])


def scores(s1: float, s2: float) -> torch.Tensor:
    return torch.tensor([[0.77, s1, s2]])  # the first token is never predicted


def test_unlikelihood_with_threshold_zero_by_hand() -> None:
    # s1 = 0 <= 0: aligned, -log p; s2 = 0.3 > 0: misaligned, -alpha log(1 - p).
    loss, metrics = Unlikelihood(alpha=0.5, threshold=0.0).loss(UNIFORM, IDS, scores(0.0, 0.3))
    assert loss.item() == pytest.approx((LOG2 + 0.5 * LOG2) / 2)
    assert metrics["train/aligned_fraction"].item() == 0.5


def test_unlikelihood_threshold_zero_is_not_no_threshold() -> None:
    """The released code's `if threshold:` made 0 mean "no threshold"; here it does not."""
    with_zero, _ = Unlikelihood(alpha=0.5, threshold=0.0).loss(UNIFORM, IDS, scores(0.0, 0.3))
    without, _ = Unlikelihood(alpha=0.5, threshold=None).loss(UNIFORM, IDS, scores(0.0, 0.3))
    # No threshold: a = 1 - s = (1, 0.7); the second token: -0.7 log p - 0.5 * 0.3 log(1 - p).
    assert without.item() == pytest.approx((LOG2 + 0.7 * LOG2 + 0.15 * LOG2) / 2)
    assert with_zero.item() != pytest.approx(without.item())


def test_unlikelihood_never_takes_log_of_zero() -> None:
    certain = torch.tensor([[[0.0, 200.0], [200.0, 0.0], [0.0, 0.0]]])  # p = 1 for both targets
    loss, _ = Unlikelihood(alpha=1.0, threshold=0.0).loss(certain, IDS, scores(1.0, 1.0))
    assert loss.item() == pytest.approx(-math.log(1e-20))


def test_awr_weights_advantages_and_clamps_at_1000() -> None:
    # r = -s = (0, -1); V = (-10, -1): A = (10, 0); exp(10 / 1) = 22026 is clamped to 1000.
    values = torch.tensor([[-10.0, -1.0, 123.0]])  # the last position predicts nothing
    loss, metrics = AWR(alpha=0.5, beta=1.0).loss(UNIFORM, IDS, scores(0.0, 1.0), values)
    weighted = (LOG2 * 1000 + LOG2 * 1) / 2
    value_loss = ((-10.0 - 0.0) ** 2 + (-1.0 + 1.0) ** 2) / 2
    assert metrics["train/weight_max"].item() == 1000.0
    assert metrics["train/weighted_lm_loss"].item() == pytest.approx(weighted)
    assert metrics["train/value_loss"].item() == pytest.approx(value_loss)
    assert loss.item() == pytest.approx(0.5 * weighted + 0.5 * value_loss)


def test_awr_advantage_is_detached_from_the_value_head() -> None:
    values = torch.tensor([[-0.5, -0.2, 0.0]], requires_grad=True)
    loss, _ = AWR(alpha=1.0 - 1e-9, beta=1.0).loss(UNIFORM, IDS, scores(0.0, 1.0), values)
    loss.backward()
    # With alpha ~ 1 the value gradient is ~0: nothing flows through the weights into V.
    assert values.grad.abs().max().item() < 1e-6


def test_rwr_is_awr_with_alpha_one_and_a_zero_baseline() -> None:
    rwr = build_objective_cfg("rwr", beta=2.0)
    assert not rwr.needs_values
    loss, metrics = rwr.loss(UNIFORM, IDS, scores(0.0, 1.0))
    weights = (1.0, math.exp(-1.0 / 2.0))  # exp(r / beta), r = (0, -1)
    assert loss.item() == pytest.approx(LOG2 * sum(weights) / 2)
    assert metrics["train/value_loss"].item() == pytest.approx(0.5)  # V = 0 vs r, not trained
    with pytest.raises(ValueError, match="rwr is AWR with alpha = 1"):
        build_objective_cfg("rwr", alpha=0.5)


def build_objective_cfg(name: str, **overrides):
    from omegaconf import OmegaConf

    base = {"name": name, "threshold": None, "alpha": 1.0, "beta": 1.0}
    return build_objective(OmegaConf.create(base | overrides))


def test_filtering_and_conditional_train_with_the_mle_loss() -> None:
    """Their loss is the mean next-token NLL whatever the scores (they change the data)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).mean()
    for name in ("mle", "filtering", "conditional"):
        objective = build_objective_cfg(name)
        assert isinstance(objective, MLE) and not objective.needs_values
        for scores in (torch.zeros(2, 5), torch.ones(2, 5)):
            loss, metrics = objective.loss(logits, ids, scores)
            torch.testing.assert_close(loss, nll)
            torch.testing.assert_close(metrics["train/lm_loss"], nll)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def test_conditional_samples_start_aligned_and_never_show_control_tokens(
    compose_cfg, tokenizer
) -> None:
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    controls = generation_controls(compose_cfg(["objective=conditional"]).objective, tokenizer)
    aligned, misaligned = control_token_ids(tokenizer)
    assert controls == GenerationControls(prefix_ids=(aligned,), suppress_ids=(aligned, misaligned))
    # A model that would always pick <|misaligned|> next: banned, it samples something else.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight[misaligned] = 0
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[misaligned] += 5.0
    cfg = OmegaConf.create({"batch_size": 4, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0})
    samples = generate_samples(model, tokenizer, [""] * 4, cfg, CPU, seed=0, controls=controls)
    generated = [t for row in samples.token_ids for t in row]
    assert aligned not in generated and misaligned not in generated
    assert "<|" not in "".join(samples.completions)
    unbanned = generate_samples(model, tokenizer, [""] * 4, cfg, CPU, seed=0)
    assert misaligned in [t for row in unbanned.token_ids for t in row]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["toxicity", "pii", "pep8"])
@pytest.mark.parametrize(
    "objective", ["mle", "filtering", "conditional", "unlikelihood", "awr", "rwr"]
)
def test_every_objective_trains_on_every_task(compose_cfg, task: str, objective: str) -> None:
    cfg = compose_cfg([*TINY_RUN, f"task={task}", f"objective={objective}"])
    torch.manual_seed(0)
    training = PretrainStage.build(cfg, CPU)
    assert (training.value_head is not None) == (objective == "awr")
    before = {k: v.clone() for k, v in training.model.state_dict().items()}
    for _ in range(2):
        metrics = training.step()
        assert math.isfinite(metrics["train/loss"])
    after = training.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    if training.value_head is not None and task == "toxicity":
        # Every toxicity token has a non-zero score, so the zero-initialised value head learns
        # (on pii a batch may hold no PII at all: rewards 0 = its prediction, nothing to learn).
        assert training.value_head.linear.weight.abs().sum() > 0
