"""Faults and bad input lose nothing: numbers out of range, bad data, SIGTERM and SIGINT, a
tracking server that dies, a changed config or a finished run in an existing directory, corrupt
checkpoints and a full disk, a crafted pickle, two runs creating one store, a sweep killed and
run again, and reward and PPO runs killed mid-way. Signals, processes, the server and the disk
are real."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from phf.checkpoints import TRAINING_STATE_FILE, CheckpointError
from phf.config import ConfigError
from phf.data.corpus import DatasetError
from phf.data.preferences import parse_row
from phf.run import execute
from phf.stages.loop import NonFiniteLossError
from phf.tracking import read_sweep, start_sweep
from tests.conftest import TINY_RUN

# Long enough to be stopped mid-way (each step takes milliseconds), short enough for CI.
LONG_RUN = [
    *TINY_RUN,
    "hardware.num_threads=1",
    "train.max_steps=300",
    "train.eval_steps=150",
    "train.log_steps=10",
    "train.save_steps=50",
]
TINY_REWARD = ["objective=reward", "train.max_steps=12", "train.save_steps=4", "train.eval_steps=4"]
TINY_PPO = [
    "objective=ppo",
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.response_length=8",
    "ppo.min_response_length=4",
    "ppo.normalization_episodes=16",
    "eval.kl_samples=8",
    "train.max_steps=8",
    "train.save_steps=2",
    "train.eval_steps=4",
]
COMPARED = ("train/loss", "eval/lm_loss", "score", "score_max_at_25")


def phf(run_dir: Path, *overrides: str, out: str = "out", db: str = "mlflow.db") -> list[str]:
    return [
        sys.executable,
        "-m",
        "phf.run",
        *overrides,
        f"tracking.uri=sqlite:///{run_dir / db}",
        f"hydra.run.dir={run_dir / out}",
    ]


def runs(uri: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.stdout.read()[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def history(run_id: str, metric: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, metric)]


# --- 1. numbers checked before any work ---------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batch_size=0", "train.batch_size=0"),
        ("hardware.micro_batch_size=-2", "hardware.micro_batch_size=-2"),
        ("train.eval_steps=0", "train.eval_steps=0"),
        ("train.log_steps=0", "train.log_steps=0"),
        ("train.save_steps=-1", "train.save_steps=-1"),
        ("train.max_steps=0", "train.max_steps=0"),
        ("train.num_tokens=0", "train.num_tokens=0"),
        ("eval.generation.num_samples=30", "eval.generation.num_samples=30"),
        ("eval.generation.top_p=0", "eval.generation.top_p=0"),
        ("train.lr=-1", "train.lr=-1"),
        ("objective.drop_token_fraction=1.5", "objective.drop_token_fraction=1.5"),
        ("ppo.mini_batch_size=5", "ppo.rollout_batch_size=64, ppo.mini_batch_size=5"),
    ],
)
def test_numbers_out_of_range_are_refused_before_any_work(
    run_dir: Path, compose_cfg, override: str, key: str
) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    cfg = compose_cfg([*TINY_RUN, override, f"tracking.uri={uri}"])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        execute(cfg, run_dir / "out", [])
    assert "must be" in str(error.value) or "needs" in str(error.value)
    assert not (run_dir / "mlflow.db").exists()  # no MLflow run was opened
    assert not (run_dir / "out").exists()


def test_pretrained_without_a_path_says_which_key_to_set(run_dir: Path, compose_cfg) -> None:
    not_architecture = [o for o in TINY_RUN if not o.startswith("model.architecture.")]
    cfg = compose_cfg([*not_architecture, "model=pretrained"])
    with pytest.raises(ConfigError, match=r"model\.pretrained.*runs:/<run id>/model"):
        execute(cfg, run_dir / "out", [])
    assert not (run_dir / "mlruns").exists() and not (run_dir / "mlflow.db").exists()


# --- 2. data errors before any work ----------------------------------------------------------


def test_a_bad_row_fails_before_the_first_evaluation(
    run_dir: Path, compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    data = run_dir / "data"
    data.mkdir()
    good = '{"texts": ["Some fine text here. "], "scores": [0.0]}\n'
    bad = '{"texts": ["Some rude text right here. "], "scores": [0.9]}\n'
    (data / "train.jsonl").write_text(good * 50 + '{"texts": ["oops"], "scores": [1, 2]}\n')
    (data / "test.jsonl").write_text((good + bad) * 5)
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    cfg = compose_cfg([*TINY_RUN, f"task.dataset={data}", f"tracking.uri={uri}"])
    caplog.set_level("INFO")
    with pytest.raises(DatasetError, match=r"train.jsonl, row 51: 1 texts but 2 scores"):
        execute(cfg, run_dir / "out", [])
    assert "eval at step 0" not in caplog.text  # no sampling happened first
    assert runs(uri).status.tolist() == ["FAILED"]


def test_a_bad_byte_is_named_with_its_own_row(run_dir: Path, compose_cfg) -> None:
    data = run_dir / "data"
    data.mkdir()
    good = b'{"texts": ["Fine text. "], "scores": [0.0]}\n'
    (data / "train.jsonl").write_bytes(good * 4 + b'{"texts": ["caf\xe9"], "scores": [0.0]}\n')
    (data / "test.jsonl").write_bytes(good)
    cfg = compose_cfg([*TINY_RUN, f"task.dataset={data}", "task.scenarios={}"])
    with pytest.raises(DatasetError, match=r"train.jsonl, row 5: not UTF-8"):
        execute(cfg, run_dir / "out", [])


@pytest.mark.parametrize("margin", [float("nan"), float("inf")])
def test_a_non_finite_margin_is_refused_with_its_row(margin: float) -> None:
    line = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": margin})
    with pytest.raises(DatasetError, match=r"pairs.jsonl, row 7: 'margin' must be a finite"):
        parse_row(json.loads(line), "pairs.jsonl, row 7", "auto")


# --- 3. signals -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_ends_killed_and_resumes_to_the_same_numbers(
    run_dir: Path, signum: int, status: int
) -> None:
    uninterrupted = subprocess.run(
        phf(run_dir, *LONG_RUN, out="a", db="a.db"), capture_output=True, text=True, timeout=300
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected = runs(f"sqlite:///{run_dir / 'a.db'}").iloc[0]

    out = run_dir / "b"
    process = subprocess.Popen(
        phf(run_dir, *LONG_RUN, out="b", db="b.db"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: "step_000050" in checkpoints(out), process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == status, output[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} after writing a checkpoint" in output
    log = (out / "phf.log").read_text()
    assert f"received {name}: checkpointing after the current step" in log
    uri = f"sqlite:///{run_dir / 'b.db'}"
    killed = runs(uri).iloc[0]
    assert killed.status == "KILLED" and name in killed["tags.phf.stopped_by"]
    stopped_at = max(int(c.removeprefix("step_")) for c in checkpoints(out))
    assert 50 <= stopped_at < 300  # the step it was at, not only the last scheduled one

    resumed = subprocess.run(
        phf(run_dir, *LONG_RUN, out="b", db="b.db"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [run] = [row for _, row in runs(uri).iterrows()]
    assert run.status == "FINISHED" and run.run_id == killed.run_id
    assert "tags.phf.stopped_by" not in run or not isinstance(run["tags.phf.stopped_by"], str)
    for metric in COMPARED:
        assert run[f"metrics.{metric}"] == expected[f"metrics.{metric}"], metric
    steps = [step for step, _ in history(run.run_id, "train/loss")]
    assert steps == list(range(10, 301, 10))  # every point once: none lost, none repeated


def test_ctrl_c_marks_the_run_killed(run_dir: Path, tracking_uri: str, compose_cfg) -> None:
    from phf.tracking import Tracker

    cfg = compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}"])
    tracker = Tracker(cfg)
    with pytest.raises(KeyboardInterrupt), tracker.run("interrupted", {}, {}, {}):
        raise KeyboardInterrupt
    assert runs(tracking_uri).status.tolist() == ["KILLED"]


# --- 4. a tracking server that dies ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(directory: Path, port: int) -> Iterator[subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1:port (its store and artifacts in ``directory``),
    killed with its whole process group at the end, as a dying server would be."""
    directory.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{directory / 'server.db'}",
            "--artifacts-destination",
            str(directory / "artifacts"),
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.request

        def up() -> bool:
            try:
                return (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status
                    == 200
                )
            except OSError:
                return False

        wait_for(up, timeout=120)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


