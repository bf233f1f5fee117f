"""Shared fixtures: the real config, composed and shrunk, and an isolated offline environment."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from phf.config import CONF_DIR, register_schemas

# A run that finishes in seconds: a 1-layer GPT-2, tiny blocks, two steps, 25 short samples.
TINY_RUN = [
    "hardware=cpu",
    "model.architecture.n_layer=1",
    "model.architecture.n_head=2",
    "model.architecture.n_embd=32",
    "train.block_size=32",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.eval_steps=1",
    "train.log_steps=1",
    "train.save_steps=1",
    "eval.generation.num_samples=25",
    "eval.generation.batch_size=25",
    "eval.generation.max_new_tokens=8",
    "eval.max_blocks=4",
    "eval.batch_size=4",
]


def pytest_configure(config: pytest.Config) -> None:
    """huggingface_hub reads its settings once, when first imported, which happens while pytest
    collects the test modules (before any fixture runs): set them before collection."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="phf-tests-hf-home-")


def multirun_command(run_dir: Path, *overrides: str) -> list[str]:
    """`phf -m` on the tiny run, with its MLflow store and sweep directory in ``run_dir``."""
    return [
        sys.executable,
        "-m",
        "phf.run",
        "-m",
        *TINY_RUN,
        *overrides,
        f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
        f"hydra.sweep.dir={run_dir / 'sweep'}",
    ]


@pytest.fixture(autouse=True)
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test touches the network or the user's caches and MLflow store."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose conf/config.yaml with overrides, exactly as `python -m phf.run` would."""
    register_schemas()

    def _compose(overrides: list[str] | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])

    return _compose


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work inside tmp_path, so MLflow's ./mlruns artifacts land there too."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir / 'mlflow.db'}"
