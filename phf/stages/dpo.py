"""The direct-preference-optimisation stage (objective=dpo): DPO, IPO or hinge on preference pairs.

Read top to bottom: the policy (``dpo.policy``, else model.pretrained; LoRA adapters when
model.lora.r > 0), the frozen reference (``dpo.reference``, else the starting policy: with LoRA,
its base weights with the adapters switched off, no second copy), the pairs of both splits (the
same data the reward stage reads: a best-of-N row gives N - 1 pairs), the reference's
log-probabilities of every pair computed once, then one optimizer step:
policy log-probabilities of chosen and rejected responses (summed over response tokens only)
and the loss of phf/losses/preference.py, the mean over the global batch's pairs (under data
parallelism too).
``dpo.rpo_alpha`` adds the chosen side's negative log-likelihood per token (RPO). Metrics are
TRL's (``rewards/chosen``, ``rewards/accuracies``, ``logps/rejected``, ``nll_loss``, ...); the
evaluation adds them on the test pairs (``eval/rewards/accuracies``, ...) to the shared one,
with KL from the reference.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from phf.data.examples import EncodingCounts, Example, encode_responses, example_batch
from phf.data.preferences import as_pairs, load_comparisons
from phf.distributed import DistributedContext
from phf.evaluation import Evaluator
from phf.hardware import Placement
from phf.lora import base_weights, with_lora
from phf.losses.preference import chosen_nll, dpo_loss, dpo_metrics
from phf.models import load_model_and_tokenizer, resolve_source
from phf.sequences import batched_continuation_logprobs, continuation_logprobs
from phf.stages.common import (
    EpochShuffle,
    ExampleStage,
    build_evaluator,
    kl_from_start,
    process_share,
    scenario_tables,
)
from phf.stages.loop import Tables
from phf.stages.sft import example_datasets
from phf.tokenizer import load_tokenizer
from phf.training import Optimization, check_divisible, training_network

log = logging.getLogger(__name__)

Pair = tuple[Example, Example]  # (chosen, rejected)


def encode_pairs(
    comparisons: list[Any], tokenizer: Any, max_length: int, overlong: str, what: str
) -> list[Pair]:
    """Each pair's chosen and rejected examples, sharing their prompt, cut to max_length (the
    prompt's start; dpo.overlong=drop leaves out a pair that does not fit whole), counted in a
    warning."""
    counts = EncodingCounts()
    pairs = []
    for prompt, chosen, rejected, _ in as_pairs(comparisons):
        encoded = encode_responses(
            prompt, (chosen, rejected), tokenizer, max_length, counts, overlong == "truncate"
        )
        if encoded is not None:
            pairs.append((encoded[0], encoded[1]))
    counts.warn(what, "dpo.max_length", max_length)
    return pairs


def logprobs_of(
    model: torch.nn.Module, examples: list[Example], pad_id: int, placement: Placement, batch: int
) -> torch.Tensor:
    """log pi(response | prompt) of each example [n], on the CPU, ``batch`` at a time."""
    rows = [e.ids for e in examples]
    starts = [e.response_start for e in examples]
    return batched_continuation_logprobs(model, rows, starts, pad_id, batch, placement)


class DPOStage(ExampleStage):
    """A policy, its reference's cached log-probabilities and the pairs (module docstring)."""

    name = "dpo"
    title = "DPO"
    section = "dpo"
    model_references = ("model.pretrained", "dpo.policy", "dpo.reference", "eval.kl_reference")
    data_parallel = "each process trains on its share of every global batch of pairs"
    progress_metric = "pairs_seen"
    progress_label = "pairs"
    rate_metric = "train/pairs_per_s"
    headline = "score"

    def __init__(
        self, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> None:
        dpo, train = cfg.dpo, cfg.train
        check_divisible("train.batch_size", train.batch_size, distributed, "pairs of a step")
        if cfg.model.pretrained is None and dpo.policy is None:
            raise ValueError(
                "objective=dpo optimises a pretrained policy: set model.pretrained (or "
                "dpo.policy), e.g. runs:/<run id>/model of an objective=mle or sft run"
            )
        self.cfg, self.placement, self.distributed = cfg, placement, distributed
        model_cfg = OmegaConf.merge(cfg.model, {"pretrained": dpo.policy or cfg.model.pretrained})
        model, self.tokenizer = load_model_and_tokenizer(model_cfg, dpo.max_length)
        model.to(placement.device)
        reference = None
        if dpo.reference is not None:
            source = resolve_source(dpo.reference)
            if load_tokenizer(source).get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(
                    f"dpo.reference={dpo.reference}: its tokenizer differs from the policy's, so "
                    "their log-probabilities of one response cannot be compared"
                )
            reference = AutoModelForCausalLM.from_pretrained(source).to(placement.device).eval()
        self.evaluator: Evaluator | None = None
        if distributed.is_main:
            kl_model = reference if reference is not None else model
            self.evaluator = build_evaluator(
                cfg,
                self.tokenizer,
                placement,
                kl_from_start(cfg, kl_model, self.tokenizer, placement),
            )
        # Without dpo.reference and without LoRA, the reference is a frozen copy of the start.
        if reference is None and int(cfg.model.lora.r) == 0:
            reference = AutoModelForCausalLM.from_pretrained(
                resolve_source(model_cfg.pretrained)
            ).to(placement.device)
            if len(self.tokenizer) > reference.get_input_embeddings().num_embeddings:
                reference.resize_token_embeddings(len(self.tokenizer))
        self.model = with_lora(model, cfg.model.lora, "CAUSAL_LM")
        self.network = training_network(self.model, cfg.hardware, placement, distributed)
        overlong = str(getattr(dpo.overlong, "value", dpo.overlong))
        self.train_pairs = encode_pairs(
            load_comparisons(dpo, cfg.task, dpo.train_split, cfg.seed, "dpo.dataset"),
            self.tokenizer,
            dpo.max_length,
            overlong,
            f"{dpo.dataset} ({dpo.train_split})",
        )
        self.test_pairs = encode_pairs(
            load_comparisons(dpo, cfg.task, dpo.test_split, cfg.seed, "dpo.dataset"),
            self.tokenizer,
            dpo.max_length,
            overlong,
            f"{dpo.dataset} ({dpo.test_split})",
        )[: dpo.max_eval_pairs]
        if not self.train_pairs or not self.test_pairs:
            raise ValueError(
                f"dpo.dataset={dpo.dataset} leaves no pairs within dpo.max_length="
                f"{dpo.max_length} (train {len(self.train_pairs)}, test {len(self.test_pairs)})"
            )
        # The reference's log-probabilities, once: [pairs, 2] (chosen, rejected).
        self.reference_train = self.reference_logprobs(reference, self.train_pairs)
        self.reference_test = self.reference_logprobs(reference, self.test_pairs)
        del reference
        steps_per_epoch = math.ceil(len(self.train_pairs) / train.batch_size)
        self.max_steps = train.max_steps or max(1, math.ceil(dpo.epochs * steps_per_epoch))
        self.optimization = Optimization(
            [self.model], train, placement, self.max_steps, distributed, "DPO"
        )
        self.shuffle = EpochShuffle(len(self.train_pairs), cfg.seed)
        self.steps_done, self.progress = 0, 0
        log.info(
            "DPO (%s, beta %s): %.2fM parameters on %s (%s); %d train / %d test pairs; %d steps "
            "of %d pairs; reference: %s",
            getattr(dpo.loss_type, "value", dpo.loss_type),
            dpo.beta,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            placement.device,
            placement.precision,
            len(self.train_pairs),
            len(self.test_pairs),
            self.max_steps,
            train.batch_size,
            dpo.reference
            or "the starting policy" + (" (LoRA adapters off)" if int(cfg.model.lora.r) else ""),
        )

    @classmethod
    def build(
        cls, cfg: DictConfig, placement: Placement, distributed: DistributedContext
    ) -> DPOStage:
        return cls(cfg, placement, distributed)

    def reference_logprobs(
        self, reference: torch.nn.Module | None, pairs: list[Pair]
    ) -> torch.Tensor:
        examples = [e for pair in pairs for e in pair]
        pad, batch = self.tokenizer.pad_token_id, self.cfg.eval.batch_size
        if reference is not None:
            logps = logprobs_of(reference, examples, pad, self.placement, batch)
        else:  # LoRA: the policy's base weights are the reference
            with base_weights(self.model):
                logps = logprobs_of(self.model, examples, pad, self.placement, batch)
        return logps.view(-1, 2)

    def pair_terms(
        self, model: torch.nn.Module, pairs: list[Pair], reference: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the pairs' losses, sums of TRL's metrics) for ``pairs``, one forward pass
        over chosen and rejected responses together."""
        dpo = self.cfg.dpo
        examples = [e for pair in pairs for e in pair]
        batch = example_batch(examples, self.tokenizer.pad_token_id, self.placement.device)
        logps = continuation_logprobs(model, batch, self.placement).view(-1, 2)
        reference = reference.to(logps.device)
        args = (logps[:, 0], logps[:, 1], reference[:, 0], reference[:, 1])
        losses = dpo_loss(
            *args,
            float(dpo.beta),
            str(getattr(dpo.loss_type, "value", dpo.loss_type)),
            float(dpo.label_smoothing),
        )
        # Tokens each chosen log-probability sums over: the response and its final EOS.
        lengths = torch.tensor([len(c.ids) - c.response_start for c, _ in pairs])
        nll = chosen_nll(logps[:, 0], lengths.to(logps.device))
        if dpo.rpo_alpha:
            losses = losses + float(dpo.rpo_alpha) * nll
        metrics = dpo_metrics(*args, float(dpo.beta))
        return losses.sum(), metrics | {"nll_loss": nll.detach().sum()}

    def step(self) -> dict[str, Any]:
        cfg = self.cfg
        indices = self.shuffle.next(cfg.train.batch_size)
        mine = process_share(indices, self.distributed)
        micro = max(1, cfg.hardware.micro_batch_size // 2)  # two sequences per pair
        pieces = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        self.model.train()

        def piece_loss(piece: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            pairs = [self.train_pairs[i] for i in piece]
            return self.pair_terms(self.network, pairs, self.reference_train[piece])

        sums = self.optimization.accumulate(self.network, pieces, piece_loss, len(indices))
        metrics = {name: value / len(indices) for name, value in sums.items()}
        loss = metrics.pop("loss")
        update = self.optimization.step(loss, f"step {self.steps_done + 1}")
        self.steps_done += 1
        self.progress += len(indices)
        return metrics | {"train/loss": loss} | update

    @torch.no_grad()
    def pair_metrics(self) -> dict[str, float]:
        """TRL's metrics and the loss on the test pairs, as eval/<name>."""
        self.model.eval()
        sums: dict[str, float] = {}
        batch = max(1, self.cfg.eval.batch_size // 2)
        for first in range(0, len(self.test_pairs), batch):
            piece = list(range(first, min(first + batch, len(self.test_pairs))))
            pairs = [self.test_pairs[i] for i in piece]
            loss, metrics = self.pair_terms(self.model, pairs, self.reference_test[piece])
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        self.model.train()
        return {f"eval/{name}": value / len(self.test_pairs) for name, value in sums.items()}

    def evaluate(self) -> tuple[dict[str, float], Tables]:
        assert self.evaluator is not None, "only the main process evaluates"
        metrics, tables = self.evaluator.evaluate(self.model)
        return metrics | self.pair_metrics(), scenario_tables(tables)

    def describe(self, metrics: dict[str, float]) -> str:
        return (
            f"eval/rewards/accuracies {metrics['eval/rewards/accuracies']:.3f}, score "
            f"{metrics['score']:.4f}, kl {metrics.get('kl', float('nan')):.3f}"
        )

    def datasets(self) -> list[dict[str, Any]]:
        return example_datasets(self.cfg, self.cfg.dpo, self.train_pairs, self.test_pairs)
