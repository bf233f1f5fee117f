"""The supervised-finetuning stage (objective=sft): next-token loss on responses given prompts.

Read top to bottom: the model (model.pretrained, with LoRA adapters when model.lora.r > 0), the
examples of both splits (phf/data/examples.py: builtin chosen responses, the task's documents,
prompt/completion rows or preference rows), the step budget, then one optimizer step: a seeded
shuffle's batch, padded per micro-batch (no packing: an example never attends to another), the
loss on response tokens (``sft.loss_on_prompt`` for every token) as the mean over all of the
batch's target tokens, under data parallelism too. The evaluation is the shared one (score,
score_max_at_25, held-out LM loss on the task's test documents, KL from the starting model)
plus the loss on the test responses (``eval/response_loss``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from phf.data.examples import EncodingCounts, Example, encode_example, example_batch, sft_texts
from phf.distributed import DistributedContext
from phf.evaluation import Evaluator
from phf.hardware import Placement
from phf.lora import with_lora
from phf.models import load_model_and_tokenizer
from phf.sequences import continuation_logprobs
from phf.stages.common import (
    EpochShuffle,
    ExampleStage,
    build_evaluator,
    kl_from_start,
    process_share,
    scenario_tables,
)
from phf.stages.loop import Tables
from phf.training import Optimization, check_divisible, training_network

log = logging.getLogger(__name__)


def encoded(
    texts: list[tuple[str, str]], tokenizer: Any, max_length: int, what: str
) -> list[Example]:
    counts = EncodingCounts()
    examples = [encode_example(p, r, tokenizer, max_length, counts) for p, r in texts]
    counts.warn(what, "sft.max_length", max_length)
    return [e for e in examples if e is not None]


def response_nll(
    model: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    placement: Placement,
    loss_on_prompt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the NLL of the target tokens, their number) of a padded batch of examples."""
    batch = example_batch(examples, pad_id, placement.device, loss_on_prompt=loss_on_prompt)
    return -continuation_logprobs(model, batch, placement).sum(), batch.targets.sum()