OUTAGE = [
    "tracking.request_timeout_s=2",
    "tracking.request_retries=0",
    "tracking.probe_interval_s=1",
    "tracking.system_metrics=false",
]


@pytest.mark.slow
def test_training_goes_on_through_an_outage_and_sends_everything_when_the_server_is_back(
    run_dir: Path,
) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    out = run_dir / "out"
    command = [
        sys.executable,
        "-m",
        "phf.run",
        *LONG_RUN,
        "train.max_steps=600",
        "train.eval_steps=100",
        *OUTAGE,
        f"tracking.uri={uri}",
        f"hydra.run.dir={out}",
        "tracking.outage_grace_s=120",
    ]
    with mlflow_server(run_dir / "server", port):
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wait_for(
            lambda: (
                (out / "phf.log").is_file() and "eval at step 0" in (out / "phf.log").read_text()
            ),
            process,
        )
    # The server is dead (killed with its workers); training must go on and checkpoint.
    killed_at = time.time()
    wait_for(lambda: len(checkpoints(out)) >= 2 and checkpoints(out)[-1] >= "step_000200", process)
    assert time.time() - killed_at < 90  # not stalled in MLflow's retries
    assert process.poll() is None
    with mlflow_server(run_dir / "server", port):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
        assert "does not answer" in output and "answers again" in output
        mlflow.set_tracking_uri(uri)
        [run] = [row for _, row in mlflow.search_runs(search_all_experiments=True).iterrows()]
        assert run.status == "FINISHED"
        steps = [step for step, _ in history(run.run_id, "train/loss")]
        assert steps == list(range(10, 601, 10))  # nothing lost in the outage
        assert [s for s, _ in history(run.run_id, "eval/lm_loss")] == list(range(0, 601, 100))
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id, "samples")}
        assert len([a for a in artifacts if a.endswith(".json")]) == 7
    assert not (out / "unrecorded").exists()


