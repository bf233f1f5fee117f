"""Data parallelism: two processes (torchrun, gloo on the CPU) train exactly like one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RUN

pytestmark = pytest.mark.slow


def test_two_processes_train_like_one(run_dir: Path) -> None:
    overrides = [*TINY_RUN, "hardware.num_threads=1", "train.max_steps=3", "train.eval_steps=100"]
    launchers = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
        "single": [sys.executable],
    }
    for name, launcher in launchers.items():
        result = subprocess.run(
            [
                *launcher,
                "-m",
                "phf.run",
                *overrides,
                f"tracking.uri=sqlite:///{run_dir / name}.db",
                f"hydra.run.dir={run_dir / name}",
            ],
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    ddp = load_file(run_dir / "ddp" / "model" / "model.safetensors")
    single = load_file(run_dir / "single" / "model" / "model.safetensors")
    # The same global batch, gradients averaged over the two halves: the same weights, up to
    # the order of floating-point sums.
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=1e-4)
    assert "in each of 2 processes" in (run_dir / "ddp" / "phf.log").read_text()
    # Only rank 0 records: one MLflow run, with the global batch's tokens.
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'ddp'}.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.status.iloc[0] == "FINISHED"
    assert runs["metrics.tokens_seen"].iloc[0] == 3 * 4 * 32
