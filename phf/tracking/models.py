"""Models as MLflow Models (the ``transformers`` flavor) and model URIs back to local directories.

A run's final model is logged with ``mlflow.transformers.log_model`` as the run's ``model``: it
shows under *Logged models* in the UI, can be registered, loads with
``mlflow.transformers.load_model``, and ``mlflow models serve -m runs:/<id>/model`` serves it.
The weights are the same ``save_pretrained`` safetensors files (under ``model/`` in the MLflow
model; the tokenizer under ``components/tokenizer``). Every phf reference to an earlier run's
model (``model.pretrained=runs:/<id>/model``, ``ppo.reward_model=...``, ``sweep:<objective>``)
downloads it and reads it through ``hf_directory``, a ``from_pretrained`` directory of both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.models import infer_signature

log = logging.getLogger(__name__)

MLMODEL_FILE = "MLmodel"
HF_VIEW = "phf_pretrained"  # inside a downloaded MLflow model: model + tokenizer in one place
MLFLOW_URI_PREFIXES = ("runs:/", "models:/")
PIP_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors", "accelerate"]


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_URI_PREFIXES)


def log_transformers_model(
    run_id: str, directory: Path, task: str, generation: dict[str, Any] | None = None
) -> None:
    """Log the ``from_pretrained`` directory ``directory`` as the run's MLflow model ``model``.

    ``task`` is ``text-generation`` (a causal LM; ``generation`` holds its default sampling
    settings, which a serving request may override as params) or ``text-classification`` (a
    reward model: the score is its raw output, ``function_to_apply: none``).
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    # A logged model belongs to the fluent API's active experiment, not to its run's.
    run = mlflow.MlflowClient().get_run(run_id)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if task == "text-generation":
        model = AutoModelForCausalLM.from_pretrained(directory)
        config = dict(generation or {})
        signature = infer_signature(["Once upon a time"], ["there was a model"], params=config)
        example = ["Once upon a time"]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        config = {"function_to_apply": "none"}
        signature = infer_signature(
            ["Question: hi? Answer: hello"], [{"label": "LABEL_0", "score": 0.5}]
        )
        example = ["Question: hi? Answer: hello"]
    mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task=task,
        signature=signature,
        input_example=example,
        model_config=config,
        pip_requirements=PIP_REQUIREMENTS,
        run_id=run_id,
    )


def hf_directory(local: Path) -> Path:
    """A ``from_pretrained`` directory for a downloaded model: itself for a plain directory; for
    an MLflow transformers model, a view (symlinks, made once) of its model and tokenizer."""
    mlmodel = local / MLMODEL_FILE
    if not mlmodel.is_file():
        return local
    flavor = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("transformers")
    if flavor is None:
        raise FileNotFoundError(
            f"{local} is an MLflow model without the transformers flavor; phf reads models "
            "logged by phf or mlflow.transformers"
        )
    view = local / HF_VIEW
    if not view.is_dir():
        partial = local / f".{HF_VIEW}.partial"
        partial.mkdir(exist_ok=True)
        sources = [local / flavor.get("model_binary", "model")]
        sources += [local / "components" / name for name in flavor.get("components", [])]
        for source in sources:
            for item in source.iterdir():
                link = partial / item.name
                if not link.exists():
                    link.symlink_to(item.resolve())
        partial.rename(view)
    return view


# (tracking URI, model URI) -> its local copy: a run that names one model twice (a reward model
# started from, and normalised on samples of, runs:/<id>/model) downloads it once.
_DOWNLOADED: dict[tuple[str, str], Path] = {}


def download_model(uri: str) -> Path:
    """A local ``from_pretrained`` directory of a model logged to MLflow (``runs:/<id>/model``,
    ``models:/<name>/<version>``), from the current tracking URI."""
    key = (mlflow.get_tracking_uri(), uri)
    if key in _DOWNLOADED and _DOWNLOADED[key].is_dir():
        return _DOWNLOADED[key]
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except mlflow.exceptions.MlflowException as error:
        raise FileNotFoundError(
            f"cannot fetch {uri} from the MLflow store {mlflow.get_tracking_uri()}: "
            f"{error.message}. Check the run id (the MLflow UI or mlflow.search_runs lists "
            "them) and tracking.uri"
        ) from error
    _DOWNLOADED[key] = hf_directory(local)
    return _DOWNLOADED[key]


def resolve_model_source(source: str) -> str:
    """A hub id or local path for ``from_pretrained``: MLflow model URIs are downloaded, and an
    MLflow model directory on disk is read through its model and tokenizer."""
    if is_mlflow_uri(source):
        return str(download_model(source))
    path = Path(source).expanduser()
    if (path / MLMODEL_FILE).is_file():
        return str(hf_directory(path))
    return source