@pytest.mark.slow
def test_a_server_that_never_comes_back_is_reported_and_the_rerun_sends_the_rest(
    run_dir: Path,
) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    out = run_dir / "out"
    command = [
        sys.executable,
        "-m",
        "phf.run",
        *LONG_RUN,
        *OUTAGE,
        "tracking.outage_grace_s=3",
        f"tracking.uri={uri}",
        f"hydra.run.dir={out}",
    ]
    with mlflow_server(run_dir / "server", port):
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wait_for(
            lambda: (
                (out / "phf.log").is_file() and "eval at step 0" in (out / "phf.log").read_text()
            ),
            process,
        )
    started = time.time()
    output, _ = process.communicate(timeout=300)
    assert time.time() - started < 120  # bounded: no call blocked on the dead server
    assert process.returncode != 0
    assert "did not come back: not recorded in run" in output
    assert "the end status FINISHED" in output and "metric points" in output
    assert (out / "unrecorded" / "records.jsonl").is_file()
    assert (out / "model" / "model.safetensors").is_file()  # the trained model is kept

    with mlflow_server(run_dir / "server", port):
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "nothing to train" in rerun.stdout + rerun.stderr
        mlflow.set_tracking_uri(uri)
        [run] = [row for _, row in mlflow.search_runs(search_all_experiments=True).iterrows()]
        assert run.status == "FINISHED"
        assert [s for s, _ in history(run.run_id, "train/loss")] == list(range(10, 301, 10))
        assert mlflow.artifacts.download_artifacts(f"runs:/{run.run_id}/model")
    assert not (out / "unrecorded").exists()


