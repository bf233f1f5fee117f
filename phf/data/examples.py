"""Prompt + response examples for the stages that train on responses (sft, dpo): reading them
and turning them into padded token batches with a mask on the response.

An example is EOS + prompt + response + EOS (the leading EOS makes it a document of its own, as
in pretraining and generation; the final EOS teaches the model to stop), the prompt and the
response tokenized apart, as a policy sees a prompt and then generates. Too long an example
loses the start of its prompt; one whose response alone does not fit is dropped. Both are
counted, never silent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from phf.data.corpus import DatasetError, iter_documents
from phf.data.preferences import builtin_comparisons, parse_row, split_rows
from phf.sequences import Batch, build_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # EOS + prompt + response + EOS
    response_start: int  # the position of the response's first token


@dataclass
class EncodingCounts:
    examples: int = 0
    truncated: int = 0  # the start of the prompt cut
    dropped: int = 0  # the response alone longer than max_length

    def warn(self, what: str, key: str, max_length: int) -> None:
        if self.truncated or self.dropped:
            log.warning(
                "%s: %d of %d examples exceed %s=%d tokens: %d had their prompt's start cut, "
                "%d (whose response alone is too long) were dropped",
                what,
                self.truncated + self.dropped,
                self.examples,
                key,
                max_length,
                self.truncated,
                self.dropped,
            )


def encode_responses(
    prompt: str,
    responses: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    counts: EncodingCounts | None = None,
    truncate: bool = True,
) -> list[Example] | None:
    """One example per response to one prompt, sharing the prompt, whose start is cut so that
    the longest fits ``max_length`` (``truncate``; else too long is dropped); None when dropped
    (the longest response alone does not fit)."""
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    response_ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    room = max_length - 2 - max(len(r) for r in response_ids)
    if counts is not None:
        counts.examples += 1
    if room < 0 or (not truncate and len(prompt_ids) > room):
        if counts is not None:
            counts.dropped += 1
        return None
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room :]
        if counts is not None:
            counts.truncated += 1
    return [Example((eos, *prompt_ids, *r, eos), 1 + len(prompt_ids)) for r in response_ids]


def encode_example(
    prompt: str,
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    counts: EncodingCounts | None = None,
) -> Example | None:
    """The example's ids (its prompt's start cut to fit ``max_length``), or None (dropped)."""
    encoded = encode_responses(prompt, [response], tokenizer, max_length, counts)
    return None if encoded is None else encoded[0]


def example_batch(
    examples: Sequence[Example],
    pad_id: int,
    device: torch.device,
    left: bool = False,
    loss_on_prompt: bool = False,
) -> Batch:
    """The examples as one padded batch (phf/sequences.py), on the right (or the left), whose
    counted tokens are each response and its final EOS (every real token after the first EOS
    with ``loss_on_prompt``)."""
    starts = [1 if loss_on_prompt else e.response_start for e in examples]
    return build_batch([e.ids for e in examples], pad_id, device, left=left, counted_from=starts)


def sft_texts(sft: DictConfig, task: DictConfig, split: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one split of ``sft.dataset`` (see SFTConfig): builtin (the
    chosen responses of the task's built-in preference pairs), documents (the task's own, whole,
    with no prompt), or rows of prompt/completion or of preferences (their chosen response)."""
    if sft.dataset == "builtin":
        comparisons = builtin_comparisons(
            iter_documents(task.name, task.dataset, split), task.hit_threshold, seed
        )
        return [(c.prompt, c.responses[c.best]) for c in comparisons]
    if sft.dataset == "documents":
        return [("", d.text) for d in iter_documents(task.name, task.dataset, split) if d.text]
    texts = []
    for row, where, _ in split_rows(sft, split, "sft.dataset"):
        if isinstance(row, dict) and "completion" in row:
            prompt, completion = row.get("prompt", ""), row["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DatasetError(f"{where}: 'prompt' and 'completion' must be strings")
            if not completion.strip():
                raise DatasetError(f"{where}: 'completion' is empty; drop the row or fill it")
            texts.append((prompt, completion))
        else:
            comparison = parse_row(row, where, "auto")
            texts.append((comparison.prompt, comparison.responses[comparison.best]))
    return texts
