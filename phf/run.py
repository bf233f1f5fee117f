"""phf's one entry point: ``python -m phf.run`` (or ``phf``) composes a run and dispatches it.

python -m phf.run                                  # tiny GPT-2, MLE, built-in toxicity data
python -m phf.run --help                           # the config groups and their options
python -m phf.run --cfg job                        # print the composed config, run nothing
python -m phf.run train.num_tokens=100000 seed=1   # override any key
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m phf.run: tune the allocator first (phf/launch.py)
    from phf.launch import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

import logging
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from phf.checkpoints import checkpoint_config, checkpoint_info, find_checkpoint
from phf.config import (
    CONF_DIR,
    ConfigError,
    register_schemas,
    resume_differences,
    stage_params,
    validate_config,
)
from phf.distributed import init_distributed
from phf.signals import Interrupted, StopSignals
from phf.stages.common import resolve_sweep_references
from phf.stages.dpo import DPOStage
from phf.stages.grpo import GRPOStage, RLOOStage
from phf.stages.loop import Stage, read_run_state, run_stage
from phf.stages.ppo import PPOStage
from phf.stages.pretrain import PretrainStage
from phf.stages.reward import RewardStage
from phf.stages.sft import SFTStage
from phf.sweep import job_info
from phf.tracking import (
    NullTracker,
    SweepError,
    Tracker,
    child_tags,
    job_run_name,
    read_sweep,
    record_job_failure,
)
from phf.tracking.run import source_tags

log = logging.getLogger(__name__)

# objective.stage -> the stage it runs (each stage class describes itself: title, config
# section, model references, how it shares a batch). The Stage enum in phf/config.py makes
# Hydra refuse any other value at compose time.
STAGES: dict[str, type[Stage]] = {
    "pretrain": PretrainStage,
    "reward": RewardStage,
    "ppo": PPOStage,
    "sft": SFTStage,
    "dpo": DPOStage,
    "grpo": GRPOStage,
    "rloo": RLOOStage,
}
# Every stage's own config section: a run logs only its own as params.
STAGE_SECTIONS = tuple(stage.section for stage in STAGES.values() if stage.section)

register_schemas()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def stage_name(cfg: DictConfig) -> str:
    stage = cfg.objective.stage
    return getattr(stage, "value", stage)


def run_description(cfg: DictConfig, stage: type[Stage]) -> str:
    """The run's description on its MLflow page: what it trains, on what, from what."""
    start = (
        f"from `{cfg.model.pretrained}`"
        if cfg.model.pretrained
        else f"from a randomly initialised `{cfg.model.name}` model"
    )
    return (
        f"**{stage.title}**, objective `{cfg.objective.name}`, task `{cfg.task.name}` "
        f"(dataset `{cfg.task.dataset}`), {start}; seed {cfg.seed}. The config is the "
        "`config.yaml` artifact; the x axis of the charts is the step (optimizer step or "
        "iteration): pick the metric `tokens_seen` (or `episodes`, `comparisons_seen`) to plot "
        "against the data seen."
    )


