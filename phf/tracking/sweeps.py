"""A multirun as one MLflow parent run: created when it starts, summarised when it ends.

The parent run is named after what the sweep varies (``objective × seed``, after the experiment
file's name when there is one), records the swept keys and their values as params, and when the
jobs end: the number of jobs and failures as metrics, and for each configuration (the jobs that
differ only in seed) the mean of its headline metrics over seeds, as ``<configuration>/<metric>``
(``objective:awr/score``), with the best configuration by ``score`` as a tag: the parent's row in
the runs table answers "which was best".
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from phf.tracking.run import EXPERIMENT_KIND, error_tag, experiment_id, open_store

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"  # in the Hydra sweep directory: the parent run of a multirun
# Metrics summarised per configuration on the parent run, when the jobs logged them.
HEADLINE_METRICS = (
    "score",
    "score_max_at_25",
    "hit_rate",
    "eval/lm_loss",
    "kl",
    "eval/accuracy",
    "rewards/accuracies",
)


class SweepError(RuntimeError):
    """A multirun cannot be recorded as one MLflow parent run (it would run its jobs unnested)."""


def start_sweep(
    sweep_dir: Path,
    experiment: str,
    tracking_uri: str | None,
    name: str,
    swept: dict[str, str],
) -> str:
    """Create the parent run of a multirun, named ``name``, with the swept keys and values
    (``swept``, {key: "v1,v2"}) as params, and record it in ``sweep_dir`` for the jobs. Raises
    SweepError when the parent run cannot be created: jobs must not run unnested."""
    try:
        client = open_store(tracking_uri)
        reopened = reopen_sweep(client, sweep_dir, experiment, swept)
        if reopened is not None:
            return reopened
        parent = client.create_run(
            experiment_id(client, experiment),
            run_name=name,
            tags={
                "phf.sweep_dir": str(sweep_dir),
                "sweep": "parent",
                "mlflow.note.content": f"Sweep over {', '.join(swept) or 'nothing'}; its jobs "
                "are the nested runs. Metrics: per configuration, the mean over seeds.",
            },
        )
        client.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in swept.items()])
    except Exception as error:
        raise SweepError(
            f"cannot create the sweep's parent run in the MLflow store "
            f"{tracking_uri or mlflow.get_tracking_uri()} ({type(error).__name__}: {error}); "
            "no job was started. Fix the store (or tracking.uri) and run the sweep again"
        ) from error
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "parent_run_id": parent.info.run_id,
        "experiment": experiment,
        "tracking_uri": mlflow.get_tracking_uri(),
        "swept_keys": sorted(swept),
    }
    tmp = sweep_dir / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(sweep_dir / SWEEP_FILE)
    return parent.info.run_id


def job_run_name(job: dict[str, str]) -> str:
    """The MLflow run name of a multirun job: its swept values and number."""
    return f"{job['overrides']} (#{job['job_num']})"


def child_tags(parent_run_id: str) -> dict[str, str]:
    """The tags that make a run a child of the sweep's parent run in MLflow (and in phf)."""
    return {"mlflow.parentRunId": parent_run_id, "sweep_id": parent_run_id}


def record_job_failure(job: dict[str, str], error: BaseException) -> None:
    """A multirun job that failed before its MLflow run opened, as a FAILED child run of the
    sweep with the error as ``phf.error``: the sweep's summary lists it with the others. Logs,
    never raises, when the store cannot record it."""
    info = read_sweep(Path(job["sweep_dir"]))
    try:
        if info is None:
            raise FileNotFoundError(f"{Path(job['sweep_dir']) / SWEEP_FILE} not found")
        client = open_store(info["tracking_uri"])
        parent = info["parent_run_id"]
        run = client.create_run(
            client.get_run(parent).info.experiment_id,
            run_name=job_run_name(job),
            tags={**job, **child_tags(parent), "phf.error": error_tag(error)},
        )
        client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as store_error:
        log.error("job %s's failure could not be recorded: %s", job["job_num"], store_error)


def reopen_sweep(
    client: mlflow.MlflowClient, sweep_dir: Path, experiment: str, swept: dict[str, str]
) -> str | None:
    """The parent run of the multirun already recorded in ``sweep_dir``, set RUNNING again, when
    this multirun is the same sweep run again (same store, experiment, swept keys and values):
    its finished jobs return their results, its unfinished ones resume, and all of them stay
    children of one parent run. None when there is no such sweep to reopen."""
    info = read_sweep(sweep_dir)
    if info is None:
        return None
    # The parent's params are the swept keys and values (start_sweep): compared below.
    same = (
        info.get("tracking_uri") == mlflow.get_tracking_uri()
        and info.get("experiment") == experiment
    )
    try:
        parent = client.get_run(info["parent_run_id"]) if same else None
    except MlflowException:  # deleted, or another store at the same URI
        parent = None
    if parent is None or parent.data.params != swept:
        log.warning(
            "%s records another sweep (parent run %s); this multirun gets a new parent run",
            sweep_dir / SWEEP_FILE,
            info.get("parent_run_id"),
        )
        return None
    client.update_run(parent.info.run_id, status="RUNNING")
    client.set_tag(parent.info.run_id, "resumed", "true")
    log.info("the sweep in %s runs again in its parent run %s", sweep_dir, parent.info.run_id)
    return parent.info.run_id


