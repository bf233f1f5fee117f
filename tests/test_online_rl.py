"""Critic-free online RL: GRPO's and RLOO's arithmetic on hand-built numbers, prompt datasets for
every online stage, and grpo and rloo runs end to end, resumed, with weighted scorers."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from phf.data.corpus import DatasetError
from phf.data.prompts import online_prompts, rows_prompts
from phf.losses.group import (
    aggregate,
    aggregation_weight,
    clipped_objective,
    group_advantages,
    group_std,
    k3_kl,
    leave_one_out_advantages,
)
from phf.run import execute
from phf.tokenizer import load_tokenizer
from tests.conftest import TINY_RUN

# --- advantages -----------------------------------------------------------------------------------


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])  # two groups of three
    advantages = group_advantages(rewards, group=3)
    first_std = statistics.stdev([1.0, 2.0, 3.0])  # unbiased, as torch.std
    second_std = statistics.stdev([0.0, 0.0, 4.0])
    expected = [(r - 2.0) / (first_std + 1e-4) for r in (1, 2, 3)]
    expected += [(r - 4 / 3) / (second_std + 1e-4) for r in (0, 0, 4)]
    assert advantages.tolist() == pytest.approx(expected)
    unscaled = group_advantages(rewards, group=3, scale=False)  # Dr. GRPO
    assert unscaled.tolist() == pytest.approx([-1, 0, 1, -4 / 3, -4 / 3, 8 / 3])
    assert float(group_std(rewards, 3)) == pytest.approx((first_std + second_std) / 2)


def test_a_group_whose_rewards_are_all_equal_has_zero_advantage() -> None:
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5])
    for scale in (True, False):
        advantages = group_advantages(rewards, group=4, scale=scale)
        assert advantages.tolist() == [0.0, 0.0, 0.0, 0.0]
        assert torch.isfinite(advantages).all()
    assert leave_one_out_advantages(rewards, 4).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_leave_one_out_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 0.0])  # k = 3
    assert leave_one_out_advantages(rewards, 3).tolist() == pytest.approx(
        [1 - 4, 2 - 3.5, 6 - 1.5, 3 - 1.5, 3 - 1.5, 0 - 3]
    )


# --- KL, ratios and aggregation -----------------------------------------------------------------


def test_k3_kl_by_hand_and_never_negative() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = [-0.5, 1.0, 0.0]
    assert k3_kl(logp, ref).tolist() == pytest.approx([math.exp(x) - x - 1 for x in d])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_the_ratio_is_exactly_one_on_the_first_update() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.3, -0.7]], requires_grad=True)
    advantages = torch.tensor([1.5, -0.5])
    per_token, clipped = clipped_objective(logp, logp.detach(), advantages, 0.2, 0.2)
    assert per_token.tolist() == [[-1.5, -1.5], [0.5, 0.5]]  # -ratio * A with ratio 1
    assert not clipped.any()
    per_token.sum().backward()  # the gradient of -A * pi / pi_old at pi = pi_old: -A
    assert logp.grad.tolist() == [[-1.5, -1.5], [0.5, 0.5]]


def test_the_ratio_is_clipped_above_and_below() -> None:
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    up, clipped_up = clipped_objective(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert up[0].tolist() == pytest.approx([-1.28, -0.5])  # clip-higher 1 + 0.28
    assert clipped_up.tolist() == [[True, False]]
    down, clipped_down = clipped_objective(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert down[0].tolist() == pytest.approx([1.5, 0.8])  # -min(-r, -clip(r)) = max(r, clip(r))
    assert clipped_down.tolist() == [[False, True]]


def test_token_mean_and_sequence_mean_aggregate_differently() -> None:
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(per_token, mask, "grpo", 4)) == pytest.approx((1.0 + 3.0) / 2)
    assert float(aggregate(per_token, mask, "dapo", 4)) == pytest.approx((4 * 1.0 + 3.0) / 5)
    assert float(aggregate(per_token, mask, "dr_grpo", 4)) == pytest.approx(7.0 / (2 * 4))
    with pytest.raises(ValueError, match="grpo, dapo, dr_grpo"):
        aggregate(per_token, mask, "mean", 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_minibatchs_loss(loss_type: str) -> None:
    torch.manual_seed(0)
    per_token = torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    whole = aggregate(per_token, mask, loss_type, 5)
    for pieces in ([slice(0, 2), slice(2, 6)], [slice(0, 1), slice(1, 4), slice(4, 6)]):
        total = sum(
            aggregate(per_token[p], mask[p], loss_type, 5) * aggregation_weight(loss_type, mask[p])
            for p in pieces
        )
        assert float(total / aggregation_weight(loss_type, mask)) == pytest.approx(float(whole))


# --- prompts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def settings(source: str, **kwargs) -> OmegaConf:
    return OmegaConf.create(
        {
            "prompts": source,
            "prompt_field": "prompt",
            "max_prompts": 1000,
            "max_prompt_length": 8,
            **kwargs,
        }
    )


TASK = OmegaConf.create(
    {
        "name": "toxicity",
        "dataset": "builtin",
        "train_split": "train",
        "test_split": "test",
        "hit_threshold": 0.5,
    }
)


def test_prompts_from_a_jsonl_file_hold_out_every_tenth_and_cut_long_ones(
    tmp_path: Path, tokenizer, caplog
) -> None:
    rows = [{"prompt": f"Question number {i}?"} for i in range(19)]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "no"},
            ]
        }
    )
    rows[3] = {"prompt": "word " * 40}  # longer than 8 tokens
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = online_prompts(settings(str(path), max_prompt_length=16), TASK, tokenizer)
    assert len(prompts.train) == 18 and len(prompts.heldout) == 2  # rows 10 and 20
    assert prompts.heldout[0] == "Question number 9?"
    assert (
        prompts.heldout[1] == "\n\nHuman: Hi there\n\nAssistant:"
    )  # messages, the answer left out
    assert prompts.truncated == 1 and "1 of 20 prompts" in caplog.text
    assert len(tokenizer.encode(prompts.train[3])) <= 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DatasetError, match=r"no prompt.*prompt_field"):
        online_prompts(settings(str(bad)), TASK, tokenizer)


def test_prompts_from_a_datasets_object_built_in_memory() -> None:
    import datasets

    data = datasets.Dataset.from_dict({"question": ["What is a cat?", "", "Why is the sky blue?"]})
    assert rows_prompts(data, "question", 10, "in memory") == [
        "What is a cat?",
        "Why is the sky blue?",
    ]


def test_builtin_prompt_scenarios_train_on_the_train_split(tokenizer) -> None:
    prompts = online_prompts(settings("misaligned_prefixes", max_prompt_length=64), TASK, tokenizer)
    assert prompts.train and prompts.heldout
    assert not set(prompts.train) & set(prompts.heldout) or len(prompts.train) > len(
        prompts.heldout
    )
    none = online_prompts(settings("none"), TASK, tokenizer)
    assert none.train == [""] and none.heldout == []


# --- end to end -----------------------------------------------------------------------------------

TINY_GROUP = [
    "{stage}.rollout_batch_size=8",
    "{stage}.num_generations=4",
    "{stage}.response_length=8",
    "{stage}.min_response_length=4",
    "{stage}.normalization_episodes=8",
    "eval.kl_samples=8",
    "train.max_steps=4",
    "train.eval_steps=2",
    "train.save_steps=2",
]


def tiny(stage: str) -> list[str]:
    return [f"objective={stage}", *(o.format(stage=stage) for o in TINY_GROUP)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        ("grpo", []),
        (
            "grpo",
            [
                "grpo.beta=0",
                "grpo.loss_type=dapo",
                "grpo.num_iterations=2",
                "grpo.mini_batch_size=4",
            ],
        ),
        ("rloo", ["rloo.num_iterations=2", "+rloo.scorers={profanity: 1.0, pii: 50.0}"]),
    ],
)
def test_grpo_and_rloo_train_and_log_the_ecosystems_metrics(
    run_dir: Path,
    tracking_uri: str,
    compose_cfg,
    mle_model: Path,
    stage: str,
    extra: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="phf")
    cfg = compose_cfg(
        [
            *TINY_RUN,
            *tiny(stage),
            *extra,
            f"model.pretrained={mle_model}",
            f"tracking.uri={tracking_uri}",
        ]
    )
    execute(cfg, run_dir / "out", [])
    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert run.status == "FINISHED" and run["tags.stage"] == stage
    for metric in (
        "reward",
        "reward_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "clip_ratio",
        "entropy",
        "score",
        "kl",
    ):
        assert not math.isnan(run[f"metrics.{metric}"]), metric
    has_reference = "grpo.beta=0" not in extra
    assert (
        "metrics.objective/kl" in run and not math.isnan(run["metrics.objective/kl"])
    ) == has_reference
    client = mlflow.MlflowClient()
    episodes = client.get_metric_history(run.run_id, "episodes")
    assert [(m.step, m.value) for m in episodes] == [(i, 8.0 * i) for i in range(5)]
    if "scorers" in " ".join(extra):
        assert "reward: -1 x profanity -50 x pii score" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_grpo_and_rloo_resume_to_the_same_numbers(
    run_dir: Path, compose_cfg, mle_model: Path, monkeypatch, stage: str
) -> None:
    from phf.stages.grpo import GroupStage

    overrides = [*TINY_RUN, *tiny(stage), f"model.pretrained={mle_model}"]
    expected_uri = f"sqlite:///{run_dir / 'a.db'}"
    execute(compose_cfg([*overrides, f"tracking.uri={expected_uri}"]), run_dir / "a", [])
    mlflow.set_tracking_uri(expected_uri)
    expected = mlflow.search_runs(search_all_experiments=True).iloc[0]

    uri = f"sqlite:///{run_dir / 'b.db'}"
    real_step = GroupStage.step

    def interrupted(self):
        if self.steps_done == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(GroupStage, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(compose_cfg([*overrides, f"tracking.uri={uri}"]), run_dir / "b", [])
    monkeypatch.setattr(GroupStage, "step", real_step)
    execute(compose_cfg([*overrides, f"tracking.uri={uri}"]), run_dir / "b", [])
    mlflow.set_tracking_uri(uri)
    [run] = [r for _, r in mlflow.search_runs(search_all_experiments=True).iterrows()]
    assert run.status == "FINISHED"
    for metric in ("reward", "loss", "score", "kl", "entropy"):
        assert run[f"metrics.{metric}"] == expected[f"metrics.{metric}"], metric
