"""python -m phf.sample: generation from any run's model with the task's evaluation settings."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from phf.run import execute
from phf.sample import main as sample_main
from tests.conftest import TINY_RUN


@pytest.mark.slow
def test_sample_reproduces_the_runs_final_evaluation(
    run_dir: Path, tracking_uri: str, compose_cfg, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sampling a finished run's model through its MLflow URI with the run's settings gives the
    run's own final score: one evaluation code path, seeded the same way."""
    execute(compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}"]), run_dir / "out", [])
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    capsys.readouterr()
    out = run_dir / "samples.jsonl"
    settings = [o for o in TINY_RUN if o.startswith(("eval.", "hardware", "train.block_size"))]
    code = sample_main(
        [
            f"runs:/{run.run_id}/model",
            *settings,
            f"tracking.uri={tracking_uri}",
            "--out",
            str(out),
            "--show",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[: printed.index("\n}") + 2])
    assert metrics["score"] == pytest.approx(run["metrics.score"], abs=1e-6)
    assert metrics["eval/lm_loss"] == pytest.approx(run["metrics.eval/lm_loss"], abs=1e-5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    unconditional = [r for r in rows if r["scenario"] == "unconditional"]
    assert len(unconditional) == 25  # every sample, not only the run's table rows
    assert {"sample", "prompt", "completion", "score"} <= set(unconditional[0])
    assert sum(r["score"] for r in unconditional) / 25 == pytest.approx(metrics["score"], abs=1e-6)
