"""Everything phf records in MLflow. This is the only module that imports mlflow.

A run's life: ``check_tracking_server`` (before any work), ``Tracker.start`` (params, tags,
composed config), metrics against ``tokens_seen`` as MLflow's step, sample tables, the final model
as an artifact, and an end status: FINISHED, FAILED (with the error) or KILLED (Ctrl-C).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class TrackingServerUnreachable(RuntimeError):
    """The configured tracking server does not answer; raised before any training starts."""


def check_tracking_server(uri: str | None, timeout_s: float) -> None:
    """Fail fast when an http(s) tracking server is down (MLflow itself retries for minutes)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise TrackingServerUnreachable(
        f"cannot reach the MLflow tracking server at {uri} ({reason}). Start it, e.g. "
        "`mlflow server --host 127.0.0.1 --port 5000`, or drop tracking.uri to record runs in "
        "the local store ./mlflow.db"
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...}, the shape MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, prefix=f"{name}.")
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit() -> str:
    """The commit of the phf checkout, with '-dirty' for uncommitted changes; 'unknown' if none."""
    source_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


class Tracker:
    """One MLflow run of phf."""

    def __init__(self, cfg: DictConfig, experiment: str | None = None) -> None:
        """``experiment`` overrides the configured one (a multirun job joins its sweep's)."""
        self.cfg = cfg
        tracking = cfg.tracking
        check_tracking_server(tracking.uri, tracking.connect_timeout_s)
        if tracking.uri:
            mlflow.set_tracking_uri(tracking.uri)
        self.experiment_name = experiment or tracking.experiment or cfg.task.name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tags: dict[str, str] = {}
        self.preempted = False

    def mark_preempted(self, step: int) -> None:
        """The run stops for a preemption after a checkpoint at ``step`` and will be resumed."""
        self.preempted = True
        mlflow.set_tag("phf.preempted_at_step", str(step))

    @property
    def sweep_dir(self) -> str | None:
        """The multirun this run belongs to (its Hydra sweep directory), or None."""
        return self.tags.get("sweep_dir")

    def wait_for_sweep_run(self, objective: str, seed: int, timeout_s: float) -> str:
        """The id of the run of ``objective`` and ``seed`` in this run's multirun, once it has
        FINISHED: jobs of a parallel launcher may start before it ends, so wait (polling every
        10 s) up to ``timeout_s``."""
        assert self.sweep_dir is not None
        deadline = time.monotonic() + timeout_s
        while True:
            found = find_sweep_run(self.experiment_name, self.sweep_dir, objective, seed)
            if found is not None and found[1] == "FINISHED":
                return found[0]
            if found is not None and found[1] in ("FAILED", "KILLED"):
                raise RuntimeError(
                    f"the sweep's {objective} run {found[0]} (seed {seed}) is {found[1]}: "
                    "there is no reference model to measure KL from"
                )
            if time.monotonic() > deadline:
                state = "has not started" if found is None else f"is still {found[1]}"
                raise TimeoutError(
                    f"the sweep's {objective} run (seed {seed}) {state} after {timeout_s:.0f} s; "
                    f"list {objective} first among the sweep's values so that it runs first, "
                    "or raise eval.kl_reference_timeout_min"
                )
            time.sleep(10)

    @property
    def tracking_uri(self) -> str:
        return mlflow.get_tracking_uri()

    @contextmanager
    def run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        extra_artifacts: Mapping[str, str],
        resume_run_id: str | None = None,
    ) -> Iterator[Tracker]:
        """Open the run (or reopen ``resume_run_id``, a run resumed from its checkpoint), and
        end it FINISHED, FAILED (error recorded) or KILLED."""
        experiment = mlflow.set_experiment(self.experiment_name)
        self.experiment_id = experiment.experiment_id
        self.tags = dict(tags)
        if resume_run_id is not None:
            active = mlflow.start_run(run_id=resume_run_id)
            mlflow.set_tags({**self.tags, "resumed": "true"})
        else:
            active = mlflow.start_run(run_name=run_name, tags=self.tags)
        self.run_id = active.info.run_id
        try:
            if resume_run_id is None:  # params and config were logged when the run began
                container = OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)
                mlflow.log_params(flatten(container))
                mlflow.log_text(OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
                for artifact_file, text in extra_artifacts.items():
                    mlflow.log_text(text, artifact_file)
            yield self
        except KeyboardInterrupt:
            mlflow.set_tag("phf.error", "KeyboardInterrupt")
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            if self.preempted:
                # Left RUNNING: the requeued job reopens this run and carries on in it.
                raise
            message = f"{type(sys.exc_info()[1]).__name__}: {sys.exc_info()[1]}"
            mlflow.set_tag("phf.error", message[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status="FAILED")
            raise
        else:
            mlflow.end_run(status="FINISHED")

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, step_name: str = "tokens_seen"
    ) -> None:
        """One batched call (over HTTP each call costs ~50 ms). ``step`` is MLflow's x axis and
        is logged as the metric ``step_name`` too: tokens_seen for pretraining, comparisons_seen
        for reward models, episodes for PPO."""
        mlflow.log_metrics({**metrics, step_name: float(step)}, step=int(step))

    def record_lineage(self, lineage: Mapping[str, str]) -> None:
        """Tag the runs this run builds on ({config key: runs:/<id>/...}) and write a note, shown
        on the run's page in the MLflow UI, that links to each of them."""
        if not lineage:
            return
        tags, lines = {}, ["Built on:"]
        for key, uri in lineage.items():
            run_id = uri.removeprefix("runs:/").split("/", 1)[0]
            tags[f"phf.lineage.{key}"] = run_id
            try:
                experiment_id = mlflow.get_run(run_id).info.experiment_id
                link = f"[{run_id}](#/experiments/{experiment_id}/runs/{run_id})"
            except mlflow.exceptions.MlflowException:
                link = run_id  # a run of another store: its id is all there is
            lines.append(f"- `{key}`: {link} (`{uri}`)")
        mlflow.set_tags({**tags, "mlflow.note.content": "\n".join(lines)})

    def log_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        mlflow.log_table(data=dict(table), artifact_file=artifact_file)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(local_dir), artifact_path)

    def ui_hint(self) -> str:
        """Where the run is and the command that shows it."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            base = uri.rstrip("/")
            how = f"open {base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        else:
            default = uri in ("sqlite:///mlflow.db", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
            command = "mlflow ui" if default else f"mlflow ui --backend-store-uri {uri}"
            how = (
                f"run `{command}` in this directory and open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            )
        return (
            f"MLflow run {self.run_id} (experiment {self.experiment_name!r}, store {uri}).\n"
            f"To see it: {how}"
        )


MLFLOW_URI_PREFIXES = ("runs:/", "models:/")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_URI_PREFIXES)


# (tracking URI, model URI) -> its local copy: a run that names one model twice (a reward model
# started from, and normalised on samples of, runs:/<id>/model) downloads it once.
_DOWNLOADED: dict[tuple[str, str], Path] = {}


def download_model(uri: str) -> Path:
    """A local copy of a model logged to MLflow (``runs:/<run id>/model``), for from_pretrained.

    Uses the current tracking URI (set ``tracking.uri`` to read from a server).
    """
    key = (mlflow.get_tracking_uri(), uri)
    if key in _DOWNLOADED and _DOWNLOADED[key].is_dir():
        return _DOWNLOADED[key]
    try:
        _DOWNLOADED[key] = Path(mlflow.artifacts.download_artifacts(uri))
        return _DOWNLOADED[key]
    except mlflow.exceptions.MlflowException as error:
        raise FileNotFoundError(
            f"cannot fetch {uri} from the MLflow store {mlflow.get_tracking_uri()}: "
            f"{error.message}. Check the run id (the MLflow UI or mlflow.search_runs lists "
            "them) and tracking.uri"
        ) from error


def find_sweep_run(
    experiment: str, sweep_dir: str, objective: str, seed: int
) -> tuple[str, str] | None:
    """(run id, status) of the newest run of ``objective`` and ``seed`` in the multirun
    ``sweep_dir``, or None when it has not started."""
    found = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=(
            f"tags.sweep_dir = '{sweep_dir}' and tags.objective = '{objective}' "
            f"and tags.seed = '{seed}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return None if found.empty else (str(found.run_id.iloc[0]), str(found.status.iloc[0]))


SWEEP_FILE = "mlflow_sweep.json"  # in the Hydra sweep directory: the parent run of a multirun


def start_sweep(
    sweep_dir: Path, experiment: str, tracking_uri: str | None, name: str, swept_keys: list[str]
) -> str:
    """Create the parent run of a multirun and record it, with the keys the multirun varies,
    in ``sweep_dir`` for the jobs."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name=name, tags={"phf.sweep_dir": str(sweep_dir), "sweep": "parent"}
    )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "parent_run_id": run.info.run_id,
        "experiment": experiment,
        "tracking_uri": mlflow.get_tracking_uri(),
        "swept_keys": swept_keys,
    }
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2))
    return run.info.run_id