# --- 5. resume safety -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_with_another_config_is_refused_and_a_finished_one_does_nothing(
    run_dir: Path, compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    base = [*TINY_RUN, f"tracking.uri={uri}"]
    score = execute(compose_cfg(base), run_dir / "out", [])
    before = checkpoints(run_dir / "out")
    for override, difference in (
        ("seed=1", "seed: 0 in the checkpoint, 1 now"),
        ("train.lr=1e6", "train.lr"),
    ):
        with pytest.raises(ConfigError, match=difference) as error:
            execute(compose_cfg([*base, override]), run_dir / "out", [])
        assert "hydra.run.dir=<new dir>" in str(error.value) and "train.resume=false" in str(
            error.value
        )
    assert checkpoints(run_dir / "out") == before  # nothing written over
    [run] = [row for _, row in runs(uri).iterrows()]
    assert run.status == "FINISHED" and run["params.seed"] == "0" and run["tags.seed"] == "0"

    caplog.set_level("INFO")
    assert execute(compose_cfg(base), run_dir / "out", []) == score  # the same command again
    assert "holds a finished run" in caplog.text and "nothing to train" in caplog.text
    assert len(runs(uri)) == 1
    # Hardware and tracking are not the experiment: a finished run on other hardware is the same.
    assert execute(compose_cfg([*base, "hardware.num_threads=1"]), run_dir / "out", []) == score


# --- 6. corrupt checkpoints and a full disk -------------------------------------------------------


def corrupt(directory: Path, how: str) -> None:
    if how == "training_state":
        path = directory / TRAINING_STATE_FILE
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "weights":
        path = directory / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif how == "json":
        (directory / "checkpoint.json").write_text("{not json")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["training_state", "weights", "json"])
def test_a_corrupt_checkpoint_falls_back_to_the_older_one(
    run_dir: Path, compose_cfg, monkeypatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    overrides = [*TINY_RUN, "train.max_steps=4", "train.eval_steps=4", f"tracking.uri={uri}"]
    expected = execute(
        compose_cfg([*overrides, f"tracking.uri=sqlite:///{run_dir / 'a.db'}"]), run_dir / "a", []
    )
    from phf.stages.pretrain import PretrainStage

    real_step = PretrainStage.step

    def stop_after_three(self):
        if self.steps_done == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(PretrainStage, "step", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        execute(compose_cfg(overrides), run_dir / "b", [])
    monkeypatch.setattr(PretrainStage, "step", real_step)
    assert checkpoints(run_dir / "b") == ["step_000002", "step_000003"]
    corrupt(run_dir / "b" / "checkpoints" / "step_000003", how)

    caplog.set_level("WARNING")
    assert execute(compose_cfg(overrides), run_dir / "b", []) == expected  # resumed from step 2
    assert "step_000003" in caplog.text and (
        "skipping the checkpoint" in caplog.text or "cannot resume from" in caplog.text
    )
    [run] = [row for _, row in runs(uri).iterrows()]
    assert run.status == "FINISHED"


def test_no_valid_checkpoint_stops_before_the_run_opens(run_dir: Path, compose_cfg) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    broken = run_dir / "out" / "checkpoints" / "step_000002"
    broken.mkdir(parents=True)
    (broken / "checkpoint.json").write_text("{not json")
    with pytest.raises(
        CheckpointError, match=r"no valid checkpoint in .*checkpoints.*train\.resume=false"
    ):
        execute(compose_cfg([*TINY_RUN, f"tracking.uri={uri}"]), run_dir / "out", [])
    assert not (run_dir / "mlflow.db").exists() or runs(uri).empty  # no run left RUNNING
    assert broken.is_dir()  # nothing deleted


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 5 MB filesystem (tmpfs), so that a checkpoint fills it."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_says_no_space_left_and_where(
    run_dir: Path, compose_cfg, small_disk: Path
) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    # A checkpoint of the tiny run is ~3.9 MB: the first fits, the second does not.
    cfg = compose_cfg(
        [
            *TINY_RUN,
            "train.max_steps=3",
            "train.save_total_limit=3",
            f"tracking.uri={uri}",
        ]
    )
    with pytest.raises(
        CheckpointError, match=r"no space left on the device writing the checkpoint .*small"
    ) as error:
        execute(cfg, small_disk / "out", [])
    assert "hydra.run.dir" in str(error.value), str(error.value)
    assert runs(uri).status.tolist() == ["FAILED"]
    assert "step_000001" in checkpoints(small_disk / "out")  # what was written is kept
    assert not list((small_disk / "out" / "checkpoints").glob(".*partial"))


# --- 7. no code execution from files ------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_crafted_training_state_runs_nothing(run_dir: Path, compose_cfg) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    overrides = [*TINY_RUN, "train.max_steps=4", f"tracking.uri={uri}"]
    cfg = compose_cfg([*overrides, "train.max_steps=2"])
    execute(cfg, run_dir / "out", [])
    state = run_dir / "out" / "checkpoints" / "step_000002" / TRAINING_STATE_FILE
    marker = run_dir / "pwned"
    with open(state, "wb") as f:  # same size check is by checkpoint.json: update it too
        pickle.dump({"stage": Payload(marker)}, f)
    info_path = state.parent / "checkpoint.json"
    info = json.loads(info_path.read_text())
    info["files"][TRAINING_STATE_FILE] = state.stat().st_size
    info_path.write_text(json.dumps(info))
    (run_dir / "out" / "phf_run.json").unlink()  # as if it had not finished
    shutil.rmtree(run_dir / "out" / "checkpoints" / "step_000001")  # no older one to fall back to
    with pytest.raises(CheckpointError, match="no checkpoint of .* can be read"):
        execute(compose_cfg([*overrides, "train.max_steps=2"]), run_dir / "out", [])
    assert not marker.exists()
    # Heads are safetensors too: the value head of AWR.
    execute(compose_cfg([*TINY_RUN, "objective=awr", f"tracking.uri={uri}"]), run_dir / "awr", [])
    assert (run_dir / "awr" / "model" / "value_head.safetensors").is_file()
    assert {p.name for p in (run_dir / "awr").rglob("*.pt")} == {TRAINING_STATE_FILE}


# --- 8. the MLflow store's first use ----------------------------------------------------------


@pytest.mark.slow
def test_two_runs_creating_one_store_at_once_both_finish(run_dir: Path) -> None:
    commands = [phf(run_dir, *TINY_RUN, f"seed={seed}", out=f"out{seed}") for seed in (0, 1)]
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert sorted(runs(f"sqlite:///{run_dir / 'mlflow.db'}").status) == ["FINISHED", "FINISHED"]


@pytest.mark.slow
def test_a_sweep_whose_parent_run_cannot_be_created_fails_at_once(run_dir: Path) -> None:
    not_a_database = run_dir / "a_directory"
    not_a_database.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "phf.run",
            "-m",
            *TINY_RUN,
            "seed=0,1",
            f"tracking.uri=sqlite:///{not_a_database}",
            f"hydra.sweep.dir={run_dir / 'sweep'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=run_dir,
    )
    assert result.returncode != 0
    assert "cannot create the sweep's parent run" in result.stderr
    assert "names a directory, not a database file" in result.stderr
    assert "would run unnested" in result.stderr
    assert not list((run_dir / "sweep").rglob("checkpoints"))  # no job trained


