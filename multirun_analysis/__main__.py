"""python -m multirun_analysis <sweep id | experiment name> [--metrics ...] [--out DIR]

Reads the FINISHED runs of a sweep (the id of its MLflow parent run, which `phf -m` prints) or
of an experiment, from any tracking URI, and writes to DIR:
- summary.md, summary.csv: one row per configuration (per method of a method comparison), mean ±
  std over seeds of each metric and the 95% interval of its mean;
- pareto.png: score against held-out LM loss (or --x kl, or --x kl eval/lm_loss: one panel each)
  per configuration, labelled;
- curves.png: score over tokens seen per configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multirun_analysis.plots import curve_plot, pareto_plot
from multirun_analysis.summary import NoRunsFound, load_runs, summarize, to_markdown

DEFAULT_METRICS = ["score", "score_max_at_25", "eval/lm_loss"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multirun_analysis", description=__doc__)
    parser.add_argument("target", help="sweep id (parent run id) or experiment name or id")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    parser.add_argument("--tracking-uri", default=None, help="default: MLflow's own default")
    parser.add_argument("--out", type=Path, default=Path("analysis"))
    parser.add_argument(
        "--x", nargs="+", default=["eval/lm_loss"], help="x axis (axes) of the Pareto plot"
    )
    parser.add_argument("--y", default="score", help="y axis of both plots")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.target, args.tracking_uri)
        table = summarize(runs, args.metrics)
        summarize(runs, [*args.x, args.y])  # the plotted metrics must exist too
    except (NoRunsFound, KeyError) as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table)
    (args.out / "summary.md").write_text(markdown)
    table.to_csv(args.out / "summary.csv", index=False)
    pareto_plot(runs, args.x, args.y).savefig(args.out / "pareto.png", dpi=120)
    curve_plot(runs, args.y).savefig(args.out / "curves.png", dpi=120)
    print(markdown)
    written = ", ".join(
        str(args.out / f) for f in ("summary.md", "summary.csv", "pareto.png", "curves.png")
    )
    print(f"written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
