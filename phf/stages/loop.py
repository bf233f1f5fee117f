"""The stage contract, written once: every stage is a ``Stage`` driven by ``run_stage``.

A stage (pretrain, reward, ppo, ...) is an object built from the composed config that knows how
to take one ``step()`` (an optimizer step, a rollout iteration), ``evaluate()`` itself, save its
model files, and give and take back its whole training state (optimizer, scheduler, scaler, data
or rollout position, controllers). ``run_stage`` does the rest, the same way for all of them:

1. resume from the checkpoint chosen by ``phf.run.execute`` (the newest valid one, its config
   checked against this run's), falling back to an older one if it cannot be read, or evaluate
   the starting model (step 0);
2. step to ``max_steps``: log the window's mean metrics every ``train.log_steps``, evaluate
   every ``train.eval_steps`` and at the end, checkpoint every ``train.save_steps``, at the end,
   and when a stop signal arrives (phf.signals: USR2 requeues, SIGTERM/SIGINT end KILLED);
3. publish the final model once (``<output_dir>/model`` and the run's MLflow Model).

Under data parallelism every process steps; only rank 0 evaluates, logs and checkpoints.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phf.checkpoints import (
    CheckpointError,
    checkpoint_info,
    find_checkpoint,
    load_training_state,
    restore_rng_states,
    save_checkpoint,
)
from phf.distributed import (
    DistributedContext,
    agreed_signal,
    barrier,
    broadcast_object,
    init_distributed,
)
from phf.hardware import Placement, resolve_placement
from phf.signals import StopSignals
from phf.tracking import Tracker
from phf.training import NonFiniteLossError

log = logging.getLogger(__name__)

MODEL_DIR = "model"
RUN_STATE_FILE = "phf_run.json"  # in the output dir: the run's end, once its model is published


Tables = dict[str, dict[str, list]]


class Stage(Protocol):
    """What ``run_stage`` drives (see the module docstring). A stage describes itself: the
    ``objective.stage`` value that selects it, its title, the config section it reads, the
    config keys that may name an earlier run's model, how it shares a batch among
    data-parallel processes, and its progress and headline metrics."""

    name: ClassVar[str]  # objective.stage
    title: ClassVar[str]  # what the run's description calls it
    section: ClassVar[str | None]  # its own config section (logged as params), if any
    model_references: ClassVar[tuple[str, ...]]  # keys that may be sweep:/runs:/ references
    data_parallel: ClassVar[str]  # how N processes share a step's batch (logged)
    progress_metric: ClassVar[str]  # the x axis a user picks by name: tokens_seen, episodes, ...
    progress_label: ClassVar[str]  # samples tables are named <folder>/<label>_<progress>.json
    rate_metric: ClassVar[str]  # progress per second of training time
    headline: ClassVar[str]  # the metric run_stage returns (to the sweeper)
    max_steps: int
    steps_done: int
    progress: int

    @classmethod
    def build(
        cls, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> Stage: ...

    def step(self) -> dict[str, Any]: ...

    def evaluate(self) -> tuple[dict[str, float], Tables]: ...

    def describe(self, metrics: dict[str, float]) -> str: ...

    def save(self, directory: Path) -> None: ...

    def training_state(self) -> dict[str, Any]: ...

    def restore(self, directory: Path, state: dict[str, Any]) -> None: ...

    def publish(self, directory: Path, tracker: Tracker) -> None: ...

    def datasets(self) -> list[dict[str, Any]]: ...


def read_run_state(output_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((output_dir / RUN_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _restore(stage: Stage, checkpoint: Path, output_dir: Path) -> Path:
    """Restore ``checkpoint``, or the next older valid one when it cannot be read."""
    tried: tuple[Path, ...] = ()
    while True:
        try:
            state = load_training_state(checkpoint)
            stage.restore(checkpoint, state["stage"])
            restore_rng_states(state["rng"])
            return checkpoint
        except (CheckpointError, OSError, ValueError, RuntimeError, KeyError) as error:
            tried += (checkpoint,)
            log.warning("cannot resume from %s (%s): trying an older checkpoint", checkpoint, error)
            older = find_checkpoint(output_dir, skip=tried)
            if older is None:
                raise CheckpointError(
                    f"no checkpoint of {output_dir / 'checkpoints'} can be read (last: "
                    f"{checkpoint}: {error}). To start the run over, delete that directory, or "
                    "run with train.resume=false (or hydra.run.dir=<a new directory>)"
                ) from error
            checkpoint = older


def _mean(window: dict[str, Any], steps: int) -> dict[str, float]:
    return {name: float(value) / steps for name, value in window.items()}


def run_stage(
    stage_cls: type[Stage],
    cfg: DictConfig,
    tracker: Tracker,
    output_dir: Path,
    checkpoint: Path | None,
    signals: StopSignals,
) -> float:
    """Build the stage, resume or evaluate, train, checkpoint and publish (module docstring)."""
    train = cfg.train
    distributed = init_distributed()
    # Rank 0 resolved the model references (sweep:<objective>) before its run opened; every
    # process builds from the same ones.
    references = {key: OmegaConf.select(cfg, key) for key in stage_cls.model_references}
    for key, value in broadcast_object(references, distributed).items():
        OmegaConf.update(cfg, key, value, force_add=False)
    placement = resolve_placement(cfg.hardware, distributed.local_rank)
    stage = stage_cls.build(cfg, placement, distributed)
    main = distributed.is_main
    if distributed.enabled:
        log.info("data parallel over %d processes: %s", distributed.world_size, stage.data_parallel)
    if main:
        tracker.log_datasets(stage.datasets())
    last_metrics: dict[str, float] = {stage.headline: float("nan")}

    def evaluate(step: int) -> None:
        nonlocal last_metrics
        if not main:
            return
        last_metrics, tables = stage.evaluate()
        progress = {stage.progress_metric: stage.progress}
        tracker.log_metrics(last_metrics, step, progress)
        for folder, table in tables.items():
            name = f"{folder}/{stage.progress_label}_{stage.progress:010d}.json"
            tracker.log_table(table, name)
        log.info(
            "eval at step %d (%s %d): %s",
            step,
            stage.progress_metric,
            stage.progress,
            stage.describe(last_metrics),
        )

    def write_checkpoint(step: int) -> None:
        if main:
            save_checkpoint(
                output_dir,
                step,
                stage.save,
                {"stage": stage.training_state()},
                train.save_total_limit,
                info={
                    "mlflow_run_id": tracker.run_id,
                    "max_steps": stage.max_steps,
                    "progress": stage.progress,
                    "last_metrics": last_metrics,
                },
            )
        barrier(distributed)  # no process runs ahead of a checkpoint it may resume from

    # Rank 0 chose the checkpoint (phf.run.execute); every process resumes from it.
    checkpoint = broadcast_object(checkpoint, distributed)
    if checkpoint is not None:
        checkpoint = _restore(stage, checkpoint, output_dir)
        last_metrics = checkpoint_info(checkpoint).get("last_metrics", last_metrics)
        log.info("resumed from %s (step %d of %d)", checkpoint, stage.steps_done, stage.max_steps)
    else:
        evaluate(step=0)

    window: dict[str, Any] = {}
    window_seconds, window_progress = 0.0, 0
    interactive = sys.stderr.isatty()
    progress_bar = tqdm(
        range(stage.steps_done + 1, stage.max_steps + 1),
        initial=stage.steps_done,
        total=stage.max_steps,
        desc=cfg.objective.name,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,  # a log file rather than a terminal
        disable=not main,
    )
    with signals.deferred():
        for step in progress_bar:
            started, progress_before = time.perf_counter(), stage.progress
            try:
                metrics = stage.step()
            except NonFiniteLossError as error:
                raise NonFiniteLossError(
                    f"{error}. Checkpoints written so far are kept in {output_dir / 'checkpoints'}"
                ) from None
            for name, value in metrics.items():
                window[name] = window.get(name, 0.0) + value
            window_seconds += time.perf_counter() - started
            window_progress += stage.progress - progress_before

            if step % train.log_steps == 0 or step == stage.max_steps:
                steps_in_window = (step - 1) % train.log_steps + 1
                logged = _mean(window, steps_in_window)
                logged[stage.rate_metric] = window_progress / max(window_seconds, 1e-9)
                if main:
                    tracker.log_metrics(logged, step, {stage.progress_metric: stage.progress})
                if "train/loss" in logged:
                    progress_bar.set_postfix(loss=f"{logged['train/loss']:.3f}", refresh=False)
                window, window_seconds, window_progress = {}, 0.0, 0
            if step % train.eval_steps == 0 or step == stage.max_steps:
                evaluate(step)
            stop = agreed_signal(signals.pending, distributed)
            if step % train.save_steps == 0 or step == stage.max_steps or stop:
                write_checkpoint(step)
            if stop:
                progress_bar.close()
                if stop == signals.PREEMPTION:
                    tracker.mark_preempted(step)
                signals.hand_over(stop)  # requeue and exit (submitit), or raise
    progress_bar.close()

    if main:
        final_dir = output_dir / MODEL_DIR
        stage.publish(final_dir, tracker)
        headline = float(last_metrics.get(stage.headline, float("nan")))
        (output_dir / RUN_STATE_FILE).write_text(
            json.dumps(
                {"mlflow_run_id": tracker.run_id, "finished": True, "headline": headline}, indent=1
            )
        )
        log.info("final model saved to %s", final_dir)
    return float(last_metrics.get(stage.headline, float("nan")))


def synchronize(device: torch.device) -> None:
    """Wait for the device (a CPU-GPU sync): for timings that mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
