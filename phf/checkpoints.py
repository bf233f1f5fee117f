"""Checkpoints in a run's output directory: weights, tokenizer, config and the training state.

Layout: ``<output_dir>/checkpoints/step_000100/`` holds the ``save_pretrained`` model and
tokenizer, ``config.yaml`` (the composed config, seed included) and ``training_state.pt``
(optimizer, scheduler, step, tokens seen, RNG states) so that a run can be resumed, and
``checkpoint.json`` (the MLflow run it belongs to).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def rng_states() -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_pretrained(
    directory: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DictConfig,
) -> None:
    """A directory that ``from_pretrained`` loads, with the run's config beside the weights."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


TRAINING_STATE_FILE = "training_state.pt"
# Small facts about a checkpoint (its MLflow run), readable without loading the optimizer state.
CHECKPOINT_INFO_FILE = "checkpoint.json"


def save_checkpoint(
    output_dir: Path,
    step: int,
    save_model: Callable[[Path], None],
    training_state: dict[str, Any],
    keep: int,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` (``save_model(directory)`` writes the weights, tokenizer
    and config; the training state and RNG states go beside them) and delete all but the
    ``keep`` newest checkpoints.

    The checkpoint is written under a temporary name and renamed when complete, so a run killed
    while saving never leaves a half-written checkpoint that a resume would pick up.
    """
    root = output_dir / "checkpoints"
    directory = root / f"step_{step:06d}"
    partial = root / f".step_{step:06d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    save_model(partial)
    torch.save({**training_state, "rng": rng_states()}, partial / TRAINING_STATE_FILE)
    (partial / CHECKPOINT_INFO_FILE).write_text(json.dumps(info or {}))
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return directory


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    complete = [
        d
        for d in sorted((output_dir / "checkpoints").glob("step_*"))
        if (d / TRAINING_STATE_FILE).is_file()
    ]
    return complete[-1] if complete else None


def checkpoint_info(directory: Path) -> dict[str, Any]:
    """What save_checkpoint recorded in ``info`` (e.g. the MLflow run id), or {}."""
    path = directory / CHECKPOINT_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_training_state(directory: Path) -> dict[str, Any]:
    # weights_only=False: the state holds Python's RNG state (a tuple) and numpy arrays; the
    # file is one this run wrote itself.
    return torch.load(directory / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
