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
    # Token stores of the built-in corpora, prepared once for the whole session (as a sweep's
    # runs share them), never in the user's cache.
    os.environ["PHF_CACHE_DIR"] = tempfile.mkdtemp(prefix="phf-tests-cache-")


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


@pytest.fixture(scope="session")
def mle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's MLE model, trained once per test session: the starting policy of the
    finetuning and online stages' tests."""
    from phf.config import compose_config
    from phf.run import execute

    directory = tmp_path_factory.mktemp("mle")
    cfg = compose_config(
        [*TINY_RUN, f"tracking.uri=sqlite:///{directory / 'mlflow.db'}", "tracking.log_model=false"]
    )
    execute(cfg, directory / "out", [])
    return directory / "out" / "model"


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


def tiny_encoder(directory: Path, words: list[str] | None = None):
    """A randomly initialised DistilBERT reward model (num_labels=1) and a WordPiece tokenizer
    with [CLS]/[SEP], both built offline; saved in ``directory / "encoder"``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = words or ["hello there", "a longer prompt with a longer answer", "hi", "q a"]
    backend.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials)
    )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    import torch

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        n_layers=1,
        n_heads=2,
        dim=32,
        hidden_dim=64,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(directory / "encoder")
    tokenizer.save_pretrained(directory / "encoder")
    return model, tokenizer
