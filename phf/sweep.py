"""Multiruns (``phf -m ...``) as one MLflow parent run with a child run per job.

The parent run is created when the multirun starts (``SweepCallback.on_multirun_start``, on the
machine that launches it) and recorded in the sweep directory; every job finds it there, joins
its experiment as a child run tagged with the sweep id and a configuration signature, and never
takes the sweep down with it: a failing job ends its own run FAILED and the others go on. When
all jobs have returned, the parent run gets a summary of which jobs failed and where their logs
are, and the command exits non-zero if any did.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from phf.tracking import finish_sweep, read_sweep, start_sweep

log = logging.getLogger(__name__)

# Overrides that do not change what is computed, only where or how often: left out of the
# signature so that the seeds of one configuration, on any hardware, group together.
NON_SEMANTIC_PREFIXES = ("seed=", "hardware", "tracking", "hydra", "+hydra", "~hydra")


def signature(overrides: list[str]) -> str:
    """A short hash of a job's semantic overrides (seed, hardware, tracking, hydra left out)."""
    semantic = sorted(o for o in overrides if not o.lstrip("+~").startswith(NON_SEMANTIC_PREFIXES))
    return hashlib.sha256("\n".join(semantic).encode()).hexdigest()[:12]


class SweepCallback(Callback):
    """Registered in conf/config.yaml (hydra.callbacks.sweep); acts only in multirun mode."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an exception here into a warning and launches the jobs anyway; each job
        # then refuses to run without the sweep's record (phf.run.execute), so a sweep whose
        # parent run cannot be created fails at its first job instead of running unnested.
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        experiment = config.tracking.experiment or config.task.name
        swept = swept_values(config)
        parent = start_sweep(
            sweep_dir, experiment, config.tracking.uri, sweep_name(config, swept), swept
        )
        log.info("MLflow sweep run %s (experiment %r), jobs are its children", parent, experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows, summary = finish_sweep(Path(config.hydra.sweep.dir).resolve())
        print(summary, flush=True)
        failed = [row for row in rows if row["status"] != "FINISHED"]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(rows)} jobs failed; see the summary above")


def swept_values(config: DictConfig) -> dict[str, str]:
    """The keys a multirun varies and their values as written ({"objective": "mle,awr"}): sweep
    overrides (a=1,2 or range/choice/glob) on the command line and the sweeper's params from
    the config (named sweeps in conf/experiment/); the command line wins."""
    values = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params", None) or {}).items()}
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    for override in parsed:
        if override.is_sweep_override():
            values[override.key_or_group] = override.input_line.split("=", 1)[1]
    return dict(sorted(values.items()))


def sweep_name(config: DictConfig, swept: dict[str, str]) -> str:
    """The parent run's name: what the sweep varies, after the experiment file's name when it
    has one ("objective_comparison: objective × seed")."""
    axes = " × ".join(swept) or "one job"
    experiment = config.hydra.runtime.choices.get("experiment")
    return f"{experiment}: {axes}" if experiment not in (None, "null") else f"sweep: {axes}"


def job_info() -> dict[str, str] | None:
    """The multirun job this process runs, for its run's tags; None in a single run."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    overrides = list(hydra_cfg.overrides.task)
    sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
    sweep = read_sweep(sweep_dir) or {}
    swept = set(sweep.get("swept_keys", []))
    varying = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    # A multirun that sweeps nothing is labelled by its semantic overrides: a tracking URI
    # ("sqlite:////...") in a label is not a valid MLflow metric name for the parent's means.
    semantic = [o for o in overrides if not o.lstrip("+~").startswith(NON_SEMANTIC_PREFIXES)]
    return {
        "sweep_dir": str(sweep_dir),
        "job_num": str(hydra_cfg.job.num),
        # The values this job takes for the swept keys, e.g. "objective=awr seed=2".
        "overrides": " ".join(varying or semantic),
        "signature": signature(overrides),
        "log_file": str(Path(hydra_cfg.runtime.output_dir).resolve() / f"{hydra_cfg.job.name}.log"),
    }
