"""Everything phf records in MLflow. This package is the only place that imports mlflow.

- ``run``: one run (``Tracker``): params, tags, metrics, tables, datasets, the final model, and
  its end status, sent through a connection that an outage of the server cannot stall;
- ``connection``: bounded requests, the outage and its probe; ``spool``: what waits on disk;
- ``models``: models as MLflow Models, and model URIs back to ``from_pretrained`` directories;
- ``sweeps``: a multirun as one parent run with its jobs as children.
"""

from phf.tracking.connection import TrackingServerUnreachable, check_tracking_server
from phf.tracking.models import download_model, is_mlflow_uri, resolve_model_source
from phf.tracking.run import NullTracker, Tracker, TrackingIncomplete, flatten, git_commit
from phf.tracking.sweeps import (
    SweepError,
    child_tags,
    finish_sweep,
    job_run_name,
    read_sweep,
    record_job_failure,
    start_sweep,
    wait_for_sweep_run,
)

__all__ = [
    "NullTracker",
    "SweepError",
    "Tracker",
    "TrackingIncomplete",
    "TrackingServerUnreachable",
    "check_tracking_server",
    "child_tags",
    "download_model",
    "finish_sweep",
    "flatten",
    "git_commit",
    "is_mlflow_uri",
    "job_run_name",
    "read_sweep",
    "record_job_failure",
    "resolve_model_source",
    "start_sweep",
    "wait_for_sweep_run",
]
