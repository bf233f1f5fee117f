"""Data parallelism for every stage: two processes (torchrun, gloo on the CPU) with a global
batch give the numbers of one process holding it whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RUN
from tests.test_rlhf import TINY_PPO

pytestmark = pytest.mark.slow

GROUP = [
    "{stage}.rollout_batch_size=8",
    "{stage}.num_generations=4",
    "{stage}.response_length=8",
    "{stage}.min_response_length=4",
    "{stage}.normalization_episodes=8",
]
# Each stage's tiny run: a batch that two processes can share, and (for the stages that start
# from a model) the tiny MLE model.
STAGES = {
    "pretrain": (["train.max_steps=3"], False, "model.safetensors"),
    "sft": (["objective=sft", "train.max_steps=3", "sft.max_length=48"], True, "model.safetensors"),
    "dpo": (["objective=dpo", "train.max_steps=3", "dpo.max_length=48"], True, "model.safetensors"),
    # Dropout draws other masks in each process (the reward model's 0.1 by default): the same
    # distribution, not the same numbers.
    "reward": (
        ["objective=reward", "train.max_steps=3", "reward.normalize=false", "reward.dropout=0"],
        False,
        "model.safetensors",
    ),
    "ppo": (TINY_PPO, True, "value_head.safetensors"),
    "grpo": (
        ["objective=grpo", *(o.format(stage="grpo") for o in GROUP), "grpo.num_iterations=2"],
        True,
        "model.safetensors",
    ),
    "rloo": (
        ["objective=rloo", *(o.format(stage="rloo") for o in GROUP), "rloo.mini_batch_size=4"],
        True,
        "model.safetensors",
    ),
}
LAUNCHERS = {
    "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
    "one": [sys.executable],
}


def final_metrics(store: Path) -> dict[str, float]:
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.status.iloc[0] == "FINISHED"  # only rank 0 records
    return {
        key.removeprefix("metrics."): float(value)
        for key, value in runs.iloc[0].items()
        if key.startswith("metrics.") and not key.startswith("metrics.system/")
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_give_one_process_numbers(run_dir: Path, mle_model: Path, stage: str) -> None:
    overrides, from_mle, weights_file = STAGES[stage]
    overrides = [
        *TINY_RUN,
        *overrides,
        "hardware.num_threads=1",
        "train.eval_steps=100",
        "eval.kl_samples=8",
        *([f"model.pretrained={mle_model}"] if from_mle else []),
    ]
    processes = {
        name: subprocess.Popen(
            [
                *launcher,
                "-m",
                "phf.run",
                *overrides,
                f"tracking.uri=sqlite:///{run_dir / name}.db",
                f"hydra.run.dir={run_dir / name}",
            ],
            cwd=run_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, launcher in LAUNCHERS.items()
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {output[-4000:]}"
    # The same global batch, gradients averaged over the two shares: the same weights, up to
    # the order of floating-point sums.
    for weights in {"model.safetensors", weights_file}:
        two = load_file(run_dir / "two" / "model" / weights)
        one = load_file(run_dir / "one" / "model" / weights)
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, atol=1e-5, rtol=1e-4)
    if from_mle:  # and they trained: the weights moved from the start
        start = load_file(mle_model / "model.safetensors")
        moved = load_file(run_dir / "one" / "model" / "model.safetensors")
        assert any(not torch.equal(moved[k], start[k]) for k in start if k in moved)
    two, one = final_metrics(run_dir / "two.db"), final_metrics(run_dir / "one.db")
    assert set(two) == set(one)
    for name, value in one.items():
        if "per_s" in name or name.startswith("time/"):
            continue  # speeds
        assert two[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    assert "data parallel over 2 processes" in (run_dir / "two" / "phf.log").read_text()