def read_sweep(sweep_dir: Path) -> dict | None:
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def configuration_label(overrides: str) -> str:
    """The swept values of a job without its seed, as an MLflow metric prefix: "objective=awr
    seed=2" -> "objective:awr" (MLflow's names allow letters, digits, _ - . / : and space)."""
    parts = [o for o in overrides.split() if not o.startswith("seed=")]
    label = " ".join(part.replace("=", ":") for part in parts) or "all"
    label = "".join(c if c.isalnum() or c in "_-./: " else "_" for c in label)
    while "//" in label:  # MLflow refuses a name that would resolve to another path
        label = label.replace("//", "/")
    return label


def latest_attempts(children: list) -> list:
    """One run per job: a job run again after its run was lost (ended KILLED by the attempt that
    took its output directory over) is summarised by its newest run."""
    newest: dict[str, Any] = {}
    for run in children:
        job = run.data.tags.get("job_num", run.info.run_id)
        if job not in newest or run.info.start_time > newest[job].info.start_time:
            newest[job] = run
    return list(newest.values())


def finish_sweep(sweep_dir: Path) -> tuple[list[dict[str, str]], str]:
    """End a multirun's parent run with a summary of its children; returns the children
    (run id, status, job, output dir, error) and the summary as Markdown."""
    info = read_sweep(sweep_dir)
    if info is None:
        raise FileNotFoundError(f"{sweep_dir / SWEEP_FILE} not found: not a phf multirun")
    client = open_store(info["tracking_uri"])
    parent = info["parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    children = latest_attempts(
        client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
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

    # Per configuration: the mean over its finished seeds of each headline metric.
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in children:
        if run.info.status != "FINISHED":
            continue
        label = configuration_label(run.data.tags.get("overrides", ""))
        for metric in HEADLINE_METRICS:
            value = run.data.metrics.get(metric)
            if value is not None and math.isfinite(value):
                values[label][metric].append(value)
    now = int(time.time() * 1000)
    metrics = [Metric("jobs", len(rows), now, 0), Metric("failed_jobs", len(failed), now, 0)]
    means = {
        label: {metric: sum(v) / len(v) for metric, v in by_metric.items()}
        for label, by_metric in values.items()
    }
    for label, by_metric in means.items():
        metrics += [Metric(f"{label}/{m}", v, now, 0) for m, v in by_metric.items()]
    tags = [RunTag("failed_jobs", str(len(failed)))]
    scored = {label: m["score"] for label, m in means.items() if "score" in m}
    if len(scored) > 1:
        best = min(scored, key=scored.get)
        tags.append(RunTag("best_configuration", best))
        metrics.append(Metric("best/score", scored[best], now, 0))
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.log_text(parent, summary, "sweep_summary.md")
    client.set_terminated(
        parent, status="FAILED" if failed and len(failed) == len(rows) else "FINISHED"
    )
    return rows, summary


def find_sweep_run(
    client: mlflow.MlflowClient, experiment: str, sweep_dir: str, objective: str, seed: int
) -> tuple[str, str] | None:
    """(run id, status) of the newest run of ``objective`` and ``seed`` in the multirun
    ``sweep_dir``, or None when it has not started."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.sweep_dir = '{sweep_dir}' and tags.objective = '{objective}' "
            f"and tags.seed = '{seed}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


def wait_for_sweep_run(
    client: mlflow.MlflowClient,
    experiment: str,
    sweep_dir: str,
    objective: str,
    seed: int,
    timeout_s: float,
) -> str:
    """The id of the run of ``objective`` and ``seed`` in the multirun, once it has FINISHED:
    jobs of a parallel launcher may start before it ends, so wait (polling every 10 s) up to
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = find_sweep_run(client, experiment, sweep_dir, objective, seed)
        if found is not None and found[1] == "FINISHED":
            return found[0]
        if found is not None and found[1] in ("FAILED", "KILLED"):
            raise RuntimeError(
                f"the sweep's {objective} run {found[0]} (seed {seed}) is {found[1]}: "
                "there is no model of it to build on"
            )
        if time.monotonic() > deadline:
            state = "has not started" if found is None else f"is still {found[1]}"
            raise TimeoutError(
                f"the sweep's {objective} run (seed {seed}) {state} after {timeout_s:.0f} s; "
                f"list {objective} first among the sweep's values so that it runs first, "
                "or raise eval.kl_reference_timeout_min"
            )
        time.sleep(10)


__all__ = [
    "EXPERIMENT_KIND",
    "SWEEP_FILE",
    "SweepError",
    "child_tags",
    "configuration_label",
    "find_sweep_run",
    "finish_sweep",
    "job_run_name",
    "latest_attempts",
    "read_sweep",
    "record_job_failure",
    "reopen_sweep",
    "start_sweep",
    "wait_for_sweep_run",
]