def read_sweep(sweep_dir: Path) -> dict[str, str] | None:
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finish_sweep(sweep_dir: Path) -> tuple[list[dict[str, str]], str]:
    """End a multirun's parent run with a summary of its children; returns the children
    (run id, status, job, output dir, error) and the summary as Markdown."""
    info = read_sweep(sweep_dir)
    if info is None:
        raise FileNotFoundError(f"{sweep_dir / SWEEP_FILE} not found: not a phf multirun")
    mlflow.set_tracking_uri(info["tracking_uri"])
    client = mlflow.MlflowClient()
    parent = info["parent_run_id"]
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    rows = [
        {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "job": run.data.tags.get("job_num", "?"),
            "overrides": run.data.tags.get("overrides", ""),
            "log": run.data.tags.get("log_file", ""),
            "error": run.data.tags.get("phf.error", ""),
        }
        for run in children
    ]
    rows.sort(key=lambda row: int(row["job"]) if row["job"].isdigit() else 0)
    failed = [row for row in rows if row["status"] != "FINISHED"]
    lines = [
        f"# Sweep {parent}",
        "",
        f"{len(rows) - len(failed)} of {len(rows)} jobs finished; {len(failed)} failed.",
        "",
        "| job | status | overrides | run | log |",
        "|---|---|---|---|---|",
        *(
            f"| {r['job']} | {r['status']} | {r['overrides']} | {r['run_id']} | {r['log']} |"
            for r in rows
        ),
    ]
    for row in failed:
        lines += ["", f"job {row['job']} ({row['overrides']}): {row['error'] or row['status']}"]
    summary = "\n".join(lines) + "\n"
    client.log_text(parent, summary, "sweep_summary.md")
    client.set_tag(parent, "failed_jobs", str(len(failed)))
    client.set_terminated(
        parent, status="FAILED" if failed and len(failed) == len(rows) else "FINISHED"
    )
    return rows, summary


class NullTracker:
    """What the processes other than rank 0 of a data-parallel run track: nothing."""

    run_id = None
    sweep_dir = None
    preempted = False

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, step_name: str = "tokens_seen"
    ) -> None:
        pass

    def log_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        pass

    def mark_preempted(self, step: int) -> None:
        self.preempted = True
