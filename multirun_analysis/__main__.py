"""python -m multirun_analysis <experiment name or id> [--metrics ...] [--out DIR]

Writes DIR/summary.md and DIR/summary.csv: one row per configuration, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multirun_analysis.summary import NoRunsFound, load_runs, summarize, to_markdown

DEFAULT_METRICS = ["score", "score_max_at_25", "eval/lm_loss"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multirun_analysis", description=__doc__)
    parser.add_argument("target", help="MLflow experiment name or id (e.g. toxicity)")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    parser.add_argument("--tracking-uri", default=None, help="default: MLflow's own default")
    parser.add_argument("--out", type=Path, default=Path("analysis"))
    args = parser.parse_args(argv)
    try:
        table = summarize(load_runs(args.target, args.tracking_uri), args.metrics)
    except (NoRunsFound, KeyError) as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table)
    (args.out / "summary.md").write_text(markdown)
    table.to_csv(args.out / "summary.csv", index=False)
    print(markdown)
    print(f"written: {args.out / 'summary.md'}, {args.out / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