@pytest.mark.slow
def test_a_sweep_run_again_after_kill_9_keeps_one_parent_and_ends_the_lost_run(
    run_dir: Path,
) -> None:
    """A multirun killed (kill -9) in job 1 before its first checkpoint, then the same command
    again: job 0 returns its result, job 1 starts over and ends its lost run KILLED, and both
    stay children of the one parent run, whose summary counts each job once."""
    command = [
        sys.executable,
        "-m",
        "phf.run",
        "-m",
        *LONG_RUN,
        "train.save_steps=300",  # no checkpoint before the end
        "seed=0,1",
        f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
        f"hydra.sweep.dir={run_dir / 'sweep'}",
    ]
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"

    def job_1_running() -> bool:
        with contextlib.suppress(Exception):  # the store may not have its tables yet
            found = runs(uri)
            return "tags.job_num" in found and (found["tags.job_num"] == "1").any()
        return False

    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=run_dir,
        start_new_session=True,
    )
    wait_for(job_1_running, process, timeout=600)
    os.killpg(process.pid, signal.SIGKILL)  # no handler runs: job 1's run stays RUNNING
    process.wait()
    job_1_dir = next((run_dir / "sweep").rglob("1/.hydra")).parent
    assert not checkpoints(job_1_dir)
    [lost_id] = runs(uri).query("`tags.job_num` == '1'").run_id

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 jobs finished; 0 failed." in again.stdout
    found = runs(uri)
    [parent] = [row for _, row in found.iterrows() if row["tags.sweep"] == "parent"]
    assert parent.status == "FINISHED" and parent["tags.resumed"] == "true"
    children = found[found["tags.sweep"] != "parent"]
    assert set(children["tags.mlflow.parentRunId"]) == {parent.run_id}
    assert sorted(zip(children["tags.job_num"], children.status, strict=True)) == [
        ("0", "FINISHED"),
        ("1", "FINISHED"),
        ("1", "KILLED"),
    ]
    lost = children.set_index("run_id").loc[lost_id]
    assert lost.status == "KILLED" and lost["tags.phf.stopped_by"].startswith("lost: ")
    # It ended when it was last heard from, before the run that took its directory over began.
    assert lost.end_time < children.query("status == 'FINISHED'").start_time.max()
    assert parent["metrics.jobs"] == 2 and parent["metrics.failed_jobs"] == 0


