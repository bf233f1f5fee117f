"""What more than one stage builds: token stores and held-out blocks, the evaluator, the KL
reference, the final model's publication, and the resolution of ``sweep:<objective>``
references to earlier runs of the same multirun."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from phf.checkpoints import (
    load_weights,
    python_rng_state,
    save_pretrained,
    set_python_rng_state,
)
from phf.data.blocks import control_token_ids, objective_blocks
from phf.data.corpus import split_source
from phf.data.prompts import scenario_prompts
from phf.data.store import TokenStore, default_cache_dir, ensure_store
from phf.distributed import DistributedContext
from phf.evaluation import NO_CONTROLS, Evaluator, GenerationControls, KLReference
from phf.hardware import Placement
from phf.lora import is_lora, load_adapters, merged, save_adapters
from phf.models import resolve_source
from phf.scorers import build_scorer
from phf.tokenizer import load_tokenizer
from phf.tracking import Tracker, wait_for_sweep_run

log = logging.getLogger(__name__)

# Every stage saves its final model in <output dir>/model and logs it as this MLflow Model, so
# that a later run can start from runs:/<run id>/model whatever stage wrote it.
MODEL_ARTIFACT = "model"


def resolve_sweep_references(
    cfg: DictConfig,
    references: tuple[str, ...],
    client: Any,
    experiment_name: str,
    sweep_dir: str | None,
) -> dict[str, str]:
    """Replace every ``sweep:<objective>`` among the stage's ``references`` (config keys that
    may name an earlier run's model; only these are resolved: a pipeline's shared config may
    set ppo.reward_model=sweep:reward, which the MLE run before the reward run must not wait
    for) by ``runs:/<id>/model`` of that objective's run (same multirun, same seed), waiting
    for it to finish; a reference to this run's own objective becomes null (it is that run).
    Called before the run's MLflow run opens, so that the config it logs is the one it runs.
    Returns the resolved references that name MLflow runs, {key: uri}, for the run's lineage
    tags."""
    timeout_s = 60.0 * cfg.eval.kl_reference_timeout_min
    lineage = {}
    for key in references:
        source = OmegaConf.select(cfg, key)
        if isinstance(source, str) and source.startswith("sweep:"):
            objective = source.removeprefix("sweep:")
            if objective == cfg.objective.name:
                log.info("%s=%s names this run's own objective: null", key, source)
                source = None
            elif sweep_dir is None:
                raise ValueError(f"{key}={source} needs a multirun (phf -m ...)")
            else:
                run_id = wait_for_sweep_run(
                    client, experiment_name, sweep_dir, objective, cfg.seed, timeout_s
                )
                source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
            OmegaConf.update(cfg, key, source, force_add=False)
        if isinstance(source, str) and source.startswith("runs:/"):
            lineage[key] = source
    return lineage


def publish_model(
    save: Callable[[Path], None],
    directory: Path,
    cfg: DictConfig,
    tracker: Tracker,
    task: str = "text-generation",
) -> Path:
    """Save the final model with ``save`` into ``directory`` (<output dir>/model) and log it as
    the run's MLflow Model ``model`` (unless tracking.log_model is false): ``text-generation``
    with the evaluation's sampling settings as its defaults, or ``text-classification`` (a
    reward model)."""
    save(directory)
    if cfg.tracking.log_model:
        generation = cfg.eval.generation
        defaults = {
            "max_new_tokens": int(generation.max_new_tokens),
            "temperature": float(generation.temperature),
            "top_p": float(generation.top_p),
            "do_sample": True,
        }
        tracker.log_model(directory, task, defaults if task == "text-generation" else None)
    return directory


def token_store(cfg: DictConfig, split: str, tokenizer: PreTrainedTokenizerBase) -> TokenStore:
    """The prepared token store of one split of the task's dataset (built on first use)."""
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else None
    source = split_source(cfg.task.name, cfg.task.dataset, split)
    return ensure_store(
        source, tokenizer, cache_dir or default_cache_dir(), cfg.data.prepare_workers
    )


