"""Checkpoints in a run's output directory, written so that a resume can trust them.

Layout of ``<output_dir>/checkpoints/step_000100/``:
- the stage's model files (``save_pretrained``: ``config.json``, ``model.safetensors``, tokenizer
  files; heads such as a value head as ``*.safetensors``) and ``config.yaml``, the composed config
  with its seed;
- ``training_state.pt``: optimizer, scheduler, loss scaler, step, progress, data or rollout
  position, controllers and RNG states, as tensors and plain Python values only, so it is read
  back with ``torch.load(weights_only=True)``: a crafted file cannot run code;
- ``checkpoint.json``, written last, after every other file is flushed to disk (fsync): the
  MLflow run, the step, and the size of every file. A directory without a valid one, or whose
  files do not have the sizes it lists (a truncated copy, a disk that filled up), is not a
  checkpoint: ``find_checkpoint`` skips it with a warning and takes the next older one.

A checkpoint is written under a temporary name and renamed when complete, so a run killed while
saving never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINT_INFO_FILE = "checkpoint.json"
CONFIG_FILE = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written (e.g. the disk is full) or no valid one can be read."""


# ------------------------------------------------------------------------------ RNG states


def python_rng_state(rng: random.Random | None = None) -> tuple:
    """A ``random`` generator's state with its 625 words as one tensor (weights_only-safe)."""
    version, words, gauss = (rng or random).getstate()
    return (version, torch.tensor(words, dtype=torch.int64), gauss)


def set_python_rng_state(state: tuple, rng: random.Random | None = None) -> None:
    version, words, gauss = state
    (rng or random).setstate((version, tuple(int(w) for w in words.tolist()), gauss))


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's, torch's (and CUDA's) global RNG states, as tensors and numbers."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": python_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    set_python_rng_state(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------- model files


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
    (directory / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def load_weights(model: PreTrainedModel, directory: Path) -> None:
    """Load a ``save_pretrained`` directory's weights into ``model`` in place (sharded files and
    tied weights handled by ``from_pretrained``; safetensors only)."""
    saved = type(model).from_pretrained(directory, use_safetensors=True)
    model.load_state_dict(saved.state_dict())


def save_head(module: torch.nn.Module, path: Path) -> None:
    """A head (value head, ...) as safetensors."""
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def load_head(module: torch.nn.Module, path: Path) -> None:
    device = next(module.parameters()).device
    module.load_state_dict(load_file(str(path), device=str(device)))


# ------------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(error: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of disk: torch.save reports it as a RuntimeError
    ('unexpected pos') that has lost the errno, so the free space is asked too."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def save_checkpoint(
    output_dir: Path,
    step: int,
    save_files: Callable[[Path], None],
    training_state: dict[str, Any],
    keep: int,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>``: ``save_files(directory)`` writes the model files, the
    training state and RNG states go beside them, ``checkpoint.json`` last; then delete all but
    the ``keep`` newest checkpoints. Raises CheckpointError (the partial directory removed, the
    older checkpoints untouched) when the disk is full or a file cannot be written."""
    root = output_dir / "checkpoints"
    directory = root / f"step_{step:06d}"
    partial = root / f".step_{step:06d}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        save_files(partial)
        torch.save({**training_state, "rng": rng_states()}, partial / TRAINING_STATE_FILE)
        files = {}
        for path in sorted(p for p in partial.rglob("*") if p.is_file()):
            _fsync(path)
            files[str(path.relative_to(partial))] = path.stat().st_size
        marker = partial / CHECKPOINT_INFO_FILE
        marker.write_text(json.dumps({**(info or {}), "step": step, "files": files}, indent=1))
        _fsync(marker)
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
        _fsync(root)
    except Exception as error:  # torch, safetensors and tokenizers each raise their own types
        full = _no_space(error, root)
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            free = shutil.disk_usage(root).free if root.exists() else 0
            raise CheckpointError(
                f"no space left on the device writing the checkpoint {directory} ({free} bytes "
                f"free on the disk of {root}): free some space, or give the run a directory on "
                "another disk (hydra.run.dir=...) and resume from the checkpoints already there, "
                "which are kept"
            ) from error
        raise CheckpointError(
            f"could not write the checkpoint {directory}: {error}. The checkpoints written "
            "before are kept"
        ) from error
    for old in _step_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return directory


# ------------------------------------------------------------------------------- reading


def _step_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.glob("step_*") if d.is_dir())


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a valid checkpoint, or None when it is one."""
    marker = directory / CHECKPOINT_INFO_FILE
    if not marker.is_file():
        return f"no {CHECKPOINT_INFO_FILE} (written last: the checkpoint is incomplete)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        assert isinstance(files, dict) and TRAINING_STATE_FILE in files
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        return f"{CHECKPOINT_INFO_FILE} is not valid ({type(error).__name__}: {error})"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written (truncated?)"
    return None


def find_checkpoint(output_dir: Path, skip: tuple[Path, ...] = ()) -> Path | None:
    """The newest valid checkpoint of a run (newer invalid ones are skipped with a warning), or
    None when the run has none at all. Raises CheckpointError when it has checkpoints but none is
    valid: starting over would silently throw the run away."""
    root = output_dir / "checkpoints"
    problems = []
    for directory in reversed(_step_dirs(root)):
        if directory in skip:
            continue
        problem = checkpoint_problem(directory)
        if problem is None:
            for bad, why in problems:
                log.warning("skipping the checkpoint %s: %s", bad, why)
            return directory
        problems.append((directory, problem))
    if problems:
        listed = "; ".join(f"{d.name}: {why}" for d, why in problems)
        raise CheckpointError(
            f"no valid checkpoint in {root} ({listed}). To start the run over, delete that "
            "directory, or run with train.resume=false (or hydra.run.dir=<a new directory>)"
        )
    return None


def checkpoint_info(directory: Path) -> dict[str, Any]:
    """What save_checkpoint recorded (MLflow run id, step, files); {} when unreadable."""
    try:
        return json.loads((directory / CHECKPOINT_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def checkpoint_config(directory: Path) -> DictConfig | None:
    path = directory / CONFIG_FILE
    return OmegaConf.load(path) if path.is_file() else None


def load_training_state(directory: Path) -> dict[str, Any]:
    """The training state, with ``weights_only=True``: tensors and plain values only."""
    path = directory / TRAINING_STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or hostile file
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {error}") from error
