"""One MLflow run of phf: opened (or reopened on resume), recorded, and ended with a status.

Everything goes through the ``MlflowClient`` with the run's id, and every call through
``Tracker._send``: when the tracking server stops answering (an ``Outage``), the call's record is
kept in the ``Spool`` on disk instead of blocking, and sent, in order, as soon as a probe finds
the server back (or by the same command run again). The end status is one more record: a run
that cannot reach its server at the end waits ``tracking.outage_grace_s`` for it, then says what
was not recorded and where it is kept.

What a run records (README "MLflow"): the params of its own stage (``phf.config.stage_params``),
tags (task, objective, stage, model, seed, MLflow's source tags), a description, the datasets it
read (``log_input``), metrics against MLflow's step (the stage's optimizer step or iteration) with
the stage's progress (``tokens_seen``, ``episodes``, ...) as a metric of its own, samples
tables, system metrics, its log file, and the final model as an MLflow Model.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from phf.tracking.connection import (
    Outage,
    bound_http_requests,
    check_tracking_server,
    is_http,
    is_unreachable,
)
from phf.tracking.models import log_transformers_model
from phf.tracking.spool import Spool

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # metrics per log_batch call
# The MLflow UI opens experiments without this tag in its GenAI mode (traces, evaluation runs).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UNRECORDED_DIR = "unrecorded"
MAX_TAG_LENGTH = 5000  # what phf keeps of an error in a tag (MLflow allows more)


class TrackingIncomplete(RuntimeError):
    """The run trained, but the tracking server never came back to record all of it."""


def error_tag(error: BaseException) -> str:
    """An error as the value of a run's ``phf.error`` tag: its type and message."""
    return f"{type(error).__name__}: {error}"[:MAX_TAG_LENGTH]


def param_value(value: Any) -> str:
    """A config value as an MLflow param: null as ``null`` (not Python's "None"), booleans as
    true/false, lists and mappings as JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...}, the shape MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, prefix=f"{name}.")
        else:
            flat[name] = param_value(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the phf checkout, or None when phf is not in a git checkout."""
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
        return None
    return commit, bool(dirty)


