"""What more than one stage builds: the evaluator, the KL reference, and the resolution of
``sweep:<objective>`` references to earlier runs of the same multirun."""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from phf.data.corpus import iter_documents
from phf.data.packing import pack_blocks
from phf.data.prompts import scenario_prompts
from phf.data.transforms import control_token_ids, token_transform
from phf.evaluation import NO_CONTROLS, Evaluator, GenerationControls, KLReference
from phf.hardware import Placement
from phf.models import resolve_source
from phf.scorers import build_scorer
from phf.tokenizer import load_tokenizer
from phf.tracking import Tracker

log = logging.getLogger(__name__)

# Every stage saves its final model in <output dir>/model and logs it as this MLflow artifact, so
# that a later run can start from runs:/<run id>/model whatever stage wrote it.
MODEL_ARTIFACT = "model"

# The config keys each stage reads that may name an earlier run's model. Only these are
# resolved: a pipeline's shared config may set ppo.reward_model=sweep:reward, which the MLE run
# that comes before the reward run must not wait for.
MODEL_REFERENCES = {
    "pretrain": ("model.pretrained", "eval.kl_reference"),
    "reward": ("model.pretrained", "reward.normalization_policy"),
    "ppo": ("model.pretrained", "ppo.reward_model", "eval.kl_reference"),
}


def resolve_sweep_references(cfg: DictConfig, stage: str, tracker: Tracker) -> dict[str, str]:
    """Replace every ``sweep:<objective>`` among the stage's MODEL_REFERENCES by
    ``runs:/<id>/model`` of that objective's run (same multirun, same seed), waiting for it to
    finish; a reference to this run's own objective becomes null (it is that run). Returns the
    resolved references that name MLflow runs, {key: uri}, for the run's lineage tags."""
    timeout_s = 60.0 * cfg.eval.kl_reference_timeout_min
    lineage = {}
    for key in MODEL_REFERENCES[stage]:
        source = OmegaConf.select(cfg, key)
        if isinstance(source, str) and source.startswith("sweep:"):
            objective = source.removeprefix("sweep:")
            if objective == cfg.objective.name:
                log.info("%s=%s names this run's own objective: null", key, source)
                source = None
            elif tracker.sweep_dir is None:
                raise ValueError(f"{key}={source} needs a multirun (phf -m ...)")
            else:
                run_id = tracker.wait_for_sweep_run(objective, cfg.seed, timeout_s)
                source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
            OmegaConf.update(cfg, key, source, force_add=False)
        if isinstance(source, str) and source.startswith("runs:/"):
            lineage[key] = source
    return lineage


def publish_model(
    save: Callable[[Path], None], output_dir: Path, cfg: DictConfig, tracker: Tracker
) -> Path:
    """Save the final model with ``save`` into <output dir>/model and log it to MLflow (unless
    tracking.log_model is false); returns the directory."""
    final_dir = output_dir / MODEL_ARTIFACT
    save(final_dir)
    if cfg.tracking.log_model:
        tracker.log_artifacts(final_dir, MODEL_ARTIFACT)
    return final_dir


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
) -> Evaluator:
    """Held-out blocks in the model's own input format (control tokens included, every segment
    marked), the prompts of each scenario, the generation controls and the KL reference."""
    heldout_transform = token_transform(
        OmegaConf.merge(cfg.objective, {"drop_token_fraction": 0.0}), tokenizer, cfg.seed
    )
    test_documents = iter_documents(cfg.task.name, cfg.task.dataset, cfg.task.test_split)
    heldout = list(
        islice(
            pack_blocks(test_documents, tokenizer, cfg.train.block_size, heldout_transform),
            cfg.eval.max_blocks,
        )
    )
    prompts = {
        name: scenario_prompts(scenario, cfg.task, cfg.eval.generation.num_samples)
        for name, scenario in cfg.task.scenarios.items()
    }
    return Evaluator(
        cfg,
        tokenizer,
        build_scorer(cfg.scorer),
        prompts,
        heldout,
        placement,
        generation_controls(cfg.objective, tokenizer),
        kl_reference,
    )
