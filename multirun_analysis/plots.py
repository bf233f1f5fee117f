"""The paper's two views of a sweep, as PNG figures: misalignment score against held-out LM loss
(or KL) per configuration, and score over tokens seen per configuration."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from multirun_analysis.summary import configuration_label  # noqa: E402


def pareto_plot(runs: pd.DataFrame, x_metric: str | list[str], y_metric: str = "score") -> Figure:
    """One point per configuration (its method, for a method comparison) at its mean over
    seeds, with std error bars on both axes, labelled on the plot: the trade-off between
    alignment (lower ``y_metric``) and capability (lower LM loss, or KL from a reference). With
    several x metrics, one panel each. The KL reference (no ``kl``: it is its own reference)
    sits at KL 0."""
    x_metrics = [x_metric] if isinstance(x_metric, str) else list(x_metric)
    labels = configuration_label(runs)
    figure, panels = plt.subplots(
        1, len(x_metrics), figsize=(6.4 * len(x_metrics), 4.8), squeeze=False
    )
    for axes, x_name in zip(panels[0], x_metrics, strict=True):
        points = []
        for label in sorted(labels.unique()):
            group = runs[labels == label]
            x, y = group[f"metrics.{x_name}"], group[f"metrics.{y_metric}"]
            if y.isna().all():
                continue
            reference = x.isna().all() and x_name == "kl"
            if x.isna().all() and not reference:
                continue
            x = pd.Series(0.0, index=x.index) if reference else x
            axes.errorbar(
                x.mean(),
                y.mean(),
                xerr=x.std(ddof=1) if len(x) > 1 and not reference else None,
                yerr=y.std(ddof=1) if len(y) > 1 else None,
                fmt="o",
                capsize=3,
                label=label,
            )
            points.append((f"{label} (reference)" if reference else label, x.mean(), y.mean()))
        label_points(axes, points)
        axes.set_xlabel(x_name)
        axes.set_ylabel(y_metric)
        axes.set_title(f"{y_metric} vs {x_name} (mean ± std over seeds)")
    panels[0][-1].legend(fontsize="small")
    figure.tight_layout()
    return figure


# Label offsets tried in turn, in points above (+) or below (-) a point, until the label's box
# overlaps no label already placed; with no free place, the first (overlapping).
LABEL_OFFSETS = (5, -14, 17, -26, 29, -38, 41, -50, 53, -62)


def label_points(axes: plt.Axes, points: list[tuple[str, float, float]]) -> None:
    """Write each (text, x, y) next to its point, moving a label up or down (with a line to its
    point) where it would cover another: methods whose means are close stay readable."""
    # The final layout (labels are left out of it) and limits, and a renderer to measure with.
    axes.figure.tight_layout()
    axes.figure.canvas.draw()
    renderer = axes.figure.canvas.get_renderer()

    def place(text: str, x: float, y: float, dy: float) -> tuple[Text, Any]:
        label = axes.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(5, dy),
            fontsize="small",
            arrowprops=None if dy == LABEL_OFFSETS[0] else {"arrowstyle": "-", "lw": 0.5},
        )
        label.set_in_layout(False)
        label.update_positions(renderer)  # an annotation not drawn yet sits at the origin
        # The text's box, not its line, with a margin so that neighbours do not touch.
        return label, Text.get_window_extent(label, renderer).padded(3)

    placed = []
    for text, x, y in sorted(points, key=lambda point: (-point[2], point[1])):
        for dy in LABEL_OFFSETS:
            label, box = place(text, x, y, dy)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        else:
            label, box = place(text, x, y, LABEL_OFFSETS[0])
        placed.append(box)


# What each stage logs as its progress, the x axis of its curves (MLflow's step is the stage's
# optimizer step or iteration).
PROGRESS_METRICS = ("tokens_seen", "episodes", "comparisons_seen", "pairs_seen")


def metric_history(run_id: str, metric: str) -> pd.Series:
    """A run's metric against its progress (tokens seen, episodes, comparisons or pairs seen:
    the one it logged), or against MLflow's step when it logged none."""
    client = mlflow.MlflowClient()
    values = {m.step: m.value for m in client.get_metric_history(run_id, metric)}
    for progress in PROGRESS_METRICS:
        x = {m.step: m.value for m in client.get_metric_history(run_id, progress)}
        if x:
            return pd.Series(
                {x[step]: value for step, value in values.items() if step in x}, dtype=float
            ).sort_index()
    return pd.Series(values, dtype=float).sort_index()


def curve_plot(runs: pd.DataFrame, metric: str = "score") -> Figure:
    """``metric`` over tokens seen (or episodes), one line per configuration (the mean over
    its seeds)."""
    labels = configuration_label(runs)
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for label in sorted(labels.unique()):
        curves = [metric_history(run_id, metric) for run_id in runs.run_id[labels == label]]
        curves = [c for c in curves if not c.empty]
        if not curves:
            continue
        mean = pd.concat(curves, axis=1).mean(axis=1)
        axes.plot(mean.index.to_numpy(), mean.to_numpy(dtype=np.float64), marker=".", label=label)
    axes.set_xlabel("tokens seen (episodes for online RL, pairs for DPO)")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} over training (mean over seeds)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
