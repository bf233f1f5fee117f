"""End-to-end runs on the real config, shrunk: training, tracking, and every bad-input path."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from phf.data.corpus import DatasetError
from phf.models import load_model_and_tokenizer
from phf.run import execute, seed_everything
from phf.stages.loop import NonFiniteLossError
from phf.stages.pretrain import PretrainStage
from phf.tracking import Tracker, TrackingServerUnreachable
from tests.conftest import TINY_RUN, multirun_command


def run_multirun(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        multirun_command(run_dir, *overrides),
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=600,
    )


def only_run(tracking_uri: str):
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    return runs.iloc[0]


@pytest.mark.slow
def test_cli_two_step_run_trains_and_records_everything(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    overrides = [*TINY_RUN, f"tracking.uri={tracking_uri}", f"hydra.run.dir={run_dir / 'out'}"]
    result = subprocess.run(
        [sys.executable, "-m", "phf.run", *overrides],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The store is ./mlflow.db of the working directory, so plain `mlflow ui` opens it.
    assert "To see it: run `mlflow ui` in this directory" in result.stdout

    run = only_run(tracking_uri)
    assert run.status == "FINISHED"
    assert run["tags.task"] == "toxicity" and run["tags.objective"] == "mle"
    assert run["tags.seed"] == "0" and run["tags.mlflow.source.git.commit"]
    assert run["params.train.block_size"] == "32" and run["params.model.name"] == "tiny"
    assert run["params.model.pretrained"] == "null"  # null, not Python's "None"
    client = mlflow.MlflowClient()
    for metric in ("score", "score_max_at_25", "hit_rate", "eval/lm_loss", "train/loss"):
        assert f"metrics.{metric}" in run
    history = client.get_metric_history(run.run_id, "eval/lm_loss")
    assert [m.step for m in history] == [0, 1, 2]  # optimizer steps
    tokens = client.get_metric_history(run.run_id, "tokens_seen")  # once per step
    assert [(m.step, m.value) for m in tokens] == [(0, 0), (1, 128), (2, 256)]  # 4 x 32 a step
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "hydra", "samples", "phf.log"} <= artifacts
    listed = [a.path for a in client.list_artifacts(run.run_id, "samples")]
    tables = sorted(path for path in listed if path.endswith(".json"))
    assert tables[-1] == "samples/tokens_0000000256.json"  # named by tokens seen
    assert len(tables) == 3 and "samples/challenging" in listed  # toxicity's prompted scenario
    assert len(client.list_artifacts(run.run_id, "samples/challenging")) == 3
    table = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/{tables[-1]}")
    assert table["columns"] == ["sample", "prompt", "completion", "score"]
    assert len(table["data"]) == 25 and table["data"][3][0] == "unconditional/3"

    # The model is an MLflow Model whose weights and tokenizer load with transformers.
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{run.run_id}/model", dst_path=str(run_dir / "dl")
        )
    )
    assert (local / "MLmodel").is_file()
    model = AutoModelForCausalLM.from_pretrained(local / "model")
    tokenizer = AutoTokenizer.from_pretrained(local / "components" / "tokenizer")
    out = model.generate(
        torch.tensor([[tokenizer.eos_token_id]]),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
    )
    assert out.shape == (1, 6)

    # Training changed the parameters: rebuild the initial model from the same seed and compare.
    cfg = compose_cfg(TINY_RUN)
    initial = []
    for _ in range(2):
        seed_everything(cfg.seed)
        initial.append(load_model_and_tokenizer(cfg.model, cfg.train.block_size)[0])
    init_state, trained_state = initial[0].state_dict(), model.state_dict()
    assert all(torch.equal(v, initial[1].state_dict()[k]) for k, v in init_state.items())
    changed = [k for k, v in init_state.items() if not torch.equal(v, trained_state[k])]
    assert "transformer.h.0.mlp.c_fc.weight" in changed and len(changed) > len(init_state) // 2
    assert (run_dir / "out" / "checkpoints" / "step_000002" / "training_state.pt").is_file()


@pytest.mark.slow
def test_same_seed_same_numbers_and_another_seed_others(run_dir: Path, compose_cfg) -> None:
    finals = []
    for attempt, seed in enumerate((0, 0, 1)):
        uri = f"sqlite:///{run_dir / f'mlflow{attempt}.db'}"
        cfg = compose_cfg([*TINY_RUN, f"tracking.uri={uri}", f"seed={seed}"])
        headline = execute(cfg, run_dir / f"out{attempt}", [])
        run = only_run(uri)
        finals.append((headline, run["metrics.train/loss"], run["metrics.eval/lm_loss"]))
    assert finals[0] == finals[1]
    assert all(a != b for a, b in zip(finals[0][1:], finals[2][1:], strict=True))


def test_missing_dataset_fails_the_run_with_a_clear_error(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    cfg = compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}", "task.dataset=./no/such/dir"])
    with pytest.raises(DatasetError, match="no/such/dir does not exist"):
        execute(cfg, run_dir / "out", [])
    run = only_run(tracking_uri)
    assert run.status == "FAILED"
    assert "does not exist" in run["tags.phf.error"]


def test_malformed_row_fails_the_run_naming_file_and_row(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    data = run_dir / "data"
    data.mkdir()
    good = '{"texts": ["Some fine text here. "], "scores": [0.0]}\n'
    (data / "train.jsonl").write_text(good * 50 + '{"texts": ["oops"]}\n')
    bad = '{"texts": ["Some rude text right here. "], "scores": [0.9]}\n'
    (data / "test.jsonl").write_text((good + bad) * 5)  # the challenging scenario needs bad ones
    cfg = compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}", f"task.dataset={data}"])
    with pytest.raises(DatasetError, match=r"train.jsonl, row 51: missing 'scores'"):
        execute(cfg, run_dir / "out", [])
    assert only_run(tracking_uri).status == "FAILED"


def test_nan_loss_stops_the_run_and_keeps_checkpoints(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    cfg = compose_cfg(
        [
            *TINY_RUN,
            f"tracking.uri={tracking_uri}",
            "train.lr=1e30",
            "train.max_steps=3",
            "train.eval_steps=100",
        ]
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2.*lower train.lr"):
        execute(cfg, run_dir / "out", [])
    assert (run_dir / "out" / "checkpoints" / "step_000001" / "model.safetensors").is_file()
    run = only_run(tracking_uri)
    assert run.status == "FAILED" and "NonFiniteLossError" in run["tags.phf.error"]


def test_unreachable_tracking_server_fails_before_training(run_dir: Path, compose_cfg) -> None:
    cfg = compose_cfg(
        [*TINY_RUN, "tracking.uri=http://127.0.0.1:9", "tracking.connect_timeout_s=2"]
    )
    start = time.perf_counter()
    with pytest.raises(
        TrackingServerUnreachable,
        match=r"cannot reach the MLflow tracking server at http://127.0.0.1:9",
    ):
        execute(cfg, run_dir / "out", [])
    assert time.perf_counter() - start < 10
    assert not (run_dir / "out").exists()


def test_ctrl_c_marks_the_run_killed(run_dir: Path, tracking_uri: str, compose_cfg) -> None:
    cfg = compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}"])
    tracker = Tracker(cfg)
    with pytest.raises(KeyboardInterrupt), tracker.run("interrupted", {}, {}, {}):
        raise KeyboardInterrupt
    assert only_run(tracking_uri).status == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,scorer,scenario_metric",
    [("pii", "pii", None), ("pep8", "pep8", "functions/score")],
)
def test_every_task_runs_end_to_end_offline(
    run_dir: Path, tracking_uri: str, compose_cfg, task: str, scorer: str, scenario_metric
) -> None:
    cfg = compose_cfg([*TINY_RUN, f"task={task}", f"tracking.uri={tracking_uri}"])
    assert cfg.scorer.name == scorer  # the task picks its own default scorer
    execute(cfg, run_dir / "out", [])
    run = only_run(tracking_uri)
    assert run.status == "FINISHED" and run["tags.task"] == task
    assert run["params.scorer.name"] == scorer
    for metric in ("score", "score_max_at_25", "eval/lm_loss"):
        assert run[f"metrics.{metric}"] >= 0
    if scenario_metric:
        assert run[f"metrics.{scenario_metric}"] >= 0
        client = mlflow.MlflowClient()
        tables = [a.path for a in client.list_artifacts(run.run_id, "samples/functions")]
        table = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/{tables[-1]}")
        assert table["columns"][1] == "prompt"
        assert all(row[1].startswith(("def ", "async def ")) for row in table["data"])


@pytest.mark.slow
def test_finetune_from_an_mlflow_run_with_kl_to_it(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    """Pretrain with MLE, then start conditional training from that run's model, measuring KL
    from it: the chaining of runs through MLflow model URIs."""
    execute(compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}"]), run_dir / "mle", [])
    mle_run = only_run(tracking_uri)
    uri = f"runs:/{mle_run.run_id}/model"
    not_architecture = [o for o in TINY_RUN if not o.startswith("model.architecture.")]
    cfg = compose_cfg(
        [
            *not_architecture,
            f"tracking.uri={tracking_uri}",
            "objective=conditional",
            "model=pretrained",
            f"model.pretrained={uri}",
            f"eval.kl_reference={uri}",
            "eval.kl_samples=8",
        ]
    )
    execute(cfg, run_dir / "conditional", [])
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.objective = 'conditional'"
    )
    run = runs.iloc[0]
    assert run.status == "FINISHED" and run["params.model.pretrained"] == uri
    kl = mlflow.MlflowClient().get_metric_history(run.run_id, "kl")
    assert len(kl) == 3
    assert abs(kl[0].value) < 0.5  # before training it still is (nearly) the reference
    assert kl[-1].value != kl[0].value


@pytest.mark.slow
def test_multirun_measures_kl_to_the_sweeps_mle_run(run_dir: Path, tracking_uri: str) -> None:
    result = run_multirun(
        run_dir, "objective=mle,unlikelihood", "eval.kl_reference=sweep:mle", "eval.kl_samples=8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.sweep"] == "parent"]
    runs = runs[runs["tags.sweep"] != "parent"].set_index("tags.objective")
    assert set(runs.status) == {"FINISHED"} and list(parent.status) == ["FINISHED"]
    assert set(runs["tags.sweep_dir"]) == {str((run_dir / "sweep").resolve())}
    assert set(runs["tags.mlflow.parentRunId"]) == set(parent.run_id)
    assert pd.isna(runs.loc["mle", "metrics.kl"])  # the reference itself: no KL
    assert not pd.isna(runs.loc["unlikelihood", "metrics.kl"])
    # Resolved before the run opened: the logged config is the one the run ran and
    # checkpointed, with the MLE run's model in it.
    mle_model = f"runs:/{runs.loc['mle', 'run_id']}/model"
    job = runs.loc["unlikelihood"]
    assert job["params.eval.kl_reference"] == mle_model
    logged = mlflow.artifacts.load_text(f"runs:/{job.run_id}/config.yaml")
    job_dir = Path(job["tags.output_dir"])
    saved = sorted((job_dir / "checkpoints").glob("step_*"))[-1] / "config.yaml"
    assert OmegaConf.create(logged) == OmegaConf.load(saved)
    assert OmegaConf.create(logged).eval.kl_reference == mle_model
    # The same sweep run again finds both jobs finished: nothing trains, nothing is refused.
    again = run_multirun(
        run_dir, "objective=mle,unlikelihood", "eval.kl_reference=sweep:mle", "eval.kl_samples=8"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    children = mlflow.search_runs(search_all_experiments=True)
    assert (children["tags.sweep"] != "parent").sum() == 2


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_numbers(
    run_dir: Path, compose_cfg, monkeypatch
) -> None:
    """Stopped after its step-2 checkpoint, a run started again in the same output directory
    resumes in the same MLflow run and ends with exactly the numbers of an uninterrupted run."""
    overrides = [*TINY_RUN, "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2"]
    uninterrupted_uri = f"sqlite:///{run_dir / 'uninterrupted.db'}"
    execute(compose_cfg([*overrides, f"tracking.uri={uninterrupted_uri}"]), run_dir / "a", [])
    expected = only_run(uninterrupted_uri)

    uri = f"sqlite:///{run_dir / 'resumed.db'}"
    cfg = compose_cfg([*overrides, f"tracking.uri={uri}"])
    real_step = PretrainStage.step

    def interrupted_step(self):
        if self.steps_done == 2:
            raise KeyboardInterrupt  # as if preempted during step 3
        return real_step(self)

    monkeypatch.setattr(PretrainStage, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, run_dir / "b", [])
    assert only_run(uri).status == "KILLED"
    monkeypatch.setattr(PretrainStage, "step", real_step)
    execute(cfg, run_dir / "b", [])

    resumed = only_run(uri)  # the same MLflow run, reopened
    assert resumed.status == "FINISHED" and resumed["tags.resumed"] == "true"
    for metric in ("train/loss", "eval/lm_loss", "score", "score_max_at_25", "tokens_seen"):
        assert resumed[f"metrics.{metric}"] == expected[f"metrics.{metric}"], metric
    history = mlflow.MlflowClient().get_metric_history(resumed.run_id, "eval/lm_loss")
    assert [m.step for m in history] == [0, 2, 4]  # no evaluation repeated or lost


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(run_dir: Path, tracking_uri: str) -> None:
    # Job 1's learning rate makes its loss NaN; job 3's is refused before its run opens; jobs
    # 0 and 2 are fine.
    result = run_multirun(
        run_dir, "train.lr=1e-3,1e30,2e-3,-1", "train.max_steps=3", "train.eval_steps=100"
    )
    assert result.returncode != 0  # the sweep reports its failures...
    assert "2 of 4 jobs finished; 2 failed." in result.stdout  # ...after every job ran
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.sweep"] == "parent"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id].set_index("tags.job_num")
    assert parent.status == "FINISHED"  # summarised, not left RUNNING
    assert sorted(children.index) == ["0", "1", "2", "3"]
    assert list(children.loc[["0", "1", "2", "3"], "status"]) == [
        "FINISHED",
        "FAILED",
        "FINISHED",
        "FAILED",
    ]
    assert "NonFiniteLossError" in children.loc["1", "tags.phf.error"]
    assert "ConfigError" in children.loc["3", "tags.phf.error"]
    assert "train.lr=-1" in children.loc["3", "tags.phf.error"]
    log_file = Path(children.loc["1", "tags.log_file"])
    assert log_file.is_file() and "NonFiniteLossError" in log_file.read_text()
    assert str(log_file) in result.stdout  # the summary says where the failed job's log is
    summary = mlflow.artifacts.load_text(f"runs:/{parent.run_id}/sweep_summary.md")
    assert "| 1 | FAILED | train.lr=1e+30 |" in summary
    # Seeds aside, jobs of different learning rates are different configurations.
    assert children["tags.signature"].nunique() == 4