def test_the_same_sweep_reopens_its_parent_and_another_sweep_gets_its_own(
    run_dir: Path,
) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    sweep_dir = run_dir / "sweep"
    first = start_sweep(sweep_dir, "toxicity", uri, "sweep: seed", {"seed": "0,1"})
    mlflow.MlflowClient(uri).set_terminated(first, status="KILLED")
    again = start_sweep(sweep_dir, "toxicity", uri, "sweep: seed", {"seed": "0,1"})
    assert again == first
    assert mlflow.MlflowClient(uri).get_run(first).info.status == "RUNNING"
    other = start_sweep(sweep_dir, "toxicity", uri, "sweep: seed", {"seed": "0,1,2"})
    assert other != first and read_sweep(sweep_dir)["parent_run_id"] == other


# --- 9. reward and PPO resume, and their NaN guards --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "overrides", "checkpoint", "metrics"),
    [
        ("reward", TINY_REWARD, "step_000004", ("train/loss", "eval/accuracy", "eval/loss")),
        ("ppo", TINY_PPO, "step_000004", ("objective/kl", "loss/policy", "score", "kl")),
    ],
)
def test_reward_and_ppo_killed_midway_resume_to_the_same_numbers(
    run_dir: Path, stage: str, overrides: list[str], checkpoint: str, metrics: tuple[str, ...]
) -> None:
    args = [*TINY_RUN, "hardware.num_threads=1", *overrides]
    uninterrupted = subprocess.run(
        phf(run_dir, *args, out="a", db="a.db"), capture_output=True, text=True, timeout=600
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected = runs(f"sqlite:///{run_dir / 'a.db'}").iloc[0]
    expected_steps = {
        metric: [s for s, _ in history(expected.run_id, metric)] for metric in metrics
    }

    out = run_dir / "b"
    process = subprocess.Popen(
        phf(run_dir, *args, out="b", db="b.db"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: checkpoint in checkpoints(out), process, timeout=600)
    process.kill()  # kill -9: no handler runs
    process.wait()
    uri = f"sqlite:///{run_dir / 'b.db'}"
    assert runs(uri).status.tolist() == ["RUNNING"]
    resumed = subprocess.run(
        phf(run_dir, *args, out="b", db="b.db"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (out / "phf.log").read_text()
    [run] = [row for _, row in runs(uri).iterrows()]  # one MLflow run
    assert run.status == "FINISHED"
    for metric in metrics:
        assert run[f"metrics.{metric}"] == expected[f"metrics.{metric}"], metric
        steps = [s for s, _ in history(run.run_id, metric)]
        assert steps == sorted(set(steps)), metric  # no point logged twice
        assert steps == expected_steps[metric], metric


@pytest.mark.parametrize("stage", [TINY_REWARD, TINY_PPO])
def test_reward_and_ppo_stop_on_a_nan_loss(run_dir: Path, compose_cfg, stage: list[str]) -> None:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    cfg = compose_cfg(
        [*TINY_RUN, *stage, "train.lr=1e30", "train.max_steps=3", f"tracking.uri={uri}"]
    )
    with pytest.raises(NonFiniteLossError, match="lower train.lr"):
        execute(cfg, run_dir / "out", [])
    [run] = [row for _, row in runs(uri).iterrows()]
    assert run.status == "FAILED" and "NonFiniteLossError" in run["tags.phf.error"]
    assert not (run_dir / "out" / "model").exists()  # no NaN model published