def resumable_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The checkpoint this run resumes from, or None; refuses (ConfigError) one written with a
    different config, which would silently continue another experiment."""
    if not cfg.train.resume:
        return None
    checkpoint = find_checkpoint(output_dir)
    if checkpoint is None:
        return None
    saved = checkpoint_config(checkpoint)
    differences = resume_differences(saved, cfg) if saved is not None else []
    if differences:
        raise ConfigError(
            f"{output_dir} holds a checkpoint ({checkpoint.name}) of a run with another config:\n"
            + "\n".join(f"  - {d}" for d in differences)
            + f"\nrun it in a new directory (hydra.run.dir=<new dir>), or start {output_dir} "
            "over with train.resume=false, or resume it with the same config"
        )
    return checkpoint


def execute(
    cfg: DictConfig, output_dir: Path, overrides: list[str], job: dict[str, str] | None = None
) -> float:
    """Run one composed config: check it, seed, open (or reopen) the MLflow run, run the stage,
    close the run.

    ``job`` describes the multirun job this run is (phf.sweep.job_info), or is None for a single
    run. A job joins its sweep's parent MLflow run, and its failure is recorded (run FAILED,
    error tagged) without raising, so that the sweep's other jobs go on and its summary, at the
    end, lists it: a job that fails before its run opens (a config refused, a checkpoint of
    another config) gets a FAILED run carrying the error.
    """
    if job is None:
        return execute_run(cfg, output_dir, overrides, None)
    try:
        return execute_run(cfg, output_dir, overrides, job)
    except SweepError:
        raise  # no parent run to record it under: the sweep must not go on unnested
    except Exception as error:
        if not init_distributed().is_main:
            raise
        log.exception("job %s failed before its MLflow run opened (%s)", job["job_num"], job)
        record_job_failure(job, error)
        return float("nan")


def execute_run(
    cfg: DictConfig, output_dir: Path, overrides: list[str], job: dict[str, str] | None
) -> float:
    """execute() without the outer guard of a multirun job."""
    validate_config(cfg)  # before any model is built or MLflow run opened
    stage = STAGES[stage_name(cfg)]
    seed_everything(cfg.seed)
    with StopSignals() as signals:
        if not init_distributed().is_main:
            # A data-parallel process other than rank 0: it trains, rank 0 records (and hands
            # it the model references it resolved, in run_stage).
            return run_stage(stage, cfg, NullTracker(), output_dir, None, signals)
        sweep = read_sweep(Path(job["sweep_dir"])) if job else None
        if job is not None and sweep is None:
            raise SweepError(
                f"multirun job {job['job_num']} finds no sweep record in {job['sweep_dir']}: "
                "its parent MLflow run was not created, so the job would run unnested"
            )
        # Fails here, before any work, if the tracking server is down.
        tracker = Tracker(cfg, output_dir, experiment=sweep["experiment"] if sweep else None)
        # Earlier runs this one builds on (sweep:<objective> becomes runs:/<id>/model), resolved
        # before the run opens: the config it logs, and checkpoints, is the one it runs.
        lineage = resolve_sweep_references(
            cfg,
            stage.model_references,
            tracker.client,
            tracker.experiment_name,
            job["sweep_dir"] if job else None,
        )
        checkpoint = resumable_checkpoint(cfg, output_dir)
        resumed_run_id = checkpoint_info(checkpoint).get("mlflow_run_id") if checkpoint else None
        finished = read_run_state(output_dir)
        if (
            checkpoint is not None
            and finished.get("finished")
            and finished.get("mlflow_run_id") == resumed_run_id
        ):
            log.warning(
                "%s holds a finished run (MLflow run %s, final checkpoint %s): nothing to "
                "train. To train again, use hydra.run.dir=<a new directory> or "
                "train.resume=false",
                output_dir,
                resumed_run_id,
                checkpoint.name,
            )
            tracker.send_unrecorded(resumed_run_id)
            return float(finished.get("headline", float("nan")))
        tags = {
            "task": cfg.task.name,
            "objective": cfg.objective.name,
            "stage": stage.name,
            "model": cfg.model.name,
            "seed": str(cfg.seed),
            "output_dir": str(output_dir.resolve()),
            **source_tags(job is not None),
        }
        if job is not None:
            tags |= job
        if sweep is not None:
            tags |= child_tags(sweep["parent_run_id"])
        default_name = (
            job_run_name(job)
            if job is not None
            else f"{cfg.objective.name}-{cfg.model.name}-seed{cfg.seed}"
        )
        overrides_yaml = yaml.safe_dump(list(overrides), default_flow_style=False)
        try:
            with tracker.run(
                cfg.tracking.run_name or default_name,
                tags,
                stage_params(cfg, stage.section, STAGE_SECTIONS),
                {"hydra/overrides.yaml": overrides_yaml},
                run_description(cfg, stage),
                resume_run_id=resumed_run_id,
            ):
                log.info("output directory: %s", output_dir)
                # The MLflow UI links each run of a pipeline to the runs it builds on.
                tracker.record_lineage(lineage)
                return run_stage(stage, cfg, tracker, output_dir, checkpoint, signals)
        except Exception:
            if job is None:
                raise
            # The run is already FAILED with its error; the sweep's summary reports it.
            log.exception("job %s failed (%s)", job["job_num"], job["overrides"])
            return float("nan")
        finally:
            if tracker.run_id is not None:
                print(tracker.ui_hint(), flush=True)


# An absolute config path: Hydra resolves a relative one against the calling script, which for
# the `phf` console script is the virtualenv's bin/.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    return execute(
        cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), job_info()
    )


def main() -> None:
    """``phf`` / ``python -m phf.run``: a run stopped by SIGTERM or SIGINT (after its checkpoint)
    exits with 128 + the signal's number, as a process killed by it would."""
    try:
        hydra_main()
    except Interrupted as stopped:
        print(f"phf: {stopped}", file=sys.stderr, flush=True)
        sys.exit(128 + stopped.signum)


if __name__ == "__main__":
    main()
