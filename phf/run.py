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
from hydra.types import RunMode
from omegaconf import DictConfig

from phf.checkpoints import latest_checkpoint, load_training_state
from phf.config import CONF_DIR, register_schemas
from phf.stages.pretrain import run_pretrain
from phf.tracking import Tracker, git_commit

log = logging.getLogger(__name__)

# objective.stage -> the function that runs it. Only stages that exist are listed; the Stage enum
# in phf/config.py makes Hydra refuse any other value at compose time.
STAGES = {"pretrain": run_pretrain}

register_schemas()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def stage_name(cfg: DictConfig) -> str:
    stage = cfg.objective.stage
    return getattr(stage, "value", stage)


def execute(
    cfg: DictConfig, output_dir: Path, overrides: list[str], sweep_dir: str | None = None
) -> float:
    """Run one composed config: seed, open the MLflow run, run the stage, close the run.

    ``sweep_dir`` is the Hydra sweep directory when the run is one job of a multirun."""
    seed_everything(cfg.seed)
    tracker = Tracker(cfg)  # fails here, before any work, if the tracking server is down
    tags = {
        "task": cfg.task.name,
        "objective": cfg.objective.name,
        "stage": stage_name(cfg),
        "model": cfg.model.name,
        "seed": str(cfg.seed),
        "git_commit": git_commit(),
        "output_dir": str(output_dir.resolve()),
    }
    if sweep_dir is not None:
        tags["sweep_dir"] = sweep_dir
    run_name = cfg.tracking.run_name or f"{cfg.objective.name}-{cfg.model.name}-seed{cfg.seed}"
    overrides_yaml = yaml.safe_dump(list(overrides), default_flow_style=False)
    # A run resumed from a checkpoint goes on in the MLflow run that wrote the checkpoint.
    checkpoint = latest_checkpoint(output_dir) if cfg.train.resume else None
    resumed_run_id = load_training_state(checkpoint).get("mlflow_run_id") if checkpoint else None
    try:
        with tracker.run(
            run_name, tags, {"hydra/overrides.yaml": overrides_yaml}, resume_run_id=resumed_run_id
        ):
            log.info("output directory: %s", output_dir)
            result = STAGES[stage_name(cfg)](cfg, tracker, output_dir)
    finally:
        if tracker.run_id is not None:
            print(tracker.ui_hint(), flush=True)
    return result


# An absolute config path: Hydra resolves a relative one against the calling script, which for
# the `phf` console script is the virtualenv's bin/.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    sweep_dir = (
        str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode == RunMode.MULTIRUN else None
    )
    return execute(
        cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), sweep_dir
    )


if __name__ == "__main__":
    main()
