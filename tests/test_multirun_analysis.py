"""multirun_analysis on a real MLflow store: grouping by configuration, mean and std over seeds."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from matplotlib.text import Text

from multirun_analysis.__main__ import main
from multirun_analysis.plots import curve_plot, pareto_plot
from multirun_analysis.summary import NoRunsFound, load_runs, summarize, to_markdown


@pytest.fixture
def store(run_dir: Path, tracking_uri: str) -> str:
    """Four finished runs (two objectives x two seeds) and one failed run."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("toxicity")
    scores = {("mle", 0): 0.2, ("mle", 1): 0.4, ("filtering", 0): 0.1, ("filtering", 1): 0.1}
    thresholds = {"mle": "None", "filtering": "0.1"}  # determined by the objective: not shown
    for (objective, seed), score in scores.items():
        with mlflow.start_run():
            mlflow.log_params(
                {
                    "objective.name": objective,
                    "objective.threshold": thresholds[objective],
                    "seed": seed,
                    "hardware.name": "cpu",
                }
            )
            mlflow.log_metrics({"score": 1.0, "eval/lm_loss": 9.0}, step=0)
            mlflow.log_metrics({"score": score, "eval/lm_loss": 3.0 + seed}, step=100)
    with mlflow.start_run():
        mlflow.log_params({"objective.name": "mle", "seed": 2, "hardware.name": "cpu"})
        mlflow.log_metric("score", 99.0)
        mlflow.end_run(status="FAILED")
    return tracking_uri


def test_summary_groups_seeds_of_one_configuration(store: str) -> None:
    table = summarize(load_runs("toxicity", store), ["score", "eval/lm_loss"])
    assert list(table["objective.name"]) == ["filtering", "mle"]  # failed run left out
    mle = table.set_index("objective.name").loc["mle"]
    assert mle["n"] == 2
    assert mle["score mean"] == pytest.approx(0.3)
    assert mle["score std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of 0.2, 0.4
    assert mle["eval/lm_loss mean"] == pytest.approx(3.5)


def test_a_metric_a_configuration_did_not_log_shows_as_a_dash() -> None:
    runs = pd.DataFrame(
        {
            "params.objective.name": ["mle", "awr"],
            "metrics.kl": [float("nan"), 2.5],
        }
    )
    lines = to_markdown(summarize(runs, ["kl"])).splitlines()
    assert lines[2:] == ["| awr | 1 | 2.5000 |", "| mle | 1 | — |"]


def test_a_second_varying_param_is_kept() -> None:
    runs = pd.DataFrame(
        {
            "params.objective.name": ["mle", "mle", "awr", "awr"],
            "params.objective.alpha": ["1.0", "1.0", "0.5", "0.5"],  # follows objective.name
            "params.train.lr": ["0.1", "0.2", "0.1", "0.2"],  # varies on its own
            "params.seed": ["0", "1", "0", "1"],
            "metrics.score": [1.0, 2.0, 3.0, 4.0],
        }
    )
    table = summarize(runs, ["score"])
    assert list(table.columns[:2]) == ["objective.name", "train.lr"]
    assert len(table) == 4


def test_cli_writes_markdown_and_csv(store: str, run_dir: Path) -> None:
    out = run_dir / "analysis"
    assert main(["toxicity", "--tracking-uri", store, "--metrics", "score", "--out", str(out)]) == 0
    markdown = (out / "summary.md").read_text().splitlines()
    assert markdown[0] == "| objective.name | n | score |"
    assert markdown[2] == "| filtering | 2 | 0.1000 ± 0.0000 [0.1000, 0.1000] |"
    # mean ± std [95% t-interval of the mean]: 0.3 ± 12.706 x 0.1414 / sqrt(2)
    assert markdown[3] == "| mle | 2 | 0.3000 ± 0.1414 [-0.9706, 1.5706] |"
    csv = pd.read_csv(out / "summary.csv")
    assert list(csv.columns) == ["objective.name", "n", "score mean", "score std", "score ci95"]
    for png in ("pareto.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_plot_puts_each_configuration_at_its_mean(store: str) -> None:
    axes = pareto_plot(load_runs("toxicity", store), "eval/lm_loss").axes[0]
    labels = {text.get_text() for text in axes.get_legend().get_texts()}
    assert labels == {"filtering", "mle"}  # the one varying param's values
    series = [line for line in axes.lines if line.get_marker() == "o"]  # not the error bars
    data = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in series)
    # filtering: lm_loss 3.0 and 4.0 (seeds 0, 1) -> 3.5, score 0.1; mle: 3.5, 0.3.
    assert data == [(3.5, pytest.approx(0.1)), (3.5, pytest.approx(0.3))]
    assert axes.get_xlabel() == "eval/lm_loss" and axes.get_ylabel() == "score"


def test_curve_plot_averages_the_seeds_over_tokens_seen(store: str) -> None:
    axes = curve_plot(load_runs("toxicity", store), "score").axes[0]
    curves = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines
    }
    assert curves["mle"] == ([0, 100], [1.0, pytest.approx(0.3)])
    assert curves["filtering"] == ([0, 100], [1.0, pytest.approx(0.1)])


