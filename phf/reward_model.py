"""Reward models: a causal-LM trunk with a scalar head read at the last real token.

Text in, reward out: ``encode`` turns a prompt and a response into EOS + tokens + EOS; the
reward is the head's output on the hidden state of the final EOS (found from the attention mask,
so padding side and a pad id equal to EOS's cannot move it). A saved reward model is a
directory: the trunk as a ``from_pretrained`` causal LM with its tokenizer, ``reward_head.pt``,
and ``reward_model.json`` (normalisation gain and bias, max_length). Policies whose tokenizer
differs are fine: they hand over text, which the reward model encodes with its own tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from phf.checkpoints import save_pretrained
from phf.data.preferences import Comparison
from phf.hardware import Placement
from phf.models import last_token_index, position_ids, resolve_source
from phf.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

REWARD_HEAD_FILE = "reward_head.pt"
REWARD_INFO_FILE = "reward_model.json"


class RewardModel(nn.Module):
    """``forward`` gives raw rewards [batch]; ``normalize`` applies the stored gain and bias."""

    def __init__(self, lm: PreTrainedModel, max_length: int) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # lm-human-preferences' init: rewards start near 0 with a spread of about 1.
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.max_length = max_length
        self.gain = 1.0
        self.bias = 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
        ).last_hidden_state
        last = last_token_index(attention_mask)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        return self.head(hidden[rows, last]).squeeze(-1).float()

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        return self.gain * rewards + self.bias

    def save(
        self, directory: Path, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, info: dict
    ) -> None:
        """The trunk, tokenizer and config (phf.checkpoints.save_pretrained), head and meta."""
        save_pretrained(directory, self.lm, tokenizer, cfg)
        torch.save(self.head.state_dict(), directory / REWARD_HEAD_FILE)
        meta = {"gain": self.gain, "bias": self.bias, "max_length": self.max_length, **info}
        (directory / REWARD_INFO_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, source: str) -> tuple[RewardModel, PreTrainedTokenizerBase]:
        """A reward model saved by objective=reward: a directory or an MLflow model URI."""
        directory = Path(resolve_source(source))
        if not (directory / REWARD_HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{source} is not a reward model: {directory} has no {REWARD_HEAD_FILE}. Give "
                "the model of an objective=reward run (runs:/<run id>/model or its output "
                "directory's model/)"
            )
        meta = json.loads((directory / REWARD_INFO_FILE).read_text())
        model = cls(AutoModelForCausalLM.from_pretrained(directory), meta["max_length"])
        model.head.load_state_dict(torch.load(directory / REWARD_HEAD_FILE, map_location="cpu"))
        model.gain, model.bias = float(meta["gain"]), float(meta["bias"])
        return model, load_tokenizer(str(directory))


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


def encode(prompt: str, response: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS + prompt + response + EOS: the reward is read on the final EOS, which has seen all of
    the response (and the leading EOS makes it a document of its own, as in pretraining)."""
    eos = tokenizer.eos_token_id
    return [eos, *tokenizer.encode(prompt + response, add_special_tokens=False), eos]


def fit(ids: list[int], max_length: int) -> list[int]:
    """Keep the first token (EOS) and the last max_length - 1: the response's end survives."""
    return ids if len(ids) <= max_length else [ids[0], *ids[len(ids) - max_length + 1 :]]


@dataclass
class EncodedComparison:
    sequences: list[list[int]]  # one per response
    best: int
    margin: float


def encode_comparisons(
    comparisons: Sequence[Comparison],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlong: str,
) -> tuple[list[EncodedComparison], EncodingStats]:
    stats = EncodingStats(comparisons=len(comparisons))
    encoded = []
    for comparison in comparisons:
        sequences = [encode(comparison.prompt, r, tokenizer) for r in comparison.responses]
        if any(len(s) > max_length for s in sequences):
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            sequences = [fit(s, max_length) for s in sequences]
        encoded.append(EncodedComparison(sequences, comparison.best, comparison.margin))
    return encoded, stats


def right_padded(
    sequences: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


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
    input_ids, attention_mask = right_padded(flat, pad_id, placement.device)
    with placement.autocast():
        flat_rewards = model(input_ids, attention_mask)
    rewards = torch.zeros((len(batch), width), device=flat_rewards.device)
    valid = torch.zeros((len(batch), width), dtype=torch.bool, device=flat_rewards.device)
    start = 0
    for i, comparison in enumerate(batch):
        n = len(comparison.sequences)
        rewards[i, :n] = flat_rewards[start : start + n]
        valid[i, :n] = True
        start += n
    return rewards, valid


def preference_loss(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    best: torch.Tensor,
    margins: torch.Tensor,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """The reward model's loss on a batch of comparisons.

    Pairs: -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT's, TRL's); N-way
    comparisons: cross-entropy of the softmax over the N rewards against the best one
    (lm-human-preferences). For pairs without margins the two are the same number. ``center_coef``
    adds coef * (sum of a comparison's rewards)^2 (TRL's center_rewards_coefficient).
    """
    if rewards.size(1) == 2 and bool(valid.all()):
        chosen = rewards.gather(1, best[:, None]).squeeze(1)
        rejected = rewards.gather(1, (1 - best)[:, None]).squeeze(1)
        loss = -F.logsigmoid(chosen - rejected - margins).mean()
    else:
        loss = F.cross_entropy(rewards.masked_fill(~valid, float("-inf")), best)
    if center_coef:
        loss = loss + center_coef * (rewards * valid).sum(dim=1).pow(2).mean()
    return loss


def preference_metrics(
    rewards: torch.Tensor, valid: torch.Tensor, best: torch.Tensor
) -> dict[str, torch.Tensor]:
    """accuracy: the best response's reward is strictly above every other's (a tie is wrong);
    margin: the best response's reward minus the mean of the others'; reward mean and std over
    every response."""
    best_reward = rewards.gather(1, best[:, None]).squeeze(1)
    others = valid.clone()
    others.scatter_(1, best[:, None], False)
    beaten = torch.where(others, rewards < best_reward[:, None], torch.ones_like(others))
    other_mean = (rewards * others).sum(dim=1) / others.sum(dim=1)
    real = rewards[valid]
    return {
        "accuracy": beaten.all(dim=1).float().mean(),
        "margin": (best_reward - other_mean).mean(),
        "reward_mean": real.mean(),
        "reward_std": real.std() if real.numel() > 1 else torch.zeros(()),
    }


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
    sequences = [
        fit(encode(p, r, tokenizer), model.max_length)
        for p, r in zip(prompts, responses, strict=True)
    ]
    out = []
    for first in range(0, len(sequences), batch_size):
        input_ids, attention_mask = right_padded(
            sequences[first : first + batch_size], tokenizer.pad_token_id, placement.device
        )
        with placement.autocast():
            out.append(model(input_ids, attention_mask).cpu())
    model.train(was_training)
    rewards = torch.cat(out)
    return model.normalize(rewards) if normalized else rewards