# The test documents' order for held-out blocks: one fixed shuffle, whatever the run's seed, so
# that every run is measured on the same blocks, drawn from the whole split. (Its first blocks
# in file order would be its first few dozen documents: on the built-in toxicity corpus, almost
# all prose, while half the split is changelogs.)
HELDOUT_SEED = 0


def heldout_blocks(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Up to eval.max_blocks blocks of the test split, in the model's own input format."""
    store = token_store(cfg, cfg.task.test_split, tokenizer)
    blocks = objective_blocks(
        cfg.objective, store, tokenizer, cfg.train.block_size, HELDOUT_SEED, heldout=True
    )
    return blocks.heldout(cfg.eval.max_blocks)


def dataset_record(
    cfg: DictConfig, store: TokenStore, split: str, context: str, **profile: Any
) -> dict[str, Any]:
    """A token store as a dataset of the run (MLflow's Dataset column)."""
    source = store.manifest["source"]
    hub = "hub" in source
    return {
        "name": f"{cfg.task.name}/{split}",
        "source": source["hub"] if hub else source["file"],
        "source_type": "hub" if hub else "local",
        "split": split,
        "digest": store.digest,
        "context": context,
        "profile": {"documents": store.num_documents, "tokens": store.num_tokens, **profile},
    }


def generation_controls(
    objective: DictConfig, tokenizer: PreTrainedTokenizerBase
) -> GenerationControls:
    """Conditional training samples after <|aligned|> and never samples a control token."""
    if objective.name != "conditional":
        return NO_CONTROLS
    aligned, misaligned = control_token_ids(tokenizer)
    return GenerationControls(prefix_ids=(aligned,), suppress_ids=(aligned, misaligned))


def sample_kl_reference(
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DictConfig,
    placement: Placement,
) -> KLReference:
    """``eval.kl_samples`` samples of ``reference`` and their log-probabilities under it."""
    return KLReference.sample(
        reference,
        tokenizer,
        cfg.eval.kl_samples,
        cfg.eval.generation.max_new_tokens,
        cfg.eval.generation.batch_size,
        placement,
        seed=cfg.seed,
    )


def load_kl_reference(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, placement: Placement
) -> KLReference | None:
    """Samples of ``eval.kl_reference`` (already resolved by resolve_sweep_references) for the
    KL metric, or None when there is none."""
    source = cfg.eval.kl_reference
    if source is None:
        return None
    reference_source = resolve_source(source)
    reference_tokenizer = load_tokenizer(reference_source)
    vocab = tokenizer.get_vocab()
    if any(vocab.get(token) != index for token, index in reference_tokenizer.get_vocab().items()):
        raise ValueError(
            f"eval.kl_reference={source}: its tokenizer differs from the model's, so their "
            "probabilities of one token sequence cannot be compared"
        )
    reference = AutoModelForCausalLM.from_pretrained(reference_source).to(placement.device)
    # Only the samples and their log-probabilities are kept, not the model.
    return sample_kl_reference(reference, tokenizer, cfg, placement)


def build_evaluator(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    placement: Placement,
    kl_reference: KLReference | None,
    heldout: torch.Tensor | None = None,
    extra_scenarios: dict[str, tuple[list[str], bool]] | None = None,
) -> Evaluator:
    """The task's scenarios (and ``extra_scenarios``: name -> (prompts, score_prompt)), held-out
    blocks (``heldout_blocks`` unless given), the generation controls of the objective and the
    KL reference."""
    samples = cfg.eval.generation.num_samples
    scenarios = {
        name: (scenario_prompts(scenario, cfg.task, samples), bool(scenario.score_prompt))
        for name, scenario in cfg.task.scenarios.items()
    }
    for name, (prompts, score_prompt) in (extra_scenarios or {}).items():
        scenarios[name] = (list(islice(cycle(prompts), samples)), score_prompt)
    return Evaluator(
        cfg,
        tokenizer,
        build_scorer(cfg.scorer),
        scenarios,
        heldout_blocks(cfg, tokenizer) if heldout is None else heldout,
        placement,
        generation_controls(cfg.objective, tokenizer),
        kl_reference,
    )


def scenario_tables(tables: Mapping[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """Evaluation tables by artifact folder: samples/ for unconditional, samples/<name>/."""
    return {
        ("samples" if name == "unconditional" else f"samples/{name}"): table
        for name, table in tables.items()
    }


class EpochShuffle:
    """Which examples each step trains on: batches of a fresh seeded shuffle per epoch; its
    state (the rest of the epoch, the generator) is checkpointed, so a resume goes on exactly."""

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self, size: int) -> list[int]:
        if len(self.order) < size:  # a new epoch
            fresh = list(range(self.count))
            self.rng.shuffle(fresh)
            self.order += fresh
        batch, self.order = self.order[:size], self.order[size:]
        return batch

    def state(self) -> dict[str, Any]:
        return {
            "order": torch.tensor(self.order, dtype=torch.int64),
            "rng": python_rng_state(self.rng),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.order = state["order"].tolist()
        set_python_rng_state(state["rng"], self.rng)


def process_share(items: list[Any], distributed: DistributedContext) -> list[Any]:
    """This process's contiguous share of a global batch (every process draws the same one)."""
    per = math.ceil(len(items) / distributed.world_size)
    return items[distributed.rank * per : (distributed.rank + 1) * per]


def kl_from_start(
    cfg: DictConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    placement: Placement,
) -> KLReference:
    """KL from ``eval.kl_reference`` when set, else from the starting model (``model``, still
    the starting one when this is called)."""
    if cfg.eval.kl_reference is not None:
        return load_kl_reference(cfg, tokenizer, placement)
    return sample_kl_reference(model, tokenizer, cfg, placement)


def save_policy(
    directory: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig
) -> None:
    """A checkpoint's model files: the adapters alone for a LoRA model (its base is
    model.pretrained), else the whole ``save_pretrained`` model; tokenizer and config beside."""
    if is_lora(model):
        directory.mkdir(parents=True, exist_ok=True)
        save_adapters(model, directory)
        tokenizer.save_pretrained(directory)
        (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    else:
        save_pretrained(directory, model, tokenizer, cfg)


def restore_policy(model: torch.nn.Module, directory: Path) -> None:
    if is_lora(model):
        load_adapters(model, directory)
    else:
        load_weights(model, directory)


def publish_policy(
    directory: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DictConfig,
    tracker: Tracker,
    task: str = "text-generation",
) -> None:
    """The final model, LoRA adapters merged into it, as <output dir>/model and the run's
    MLflow Model."""
    plain = merged(model)
    publish_model(
        lambda d: save_pretrained(d, plain, tokenizer, cfg), directory, cfg, tracker, task
    )


class ExampleStage:
    """The state, checkpoint files and publication that the stages training on a fixed set of
    examples in seeded epochs share (SFT, DPO, reward): the step and progress, the epoch
    shuffle and the optimization core's state; the trained model (``trained``: the policy, or
    a reward model's classifier) as a checkpoint's files and as the published model."""

    cfg: DictConfig
    tokenizer: PreTrainedTokenizerBase
    shuffle: EpochShuffle
    optimization: Any  # phf.training.Optimization
    steps_done: int
    progress: int

    @property
    def trained(self) -> torch.nn.Module:
        return self.model  # type: ignore[attr-defined]

    def training_state(self) -> dict[str, Any]:
        return {
            "step": self.steps_done,
            "progress": self.progress,
            "shuffle": self.shuffle.state(),
        } | self.optimization.state()

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        restore_policy(self.trained, directory)
        self.optimization.load_state(state)
        self.shuffle.load_state(state["shuffle"])
        self.steps_done, self.progress = state["step"], state["progress"]

    def save(self, directory: Path) -> None:
        """A checkpoint: the model (or its LoRA adapters and heads), tokenizer and config."""
        save_policy(directory, self.trained, self.tokenizer, self.cfg)

    def publish(self, directory: Path, tracker: Tracker) -> None:
        publish_policy(directory, self.trained, self.tokenizer, self.cfg, tracker)
