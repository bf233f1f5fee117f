"""phf's one entry point: ``python -m phf.run`` (or ``phf``) composes a run and dispatches it.

python -m phf.run                                  # tiny GPT-2, MLE, built-in toxicity data
python -m phf.run --help                           # the config groups and their options
python -m phf.run --cfg job                        # print the composed config, run nothing
python -m phf.run train.num_tokens=100000 seed=1   # override any key
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import hydra
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from phf.checkpoints import checkpoint_info, latest_checkpoint
from phf.config import CONF_DIR, register_schemas
from phf.distributed import init_distributed
from phf.stages.common import resolve_sweep_references
from phf.stages.ppo import run_ppo
from phf.stages.pretrain import run_pretrain
from phf.stages.reward import run_reward
from phf.sweep import job_info
from phf.tracking import NullTracker, Tracker, git_commit, read_sweep

log = logging.getLogger(__name__)

# objective.stage -> the function that runs it. Only stages that exist are listed; the Stage enum
# in phf/config.py makes Hydra refuse any other value at compose time.
STAGES = {"pretrain": run_pretrain, "reward": run_reward, "ppo": run_ppo}

register_schemas()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def stage_name(cfg: DictConfig) -> str:
    stage = cfg.objective.stage
    return getattr(stage, "value", stage)


def execute(
    cfg: DictConfig, output_dir: Path, overrides: list[str], job: dict[str, str] | None = None
) -> float:
    """Run one composed config: seed, open the MLflow run, run the stage, close the run.

    ``job`` describes the multirun job this run is (phf.sweep.job_info), or is None for a single
    run. A job joins its sweep's parent MLflow run, and its failure is recorded (run FAILED,
    error tagged) without raising, so that the sweep's other jobs go on.
    """
    seed_everything(cfg.seed)
    if not init_distributed().is_main:
        # A data-parallel process other than rank 0: it trains, rank 0 records.
        return STAGES[stage_name(cfg)](cfg, NullTracker(), output_dir)
    sweep = read_sweep(Path(job["sweep_dir"])) if job else None
    # Fails here, before any work, if the tracking server is down.
    tracker = Tracker(cfg, experiment=sweep["experiment"] if sweep else None)
    tags = {
        "task": cfg.task.name,
        "objective": cfg.objective.name,
        "stage": stage_name(cfg),
        "model": cfg.model.name,
        "seed": str(cfg.seed),
        "git_commit": git_commit(),
        "output_dir": str(output_dir.resolve()),
    }
    if job is not None:
        tags |= job
    if sweep is not None:
        tags |= {"mlflow.parentRunId": sweep["parent_run_id"], "sweep_id": sweep["parent_run_id"]}
    run_name = cfg.tracking.run_name or f"{cfg.objective.name}-{cfg.model.name}-seed{cfg.seed}"
    overrides_yaml = yaml.safe_dump(list(overrides), default_flow_style=False)
    # A run resumed from a checkpoint goes on in the MLflow run that wrote the checkpoint.
    checkpoint = latest_checkpoint(output_dir) if cfg.train.resume else None
    resumed_run_id = checkpoint_info(checkpoint).get("mlflow_run_id") if checkpoint else None
    try:
        with tracker.run(
            run_name, tags, {"hydra/overrides.yaml": overrides_yaml}, resume_run_id=resumed_run_id
        ):
            log.info("output directory: %s", output_dir)
            # Earlier runs this one builds on (sweep:<objective> becomes runs:/<id>/model),
            # recorded so that the MLflow UI links each run of a pipeline to the next.
            tracker.record_lineage(resolve_sweep_references(cfg, stage_name(cfg), tracker))
            return STAGES[stage_name(cfg)](cfg, tracker, output_dir)
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
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    return execute(
        cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), job_info()
    )


if __name__ == "__main__":
    main()
