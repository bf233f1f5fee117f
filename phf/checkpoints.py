"""Checkpoints in a run's output directory: weights, tokenizer, config and the training state.

Layout: ``<output_dir>/checkpoints/step_000100/`` holds the ``save_pretrained`` model and
tokenizer, ``config.yaml`` (the composed config, seed included) and ``training_state.pt``
(optimizer, scheduler, step, tokens seen, RNG states) so that a run can be resumed.
"""

from __future__ import annotations

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


def save_checkpoint(
    output_dir: Path,
    step: int,
    save_model: Callable[[Path], None],
    training_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/step_<step>`` (``save_model(directory)`` writes the weights, tokenizer
    and config; the training state and RNG states go beside them) and delete all but the
    ``keep`` newest checkpoints."""
    root = output_dir / "checkpoints"
    directory = root / f"step_{step:06d}"
    save_model(directory)
    torch.save({**training_state, "rng": rng_states()}, directory / "training_state.pt")
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return directory
