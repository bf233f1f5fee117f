"""Compare the runs of a sweep or an experiment, read back from MLflow."""

from multirun_analysis.summary import load_runs, summarize, to_markdown

__all__ = ["load_runs", "summarize", "to_markdown"]