class SFTStage(ExampleStage):
    """A model and its examples; ``step()`` is one optimizer step (the module docstring)."""

    name = "sft"
    title = "Supervised finetuning"
    section = "sft"
    model_references = ("model.pretrained", "eval.kl_reference")
    data_parallel = "each process trains on its share of every global batch of examples"
    progress_metric = "tokens_seen"
    progress_label = "tokens"
    rate_metric = "train/tokens_per_s"
    headline = "score"

    def __init__(
        self, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> None:
        sft, train = cfg.sft, cfg.train
        check_divisible("train.batch_size", train.batch_size, distributed, "examples of a step")
        self.cfg, self.placement, self.distributed = cfg, placement, distributed
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, sft.max_length)
        model.to(placement.device)
        self.evaluator: Evaluator | None = None
        if distributed.is_main:  # the KL reference is sampled from the model as it starts
            self.evaluator = build_evaluator(
                cfg, self.tokenizer, placement, kl_from_start(cfg, model, self.tokenizer, placement)
            )
        self.model = with_lora(model, cfg.model.lora, "CAUSAL_LM")
        self.network = training_network(self.model, cfg.hardware, placement, distributed)
        self.train_examples = encoded(
            sft_texts(sft, cfg.task, sft.train_split, cfg.seed),
            self.tokenizer,
            sft.max_length,
            f"{sft.dataset} ({sft.train_split})",
        )
        self.test_examples = encoded(
            sft_texts(sft, cfg.task, sft.test_split, cfg.seed)[: sft.max_eval_examples],
            self.tokenizer,
            sft.max_length,
            f"{sft.dataset} ({sft.test_split})",
        )
        if not self.train_examples or not self.test_examples:
            raise ValueError(
                f"sft.dataset={sft.dataset} leaves no examples within sft.max_length="
                f"{sft.max_length} (train {len(self.train_examples)}, test "
                f"{len(self.test_examples)}); raise sft.max_length"
            )
        steps_per_epoch = math.ceil(len(self.train_examples) / train.batch_size)
        self.max_steps = train.max_steps or max(1, math.ceil(sft.epochs * steps_per_epoch))
        self.optimization = Optimization(
            [self.model], train, placement, self.max_steps, distributed, "SFT"
        )
        self.shuffle = EpochShuffle(len(self.train_examples), cfg.seed)
        self.steps_done, self.progress = 0, 0
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(
            "SFT: %.2fM parameters (%.2fM trained) on %s (%s); %d train / %d test examples; "
            "%d steps of %d examples; loss on %s",
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            trainable / 1e6,
            placement.device,
            placement.precision,
            len(self.train_examples),
            len(self.test_examples),
            self.max_steps,
            train.batch_size,
            "prompt and response" if sft.loss_on_prompt else "responses",
        )

    @classmethod
    def build(
        cls, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> SFTStage:
        return cls(cfg, placement, distributed)

    def step(self) -> dict[str, Any]:
        cfg = self.cfg
        batch = [self.train_examples[i] for i in self.shuffle.next(cfg.train.batch_size)]
        loss_on_prompt = cfg.sft.loss_on_prompt
        # The mean over every target token of the global batch, on every process.
        start = 1 if loss_on_prompt else None
        targets = sum(len(e.ids) - (start or e.response_start) for e in batch)
        mine = process_share(batch, self.distributed)
        micro = cfg.hardware.micro_batch_size
        pieces = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        pad = self.tokenizer.pad_token_id
        self.model.train()

        def piece_loss(piece: list[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            nll, _ = response_nll(self.network, piece, pad, self.placement, loss_on_prompt)
            return nll, {}

        sums = self.optimization.accumulate(self.network, pieces, piece_loss, targets)
        loss = sums["loss"] / targets
        update = self.optimization.step(loss, f"step {self.steps_done + 1}")
        self.steps_done += 1
        self.progress += sum(len(e.ids) for e in batch)
        return {"train/loss": loss} | update

    @torch.no_grad()
    def response_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0.0
        for first in range(0, len(self.test_examples), self.cfg.eval.batch_size):
            piece = self.test_examples[first : first + self.cfg.eval.batch_size]
            nll, n = response_nll(
                self.model, piece, self.tokenizer.pad_token_id, self.placement, False
            )
            total, count = total + float(nll), count + float(n)
        self.model.train()
        return total / count

    def evaluate(self) -> tuple[dict[str, float], Tables]:
        assert self.evaluator is not None, "only the main process evaluates"
        metrics, tables = self.evaluator.evaluate(self.model)
        return metrics | {"eval/response_loss": self.response_loss()}, scenario_tables(tables)

    def describe(self, metrics: dict[str, float]) -> str:
        return (
            f"score {metrics['score']:.4f}, eval/response_loss {metrics['eval/response_loss']:.4f}"
            f", kl {metrics.get('kl', float('nan')):.3f}"
        )

    def datasets(self) -> list[dict[str, Any]]:
        return example_datasets(self.cfg, self.cfg.sft, self.train_examples, self.test_examples)


def example_datasets(
    cfg: DictConfig, section: DictConfig, train: list[Any], test: list[Any]
) -> list[dict[str, Any]]:
    """The examples a stage read, as MLflow dataset records (source, digest of the tokens)."""
    import hashlib

    from phf.data.corpus import split_source

    records = []
    for split, examples, context in (
        (section.train_split, train, "training"),
        (section.test_split, test, "evaluation"),
    ):
        if section.dataset in ("builtin", "documents"):
            path = split_source(cfg.task.name, cfg.task.dataset, split).path
            source, kind = (str(path), "local") if path else (cfg.task.dataset, "hub")
        elif Path(section.dataset).expanduser().exists():
            source, kind = str(Path(section.dataset).expanduser().resolve()), "local"
        else:
            source, kind = section.dataset, "hub"
        digest = hashlib.sha256(repr(examples).encode()).hexdigest()[:16]
        records.append(
            {
                "name": f"{section.dataset}/{split}",
                "source": source,
                "source_type": kind,
                "split": split,
                "digest": digest,
                "context": context,
                "profile": {"examples": len(examples)},
            }
        )
    return records