def source_tags(job: bool) -> dict[str, str]:
    """MLflow's standard source tags (the UI's "Source" and "Version" columns)."""
    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": "phf.run " + " ".join(sys.argv[1:])[:400],
        "mlflow.source.type": "JOB" if job else "LOCAL",
    }
    commit = git_commit()
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["phf.git_dirty"] = "true" if commit[1] else "false"
    return tags


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store across processes: two clients creating the
    schema of a new ``mlflow.db`` at once race in its migration (alembic: "Online migration
    expected to match one row")."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    if path.is_dir():
        # MLflow would retry opening it for about 100 s before giving up.
        raise ValueError(
            f"the MLflow store {uri} names a directory, not a database file; point "
            f"tracking.uri at a file, e.g. sqlite:///{path / 'mlflow.db'}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(uri: str | None) -> MlflowClient:
    """The client of ``uri`` (MLflow's default when None), its schema created under a lock."""
    if uri:
        mlflow.set_tracking_uri(uri)
    resolved = mlflow.get_tracking_uri()
    with store_lock(resolved):
        client = MlflowClient(resolved)
        client.search_experiments(max_results=1)  # creates a new sqlite store's tables
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed, marked as a training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another job
            if experiment is None:
                raise
    if "mlflow.experimentKind" not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return experiment.experiment_id


class Tracker:
    """One MLflow run of phf (see the module docstring)."""

    def __init__(
        self, cfg: DictConfig, output_dir: Path | None = None, experiment: str | None = None
    ) -> None:
        """``experiment`` overrides the configured one (a multirun job joins its sweep's)."""
        self.cfg = cfg
        tracking = cfg.tracking
        check_tracking_server(tracking.uri, tracking.connect_timeout_s)
        if is_http(tracking.uri):
            bound_http_requests(tracking)
        self.client = open_store(tracking.uri)
        self.uri = mlflow.get_tracking_uri()
        self.experiment_name = experiment or tracking.experiment or cfg.task.name
        self.output_dir = output_dir or Path(".")
        self.outage = Outage(self.uri, tracking)
        self.spool = Spool(self.output_dir / UNRECORDED_DIR)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tags: dict[str, str] = {}
        self.preempted = False
        self._note: list[str] = []
        self._lineage: list[str] = []
        self._skip_until: dict[str, int] = {}  # metric -> last step logged before a resume
        self._progress_step: int | None = None
        self._monitor = None

    # ------------------------------------------------------------------------ sending

    def _apply(self, record: dict[str, Any]) -> None:
        """Send one record to the store (raises when the server cannot be reached)."""
        kind, run_id = record["kind"], self.run_id
        if kind == "metrics":
            metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in record["metrics"]]
            for first in range(0, len(metrics), BATCH_LIMIT):
                self.client.log_batch(run_id, metrics=metrics[first : first + BATCH_LIMIT])
        elif kind == "params":
            params = [Param(k, v) for k, v in record["params"].items()]
            for first in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[first : first + 100])
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
            for key in record.get("delete", []):
                try:
                    self.client.delete_tag(run_id, key)
                except mlflow.exceptions.MlflowException as error:
                    if is_unreachable(error):
                        raise
        elif kind == "table":
            self.client.log_table(run_id, record["data"], record["artifact_file"])
        elif kind == "artifact":
            path = Path(record["path"])
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), record["artifact_path"])
            else:
                self.client.log_artifact(run_id, str(path), record["artifact_path"])
        elif kind == "text":
            self.client.log_text(run_id, record["text"], record["artifact_file"])
        elif kind == "inputs":
            self.client.log_inputs(run_id, [_dataset_input(d) for d in record["datasets"]])
        elif kind == "model":
            log_transformers_model(
                run_id, Path(record["directory"]), record["task"], record.get("generation")
            )
        elif kind == "status":
            self.client.set_terminated(run_id, status=record["status"])
        else:
            raise ValueError(f"unknown tracking record {kind!r}")

    def _send(self, record: dict[str, Any]) -> bool:
        """Send ``record``, or keep it in the spool while the server is down; True if sent."""
        if self.outage.down and not self._recovered():
            self.spool.add(record)
            return False
        try:
            self._apply(record)
            return True
        except Exception as error:
            if not is_unreachable(error):
                raise
            self.outage.begin(error)
            self.spool.add(record)
            return False

    def _recovered(self, force: bool = False) -> bool:
        """Probe a down server; when it is back, send the spool and restart system metrics."""
        if not self.outage.probe(force):
            return False
        if not self._flush_spool():
            return False
        self._start_system_metrics(resume=True)
        return True

    def _flush_spool(self) -> bool:
        records = self.spool.records()
        for index, record in enumerate(records):
            try:
                self._apply(record)
            except Exception as error:
                if not is_unreachable(error):
                    raise
                self.outage.begin(error)
                self.spool.replace(records[index:])
                return False
        if records:
            log.info("sent %d records kept while the tracking server was down", len(records))
        self.spool.replace([])
        return True

    # --------------------------------------------------------------------------- a run

    @property
    def sweep_dir(self) -> str | None:
        """The multirun this run belongs to (its Hydra sweep directory), or None."""
        return self.tags.get("sweep_dir")

    @contextmanager
    def run(
        self,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        artifacts: Mapping[str, str],
        description: str = "",
        resume_run_id: str | None = None,
    ) -> Iterator[Tracker]:
        """Open the run (or reopen ``resume_run_id``, a run resumed from its checkpoint), and
        end it FINISHED, FAILED (error recorded), KILLED (a stop signal) or, preempted, leave it
        RUNNING for the requeued job."""
        self.experiment_id = experiment_id(self.client, self.experiment_name)
        self.tags = dict(tags)
        self._note = [description] if description else []
        if resume_run_id is not None:
            self.run_id = resume_run_id
            if len(self.spool):
                log.info("sending what the last attempt could not record: %s", self.spool.summary())
                self._flush_spool()
            run = self.client.get_run(resume_run_id)
            # A metric's last step before the resume: points up to it were logged already.
            self._skip_until = {m.key: m.step for m in run.data._metric_objs}
            self._note = [run.data.tags.get("mlflow.note.content", description)]
            self.client.update_run(resume_run_id, status="RUNNING")
            self._send(
                {
                    "kind": "tags",
                    "tags": {**self.tags, "resumed": "true"},
                    "delete": [k for k in ("phf.error", "phf.stopped_by") if k in run.data.tags],
                }
            )
        else:
            all_tags = {**self.tags, "mlflow.note.content": description}
            created = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = created.info.run_id
            self._close_lost_runs()
            self._send({"kind": "params", "params": flatten(params)})
            self._send(
                {
                    "kind": "text",
                    "text": OmegaConf.to_yaml(self.cfg, resolve=True),
                    "artifact_file": "config.yaml",
                }
            )
            for artifact_file, text in artifacts.items():
                self._send({"kind": "text", "text": text, "artifact_file": artifact_file})
        self._start_system_metrics(resume=resume_run_id is not None)
        try:
            yield self
        except KeyboardInterrupt as error:  # phf.signals.Interrupted: SIGTERM, SIGINT
            self._send({"kind": "tags", "tags": {"phf.stopped_by": str(error)[:MAX_TAG_LENGTH]}})
            self._end("KILLED")
            raise
        except BaseException:
            if self.preempted:
                self._end(None)  # left RUNNING: the requeued job reopens this run
                raise
            self._send({"kind": "tags", "tags": {"phf.error": error_tag(sys.exc_info()[1])}})
            self._send(
                {"kind": "text", "text": traceback.format_exc(), "artifact_file": "error.txt"}
            )
            self._end("FAILED")
            raise
        else:
            self._end("FINISHED", raise_if_unrecorded=True)

    def _close_lost_runs(self) -> None:
        """End KILLED the runs still RUNNING in this run's output directory: a new run starts
        there only when it holds no checkpoint to resume, so their process ended without one
        (kill -9, a lost machine or SLURM node) and nothing will ever end them."""
        output_dir = self.tags.get("output_dir")
        if not output_dir:
            return
        try:
            lost = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.output_dir = '{output_dir}' and attributes.status = 'RUNNING'",
            )
            for run in lost:
                if run.info.run_id == self.run_id:
                    continue
                reason = (
                    f"lost: its process ended before its first checkpoint; run {self.run_id} "
                    f"started over in {output_dir}"
                )
                # It ended when it was last heard from, not now: its duration stays true.
                heard = [m.timestamp for m in run.data._metric_objs] or [run.info.start_time]
                self.client.set_tag(run.info.run_id, "phf.stopped_by", reason)
                self.client.set_terminated(run.info.run_id, status="KILLED", end_time=max(heard))
                log.warning(
                    "MLflow run %s was left RUNNING: ended KILLED (%s)", run.info.run_id, reason
                )
        except Exception as error:  # tidying the store must not stop a run that can train
            log.warning("could not end the lost runs of %s: %s", output_dir, error)

    def _start_system_metrics(self, resume: bool) -> None:
        if not self.cfg.tracking.system_metrics or self.run_id is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:  # psutil missing
            return
        self._monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=resume, tracking_uri=self.uri
        )
        self._monitor.start()

    def _end(self, status: str | None, raise_if_unrecorded: bool = False) -> None:
        """Upload the log, stop system metrics, set the status; with the server down, wait
        tracking.outage_grace_s for it, then keep the rest on disk and say so."""
        if self._monitor is not None:
            if self.outage.down:
                self._monitor._shutdown_event.set()  # its thread ends itself; no join
            else:
                self._monitor.finish()
            self._monitor = None
        log_file = self.output_dir / "phf.log"
        if log_file.is_file():
            # A copy: the live log grows after this point (the traceback, the UI hint).
            kept = self.spool.keep_file(log_file, "phf.log")
            self._send({"kind": "artifact", "path": str(kept), "artifact_path": None})
        if status is not None:
            self._send({"kind": "status", "status": status})
        if self.outage.down:
            deadline = time.monotonic() + float(self.cfg.tracking.outage_grace_s)
            while time.monotonic() < deadline and not self._recovered(force=True):
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        if len(self.spool) == 0:
            self.spool.replace([])  # the kept log copy
            return
        message = (
            f"the MLflow tracking server at {self.uri} did not come back: not recorded in run "
            f"{self.run_id}: {self.spool.summary()}. They are kept in {self.spool.directory}; "
            "run the same command again when the server answers to send them (the run resumes "
            "from its last checkpoint)"
        )
        log.error(message)
        if raise_if_unrecorded:
            raise TrackingIncomplete(message)

    def send_unrecorded(self, run_id: str) -> None:
        """Send what an earlier attempt of run ``run_id`` kept on disk (a finished run whose
        server was down at its end), its end status included."""
        if len(self.spool) == 0:
            return
        self.run_id = run_id
        log.info("sending what the last attempt could not record: %s", self.spool.summary())
        if not self._flush_spool():
            log.error(
                "the tracking server %s still does not answer; kept in %s",
                self.uri,
                self.spool.directory,
            )

    def mark_preempted(self, step: int) -> None:
        """The run stops for a preemption after a checkpoint at ``step`` and will be resumed."""
        self.preempted = True
        self._send({"kind": "tags", "tags": {"phf.preempted_at_step": str(step)}})

    # ------------------------------------------------------------------------ records

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, progress: Mapping[str, int] | None = None
    ) -> None:
        """One batched call (over HTTP each call costs ~50 ms) at MLflow's ``step`` (the stage's
        optimizer step or iteration). ``progress`` ({"tokens_seen": n}) is logged once per step,
        so MLflow offers it as a chart's x axis. Points a resumed run logged before are skipped."""
        values = dict(metrics)
        if progress and self._progress_step != step:
            values |= {name: float(value) for name, value in progress.items()}
            self._progress_step = step
        now = int(time.time() * 1000)
        points = [
            [key, float(value), now, int(step)]
            for key, value in values.items()
            if step > self._skip_until.get(key, -1)
        ]
        if points:
            self._send({"kind": "metrics", "metrics": points})

    def log_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        self._send({"kind": "table", "data": dict(table), "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send({"kind": "text", "text": text, "artifact_file": artifact_file})

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None:
        kept = self.spool.keep_file(local, local.name) if self.outage.down else local
        self._send({"kind": "artifact", "path": str(kept), "artifact_path": artifact_path})

    def log_model(
        self, directory: Path, task: str, generation: Mapping[str, Any] | None = None
    ) -> None:
        """The final model (a ``from_pretrained`` directory) as the run's MLflow Model."""
        self._send(
            {
                "kind": "model",
                "directory": str(directory.resolve()),
                "task": task,
                "generation": dict(generation or {}),
            }
        )

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """The datasets the run reads (MLflow's Dataset column): name, source, digest, context
        (training | evaluation), and a profile."""
        self._send({"kind": "inputs", "datasets": datasets})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._send({"kind": "tags", "tags": dict(tags)})

    def record_lineage(self, lineage: Mapping[str, str]) -> None:
        """Tag the runs this run builds on ({config key: runs:/<id>/...}) and add to the note,
        shown on the run's page in the MLflow UI, a link to each of them."""
        if not lineage:
            return
        tags, lines = {}, ["", "Built on:"]
        for key, uri in lineage.items():
            run_id = uri.removeprefix("runs:/").split("/", 1)[0]
            tags[f"phf.lineage.{key}"] = run_id
            try:
                experiment = self.client.get_run(run_id).info.experiment_id
                link = f"[{run_id}](#/experiments/{experiment}/runs/{run_id})"
            except mlflow.exceptions.MlflowException:
                link = run_id  # a run of another store: its id is all there is
            lines.append(f"- `{key}`: {link} (`{uri}`)")
        if not any("Built on:" in part for part in self._note):
            self._note += lines
        self.set_tags({**tags, "mlflow.note.content": "\n".join(self._note)})

    def ui_hint(self) -> str:
        """Where the run is and the command that shows it."""
        uri = self.uri
        if is_http(uri):
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

    def run_status(self, run_id: str) -> str | None:
        try:
            return self.client.get_run(run_id).info.status
        except mlflow.exceptions.MlflowException:
            return None


def _dataset_input(record: dict[str, Any]) -> DatasetInput:
    """A dataset record of log_datasets as MLflow's DatasetInput (source and digest shown in
    the UI's Dataset column, the profile in its details)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if record["source_type"] == "hub":
        source = HuggingFaceDatasetSource(path=record["source"], split=record.get("split"))
    else:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a file
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(record["source"])
    entity = Dataset(
        name=record["name"],
        digest=record["digest"][:36],
        source_type=source._get_source_type(),
        source=source.to_json(),
        profile=json.dumps(record.get("profile", {})),
    )
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", record["context"])])


class NullTracker:
    """What the processes other than rank 0 of a data-parallel run track: nothing."""

    run_id = None
    sweep_dir = None
    preempted = False

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    log_table = log_text = log_artifact = log_model = log_datasets = set_tags = log_metrics

    def send_unrecorded(self, run_id: str) -> None:
        """Send what an earlier attempt of run ``run_id`` kept on disk (a finished run whose
        server was down at its end), its end status included."""
        if len(self.spool) == 0:
            return
        self.run_id = run_id
        log.info("sending what the last attempt could not record: %s", self.spool.summary())
        if not self._flush_spool():
            log.error(
                "the tracking server %s still does not answer; kept in %s",
                self.uri,
                self.spool.directory,
            )

    def mark_preempted(self, step: int) -> None:
        self.preempted = True
