"""Reward models in the ecosystem's format: ``AutoModelForSequenceClassification``, one label.

A reward model is any Hugging Face sequence classifier with ``num_labels=1``: phf's own (a causal
LM trunk such as the tiny GPT-2 or an MLE run's model, with a linear ``score`` head), an encoder
(DistilBERT, DeBERTa, as TRL and OpenAssistant train them), or one from the hub. Saved with
``save_pretrained`` (safetensors), it loads with ``AutoModelForSequenceClassification`` and in
TRL; phf's normalisation gain and bias and its max length live in ``config.json`` under
``phf_reward``, so phf applies them and other tools see the raw reward.

Text in, reward out: a causal model phf trains reads EOS + prompt + response + EOS (a document
of its own, as the policy saw it; the final EOS has seen all of the response) and its reward is
the ``score`` head on the hidden state of the last real token, found from the attention mask:
the padding side cannot move it. Its tokenizer gets a pad token of its own (``<|pad|>``) where
pad and EOS were one id, so Hugging Face's own pooling ("the last token that is not the pad
id", TRL's too) reads that same final EOS and gives the same reward (left-padded batches need
position ids, which phf passes). A causal reward model from elsewhere reads EOS + prompt +
response, as it was not trained with phf's final EOS. An encoder reads its tokenizer's own
[CLS] prompt + response [SEP] and pools as it was built to. Policies with another tokenizer hand
over text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from phf.checkpoints import save_pretrained
from phf.data.preferences import Comparison
from phf.hardware import Placement
from phf.models import last_token_index, position_ids, resolve_source
from phf.sequences import build_batch
from phf.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

REWARD_CONFIG_KEY = "phf_reward"  # in config.json: gain, bias, max_length, and provenance
PAD_TOKEN = "<|pad|>"


def distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token of its own where it pads with EOS (GPT-2's, phf's)."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def is_reward_config(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


class RewardModel(nn.Module):
    """``forward`` gives raw rewards [batch]; ``normalize`` applies the stored gain and bias."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        final_eos: bool = True,
    ) -> None:
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(
                f"a reward model has one output (num_labels=1); this one has "
                f"{model.config.num_labels}"
            )
        self.model = model
        # The Hugging Face model itself (under its LoRA adapters, if any): a causal trunk with a
        # `score` head (GPT-2, Llama, Pythia, ...) is read at the last real token; anything else
        # (encoders) pools as its own forward does.
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.causal = hasattr(self.inner, "score") and hasattr(self.inner, "base_model")
        # Special tokens of its own ([CLS] ... [SEP]) mark an encoder's input.
        self.adds_special_tokens = len(tokenizer("a")["input_ids"]) > len(
            tokenizer("a", add_special_tokens=False)["input_ids"]
        )
        self.eos_token_id = tokenizer.eos_token_id
        self.max_length = max_length
        # phf's causal reward models end their input with EOS, where the reward is read.
        self.final_eos = final_eos and self.causal and not self.adds_special_tokens
        meta = getattr(model.config, REWARD_CONFIG_KEY, None) or {}
        self.gain = float(meta.get("gain", 1.0))
        self.bias = float(meta.get("bias", 0.0))

    @property
    def normalized(self) -> bool:
        """Whether the model carries phf's normalisation (rewards of policy samples ~ N(0, 1))."""
        meta = getattr(self.model.config, REWARD_CONFIG_KEY, None) or {}
        return bool(meta.get("normalized"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        hidden = self.inner.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
        ).last_hidden_state
        rows = torch.arange(hidden.size(0), device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]
        return self.inner.score(last).squeeze(-1).float()

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        return self.gain * rewards + self.bias

    def full_ids(self, prompt: str, response: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The ids the reward is read from, whatever their length."""
        if self.adds_special_tokens:
            return tokenizer(prompt + response)["input_ids"]
        ids = [self.eos_token_id, *tokenizer.encode(prompt + response, add_special_tokens=False)]
        return [*ids, self.eos_token_id] if self.final_eos else ids

    def encode(self, prompt: str, response: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """``full_ids`` cut to max_length: the start of the prompt goes."""
        return fit(self.full_ids(prompt, response, tokenizer), self.max_length)

    def save(
        self,
        directory: Path,
        tokenizer: PreTrainedTokenizerBase,
        cfg: DictConfig,
        info: dict[str, Any],
    ) -> None:
        """``save_pretrained`` with gain, bias, max_length and ``info`` in the config."""
        setattr(
            self.model.config,
            REWARD_CONFIG_KEY,
            {
                "gain": self.gain,
                "bias": self.bias,
                "max_length": self.max_length,
                "final_eos": self.final_eos,
                **info,
            },
        )
        save_pretrained(directory, self.model, tokenizer, cfg)

    @classmethod
    def load(cls, source: str) -> tuple[RewardModel, PreTrainedTokenizerBase]:
        """A sequence-classification reward model: a hub id, a directory, an MLflow URI."""
        local = resolve_source(source)
        config = AutoConfig.from_pretrained(local)
        if not is_reward_config(config):
            raise FileNotFoundError(
                f"{source} is not a reward model: its config.json names {config.architectures}, "
                "not a *ForSequenceClassification. Give the model of an objective=reward run "
                "(runs:/<run id>/model or its output directory's model/), or any "
                "AutoModelForSequenceClassification with num_labels=1"
            )
        tokenizer = load_tokenizer(local)
        model = AutoModelForSequenceClassification.from_pretrained(local)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        meta = getattr(model.config, REWARD_CONFIG_KEY, None) or {}
        max_length = int(meta.get("max_length") or min(tokenizer.model_max_length, 1024))
        return cls(model, tokenizer, max_length, bool(meta.get("final_eos", False))), tokenizer


def build_trunk(
    model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> PreTrainedModel:
    """A fresh reward model to train: ``model.pretrained`` (any architecture that
    AutoModelForSequenceClassification supports: an MLE run's causal LM, DistilBERT, ...) with
    a new one-output head, or, with none, the tiny GPT-2 of ``model.architecture``. The
    tokenizer has had its distinct pad token added (distinct_pad_token)."""
    if model_cfg.pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_source(model_cfg.pretrained), num_labels=1, problem_type="regression"
        )
    else:
        architecture = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        dropout = architecture.pop("dropout", 0.0)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            num_labels=1,
            problem_type="regression",
            **architecture,
        )
        model = GPT2ForSequenceClassification(config)
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    score = getattr(model, "score", None)
    if isinstance(score, nn.Linear):
        # lm-human-preferences' init: rewards start near 0 with a spread of about 1.
        nn.init.normal_(score.weight, std=1.0 / (score.in_features + 1) ** 0.5)
        if score.bias is not None:
            nn.init.zeros_(score.bias)
    positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if positions is not None and max_length > positions:
        raise ValueError(
            f"reward.max_length={max_length} exceeds the model's {positions} positions; lower it"
        )
    return model


@dataclass
class EncodingStats:
    comparisons: int = 0
    truncated: int = 0  # comparisons with at least one response cut to max_length
    dropped: int = 0  # comparisons left out because a response was too long

    def warn(self, what: str, max_length: int) -> None:
        """Over-long examples are never handled silently."""
        if self.truncated or self.dropped:
            log.warning(
                "%s: %d of %d comparisons exceed reward.max_length=%d tokens: %d truncated "
                "(their beginning cut), %d dropped",
                what,
                self.truncated + self.dropped,
                self.comparisons,
                max_length,
                self.truncated,
                self.dropped,
            )


def fit(ids: list[int], max_length: int) -> list[int]:
    """Keep the first token (EOS or [CLS]) and the last max_length - 1: the response's end
    survives."""
    return ids if len(ids) <= max_length else [ids[0], *ids[len(ids) - max_length + 1 :]]


@dataclass
class EncodedComparison:
    sequences: list[list[int]]  # one per response
    best: int
    margin: float


def encode_comparisons(
    comparisons: Sequence[Comparison],
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    overlong: str,
) -> tuple[list[EncodedComparison], EncodingStats]:
    stats = EncodingStats(comparisons=len(comparisons))
    encoded = []
    limit = model.max_length
    for comparison in comparisons:
        sequences = [model.full_ids(comparison.prompt, r, tokenizer) for r in comparison.responses]
        if any(len(s) > limit for s in sequences):
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            sequences = [fit(s, limit) for s in sequences]
        encoded.append(EncodedComparison(sequences, comparison.best, comparison.margin))
    return encoded, stats


def comparison_rewards(
    model: RewardModel,
    batch: Sequence[EncodedComparison],
    pad_id: int,
    placement: Placement,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards [comparisons, max responses] in one forward pass, and which entries are real
    (best-of-N rows may hold different numbers of responses)."""
    width = max(len(c.sequences) for c in batch)
    flat = [s for c in batch for s in c.sequences]
    inputs = build_batch(flat, pad_id, placement.device)
    with placement.autocast():
        flat_rewards = model(inputs.input_ids, inputs.attention_mask).float()
    rewards = torch.zeros((len(batch), width), device=flat_rewards.device)
    valid = torch.zeros((len(batch), width), dtype=torch.bool, device=flat_rewards.device)
    start = 0
    for i, comparison in enumerate(batch):
        n = len(comparison.sequences)
        rewards[i, :n] = flat_rewards[start : start + n]
        valid[i, :n] = True
        start += n
    return rewards, valid


@torch.no_grad()
def score_texts(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    placement: Placement,
    normalized: bool = True,
) -> torch.Tensor:
    """Rewards of (prompt, response) texts [n], on the CPU, normalised unless told otherwise."""
    was_training = model.training
    model.eval()
    sequences = [model.encode(p, r, tokenizer) for p, r in zip(prompts, responses, strict=True)]
    out = []
    for first in range(0, len(sequences), batch_size):
        batch = build_batch(
            sequences[first : first + batch_size], tokenizer.pad_token_id, placement.device
        )
        with placement.autocast():
            out.append(model(batch.input_ids, batch.attention_mask).float().cpu())
    model.train(was_training)
    rewards = torch.cat(out)
    return model.normalize(rewards) if normalized else rewards
