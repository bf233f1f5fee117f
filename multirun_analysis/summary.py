"""Runs -> one row per configuration, with mean and std over seeds of the chosen metrics.

A configuration is the set of params that differ between the runs, leaving out the seed and
the params that do not change results (hardware, tracking): runs that differ only in seed are
repeats of one configuration.
"""

from __future__ import annotations

import mlflow
import pandas as pd

IGNORED_PARAM_PREFIXES = ("params.seed", "params.hardware.", "params.tracking.")


class NoRunsFound(LookupError):
    """Nothing to analyse: no experiment of that name or id, or no finished run in it."""


def load_runs(target: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """The FINISHED runs of a sweep (its parent run's id: the children) or of an experiment
    (by name or id; a sweep's parent run itself is left out), as MLflow's search_runs frame."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    finished = "attributes.status = 'FINISHED'"
    parent = _sweep_parent(target)
    if parent is not None:
        runs = mlflow.search_runs(
            [parent.info.experiment_id],
            filter_string=f"{finished} and tags.mlflow.parentRunId = '{target}'",
        )
        if runs.empty:
            raise NoRunsFound(f"sweep {target} has no FINISHED jobs")
        return runs
    experiment = mlflow.get_experiment_by_name(target)
    if experiment is None and target.isdigit():
        experiment = mlflow.get_experiment(target)
    if experiment is None:
        names = [e.name for e in mlflow.search_experiments()]
        raise NoRunsFound(
            f"no experiment or sweep {target!r} in the MLflow store {mlflow.get_tracking_uri()}; "
            f"experiments there: {names}"
        )
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=finished)
    if "tags.sweep" in runs.columns:
        runs = runs[runs["tags.sweep"] != "parent"]
    if runs.empty:
        raise NoRunsFound(f"experiment {target!r} has no FINISHED runs")
    return runs


def _sweep_parent(target: str):
    """The parent run of a sweep whose id is ``target``, or None."""
    if len(target) != 32 or not all(c in "0123456789abcdef" for c in target):
        return None
    try:
        run = mlflow.get_run(target)
    except mlflow.exceptions.MlflowException:
        return None
    return run if run.data.tags.get("sweep") == "parent" else None


METHOD_PARAM = "params.method.name"


def configuration_label(runs: pd.DataFrame) -> pd.Series:
    """One readable label per run: its method (experiment=method_comparison's arms), the value
    of the one param that varies ("awr"), or "objective.name=awr train.lr=0.1" for several."""
    keys = configuration_columns(runs)
    if not keys:
        return pd.Series("all runs", index=runs.index)
    if METHOD_PARAM in keys:
        return runs[METHOD_PARAM].astype(str)
    frame = runs[keys].astype(str)
    if len(keys) == 1:
        return frame[keys[0]]
    return frame.apply(
        lambda row: " ".join(f"{k.removeprefix('params.')}={row[k]}" for k in keys), axis=1
    )


def configuration_columns(runs: pd.DataFrame) -> list[str]:
    """The params that vary between runs, seed and hardware/tracking params excluded, and
    without the ones another kept param already determines (objective.name determines the
    objective's threshold, so only objective.name is shown). ``*.name`` params come first."""
    params = [
        c
        for c in runs.columns
        if c.startswith("params.") and not c.startswith(IGNORED_PARAM_PREFIXES)
    ]
    frame = runs[params].astype(str)
    varying = [c for c in params if frame[c].nunique(dropna=False) > 1]
    varying.sort(key=lambda c: (not c.endswith(".name"), c))
    kept: list[str] = []
    for column in varying:
        if kept and (frame.groupby(kept)[column].nunique(dropna=False) <= 1).all():
            continue  # a function of the columns already kept
        kept.append(column)
    return kept


def summarize(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per configuration: the varying params, n (seeds), and mean/std of each metric."""
    missing = [m for m in metrics if f"metrics.{m}" not in runs.columns]
    if missing:
        available = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise KeyError(f"metrics {missing} were not logged by these runs; logged: {available}")
    keys = configuration_columns(runs)
    frame = runs.copy()
    if not keys:  # every run is a repeat of one configuration
        frame["params.configuration"] = "all runs"
        keys = ["params.configuration"]
    frame[keys] = frame[keys].astype(str)
    grouped = frame.groupby(keys, sort=True)
    table = grouped.size().rename("n").to_frame()
    for metric in metrics:
        values = grouped[f"metrics.{metric}"]
        table[f"{metric} mean"] = values.mean()
        # std over seeds (ddof=1); a single run has no spread to report.
        table[f"{metric} std"] = values.std(ddof=1)
        # The 95% interval of the mean over seeds (Student's t, n - 1 degrees of freedom).
        counts = values.count()
        table[f"{metric} ci95"] = [
            ci95_half_width(std, n) for std, n in zip(table[f"{metric} std"], counts, strict=True)
        ]
    table = table.reset_index()
    table.columns = [c.removeprefix("params.") for c in table.columns]
    return table


def ci95_half_width(std: float, n: int) -> float:
    """Half the width of a 95% t-interval of a mean of n values with this std (NaN for n < 2)."""
    if n < 2 or pd.isna(std):
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * std / n**0.5)


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table: ``mean ± std`` per metric, and the 95% interval of
    the mean ``[low, high]`` when there are several seeds."""
    metrics = [c.removesuffix(" mean") for c in table.columns if c.endswith(" mean")]
    keys = [c for c in table.columns if not c.endswith((" mean", " std", " ci95"))]
    header = keys + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in keys]
        for metric in metrics:
            mean, std = row[f"{metric} mean"], row[f"{metric} std"]
            if pd.isna(mean):  # not logged by this configuration (e.g. KL of the reference)
                cells.append("—")
                continue
            cell = f"{mean:.{digits}f}"
            if pd.notna(std):
                cell += f" ± {std:.{digits}f}"
            half = row.get(f"{metric} ci95", float("nan"))
            if pd.notna(half):
                cell += f" [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