def test_unknown_experiment_and_metric_are_clear_errors(store: str, capsys) -> None:
    with pytest.raises(NoRunsFound, match="no experiment or sweep 'nope'.*toxicity"):
        load_runs("nope", store)
    assert main(["toxicity", "--tracking-uri", store, "--metrics", "kl"]) == 2
    assert "metrics ['kl'] were not logged" in capsys.readouterr().err


def test_a_method_comparison_is_labelled_and_plotted_by_method() -> None:
    """Arms of experiment=method_comparison: one labelled point per method at its mean over
    seeds, KL and LM loss panels, the KL reference at 0, the seeds aggregated in the table."""
    rows = []
    for method, objective, kl, score in (
        ("mle", "mle", None, 0.30),
        ("conditional", "conditional", 10.0, 0.20),
        ("conditional_ft", "conditional", 4.0, 0.25),
    ):
        for seed in (0, 1, 2):
            rows.append(
                {
                    "params.method.name": method,
                    "params.objective.name": objective,
                    "params.model.pretrained": "null"
                    if method != "conditional_ft"
                    else "sweep:mle",
                    "params.seed": str(seed),
                    "metrics.kl": float("nan") if kl is None else kl + seed,
                    "metrics.score": score + 0.01 * seed,
                    "metrics.eval/lm_loss": 5.0 + seed,
                }
            )
    runs = pd.DataFrame(rows)
    table = summarize(runs, ["score", "kl"]).set_index("method.name")
    assert list(table["n"]) == [3, 3, 3]
    assert table.loc["conditional_ft", "score mean"] == pytest.approx(0.26)
    assert table.loc["conditional", "kl mean"] == pytest.approx(11.0)
    figure = pareto_plot(runs, ["kl", "eval/lm_loss"])
    kl_axes, loss_axes = figure.axes[:2]
    assert kl_axes.get_xlabel() == "kl" and loss_axes.get_xlabel() == "eval/lm_loss"
    texts = {t.get_text() for t in kl_axes.texts}
    assert texts == {"mle (reference)", "conditional", "conditional_ft"}
    markers = sorted(
        (float(line.get_xdata()[0]), round(float(line.get_ydata()[0]), 4))
        for line in kl_axes.lines
        if line.get_marker() == "o"
    )
    assert markers == [(0.0, 0.31), (5.0, 0.26), (11.0, 0.21)]
    legend = {t.get_text() for t in loss_axes.get_legend().get_texts()}
    assert legend == {"mle", "conditional", "conditional_ft"}


def test_labels_of_close_methods_do_not_cover_each_other() -> None:
    rows = [
        {
            "params.method.name": method,
            "params.seed": str(seed),
            "metrics.kl": kl + 0.01 * seed,
            "metrics.score": score,
            "metrics.eval/lm_loss": 5.0,
        }
        for method, kl, score in (("ppo", 5.0, 0.040), ("grpo", 5.1, 0.0401), ("rloo", 4.9, 0.0399))
        for seed in (0, 1)
    ] + [
        {
            "params.method.name": "awr",
            "params.seed": "0",
            "metrics.kl": 15.0,
            "metrics.score": 0.06,
            "metrics.eval/lm_loss": 6.0,
        }
    ]
    figure = pareto_plot(pd.DataFrame(rows), "kl")
    figure.canvas.draw()
    axes = figure.axes[0]
    boxes = [Text.get_window_extent(text) for text in axes.texts]  # the texts, not their lines
    assert {text.get_text() for text in axes.texts} == {"ppo", "grpo", "rloo", "awr"}
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
