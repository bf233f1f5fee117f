"""phf's records in the ecosystem's formats: models as MLflow Models that MLflow's own tools load
and serve, reward models that Hugging Face loads (an encoder trunk included), and runs, datasets
and sweeps that read well in the MLflow UI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phf.run import STAGE_SECTIONS, execute
from tests.conftest import TINY_RUN, multirun_command, tiny_encoder
from tests.test_faults import TINY_PPO


def only_run(uri: str):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    return runs.iloc[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny MLE run from the command line, shared by the tests that read its records."""
    directory = tmp_path_factory.mktemp("mle")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "phf.run",
            *TINY_RUN,
            f"tracking.uri={uri}",
            f"hydra.run.dir={directory / 'out'}",
        ],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return directory, uri


def test_the_model_is_an_mlflow_model_that_mlflow_and_transformers_load(default_run) -> None:
    directory, uri = default_run
    run = only_run(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.run_id}/model"))
    assert (local / "MLmodel").is_file()
    mlmodel = (local / "MLmodel").read_text()
    assert "transformers:" in mlmodel and "task: text-generation" in mlmodel
    assert "max_new_tokens" in mlmodel  # the signature's params: the evaluation's settings
    logged = mlflow.search_logged_models(experiment_ids=[run.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run.run_id]  # under "Logged models"
    pipeline = mlflow.transformers.load_model(f"runs:/{run.run_id}/model")
    assert isinstance(pipeline("Once upon a time", max_new_tokens=4)[0]["generated_text"], str)
    model = AutoModelForCausalLM.from_pretrained(local / "model")
    tokenizer = AutoTokenizer.from_pretrained(local / "components" / "tokenizer")
    assert model.config.vocab_size == len(tokenizer) == 8192
    # The same safetensors weights as the run's output directory.
    saved = AutoModelForCausalLM.from_pretrained(directory / "out" / "model")
    for key, value in saved.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_generation_request(default_run) -> None:
    directory, uri = default_run
    run = only_run(uri)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"runs:/{run.run_id}/model",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        body = json.dumps({"inputs": ["Once upon a time"], "params": {"max_new_tokens": 6}})
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.time() < deadline, "the model server never answered"
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body.encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(1)
        [text] = answer["predictions"]
        assert isinstance(text, str) and text.startswith("Once upon a time")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_the_ui_reads_a_training_run(default_run) -> None:
    """What the MLflow UI shows: a training experiment, standard source tags, a description,
    the datasets, the log file, tokens_seen as a metric to plot against, the params of the
    run's own stage as real values."""
    _, uri = default_run
    run = only_run(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(run.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(run["tags.mlflow.source.git.commit"]) == 40
    assert (
        run["tags.mlflow.source.type"] == "LOCAL" and run["tags.mlflow.runName"] == "mle-tiny-seed0"
    )
    assert "PHF pretraining" in run["tags.mlflow.note.content"]
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"training", "evaluation"}
    assert contexts["training"].name == "toxicity/train" and len(contexts["training"].digest) == 16
    assert json.loads(contexts["training"].profile)["documents"] == 5935
    assert "phf.log" in {a.path for a in client.list_artifacts(run.run_id)}
    params = {k.removeprefix("params."): v for k, v in run.items() if k.startswith("params.")}
    for section in STAGE_SECTIONS:
        assert not any(key.startswith(f"{section}.") for key in params), section
    assert not any(key.startswith(("tracking.", "objective.threshold")) for key in params)
    assert "None" not in params.values() and params["model.pretrained"] == "null"
    assert [m.value for m in client.get_metric_history(run.run_id, "tokens_seen")] == [0, 128, 256]


@pytest.mark.slow
def test_a_reward_model_on_a_distilbert_trunk_trains_and_guides_ppo(
    run_dir: Path, tracking_uri: str, compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """An encoder trunk, built from a random DistilBERT config (no hub), as TRL users train HH
    reward models: the reward stage trains it, Hugging Face loads it, PPO uses it."""
    tiny_encoder(run_dir, words=["the cat sat on the mat", "a fine day", "you idiot"] * 20)
    not_architecture = [o for o in TINY_RUN if not o.startswith("model.architecture.")]
    reward_cfg = compose_cfg(
        [
            *not_architecture,
            "objective=reward",
            "model=pretrained",
            f"model.pretrained={run_dir / 'encoder'}",
            "reward.max_length=64",
            "reward.normalize=false",
            f"tracking.uri={tracking_uri}",
        ]
    )
    execute(reward_cfg, run_dir / "reward", [])
    mlflow.set_tracking_uri(tracking_uri)
    reward_run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert reward_run.status == "FINISHED"
    assert (
        "DistilBertForSequenceClassification"
        in (run_dir / "reward" / "model" / "config.json").read_text()
    )
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "model")
    assert hf.config.num_labels == 1

    ppo_cfg = compose_cfg(
        [
            *TINY_RUN,
            *TINY_PPO,
            f"ppo.reward_model=runs:/{reward_run.run_id}/model",
            f"tracking.uri={tracking_uri}",
        ]
    )
    caplog.set_level("INFO", logger="phf")
    execute(ppo_cfg, run_dir / "ppo", [])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'ppo'")
    assert runs.status.tolist() == ["FINISHED"]
    assert torch.isfinite(torch.tensor(runs["metrics.objective/scores"].iloc[0]))
    # Without phf's stored normalisation, PPO normalised the reward on the initial policy.
    assert "normalised (gain" in caplog.text


@pytest.mark.slow
def test_a_sweeps_parent_run_says_what_was_swept_and_which_was_best(run_dir: Path) -> None:
    result = subprocess.run(
        multirun_command(run_dir, "objective=mle,unlikelihood", "seed=0,1"),
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.sweep"] == "parent"].iloc[0]
    children = runs[runs["tags.sweep"] != "parent"]
    assert parent["tags.mlflow.runName"] == "sweep: objective × seed"
    assert parent["params.objective"] == "mle,unlikelihood" and parent["params.seed"] == "0,1"
    assert parent["metrics.jobs"] == 4 and parent["metrics.failed_jobs"] == 0
    for objective in ("mle", "unlikelihood"):
        mine = children[children["tags.objective"] == objective]
        assert parent[f"metrics.objective:{objective}/score"] == pytest.approx(
            mine["metrics.score"].mean()
        )
    best = min(("mle", "unlikelihood"), key=lambda o: parent[f"metrics.objective:{o}/score"])
    assert parent["tags.best_configuration"] == f"objective:{best}"
    # Jobs are named apart from single runs: their swept values and job number.
    assert sorted(children["tags.mlflow.runName"])[0] == "objective=mle seed=0 (#0)"
