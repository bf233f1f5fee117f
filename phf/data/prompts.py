"""Prompts: for evaluation scenarios, and the train and held-out prompts of online RL stages.

A source is ``none`` (unconditional, from EOS), one the task derives from its own corpus
(``function_signatures``, ``misaligned_prefixes``: of a split of the task's dataset), a text file
(one prompt per line), a .jsonl/.jsonl.gz/.parquet file or a directory of <split> files whose rows
hold a prompt field (``prompt`` by default) or ``messages`` (chat turns), or a hub dataset id
(streamed: e.g. ``wentingzhao/anthropic-hh-first-prompt``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from phf.data.corpus import DatasetError, iter_documents, looks_like_path
from phf.data.preferences import HUMAN_TURN, split_rows

log = logging.getLogger(__name__)

# A complete one-line function signature: `def name(args):` or `def name(args) -> T:`.
_SIGNATURE = re.compile(r"^\s*(?:async\s+)?def\s+\w+\(.*\)\s*(?:->\s*[^:]+)?:\s*$")
DERIVED = ("function_signatures", "misaligned_prefixes")
ASSISTANT_PROMPT = "\n\nAssistant:"


def function_signatures(task: DictConfig, limit: int, split: str | None = None) -> list[str]:
    """Up to ``limit`` distinct one-line ``def`` signatures from a split of the task's dataset
    (its test split by default), dedented, each ending in a newline so that the model continues
    with the body."""
    seen: dict[str, None] = {}
    for document in iter_documents(task.name, task.dataset, split or task.test_split):
        for line in document.text.splitlines():
            if _SIGNATURE.match(line):
                seen.setdefault(line.strip() + "\n")
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def misaligned_prefixes(task: DictConfig, limit: int, split: str | None = None) -> list[str]:
    """Up to ``limit`` distinct openings of a split's (the test split's by default) misaligned
    segments (score above task.hit_threshold): the first half of their words, at most 8, from
    segments of at least 4 words. An offline stand-in for "challenging" prompts such as
    RealToxicityPrompts'."""
    seen: dict[str, None] = {}
    for document in iter_documents(task.name, task.dataset, split or task.test_split):
        for text, score in zip(document.texts, document.scores, strict=True):
            words = text.split()
            if score > task.hit_threshold and len(words) >= 4:
                seen.setdefault(" ".join(words[: min(8, len(words) // 2)]))
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def row_prompt(row: Any, field: str, where: str) -> str:
    """A row's prompt: its ``field`` (a string), or its ``messages`` (chat turns, role and
    content) written as Human/Assistant turns, ending where the assistant would answer."""
    if isinstance(row, dict) and isinstance(row.get(field), str):
        return row[field]
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    ):
        turns = [m for m in messages if m.get("role") != "system"]
        if turns and turns[-1].get("role") == "assistant":
            turns = turns[:-1]  # the answer to learn is not part of the prompt
        text = "".join(
            (HUMAN_TURN if m.get("role") == "user" else ASSISTANT_PROMPT) + " " + m["content"]
            for m in turns
        )
        return text + ASSISTANT_PROMPT
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DatasetError(
        f"{where}: no prompt: the row has no string {field!r} and no 'messages' (it has "
        f"{keys}); pick the column with <stage>.prompt_field"
    )


def rows_prompts(rows: Iterable[Any], field: str, limit: int, what: str) -> list[str]:
    """Up to ``limit`` non-empty prompts from dict rows (a file's, a hub dataset's, or a
    ``datasets.Dataset`` built in memory)."""
    prompts = []
    for number, row in enumerate(rows, start=1):
        prompt = row_prompt(row, field, f"{what}, row {number}")
        if prompt.strip():
            prompts.append(prompt)
        if len(prompts) >= limit:
            break
    return prompts


ROW_SUFFIXES = (".jsonl", ".gz", ".parquet")


def source_prompts(
    source: str,
    task: DictConfig,
    split: str,
    limit: int,
    field: str = "prompt",
    hold_out: bool = True,
) -> list[str]:
    """Up to ``limit`` prompts of one split of ``source`` (see the module docstring). A single
    file's split is its every 10th row (test) or the others (train); a text file is read whole
    without ``hold_out`` (an evaluation scenario's own prompts)."""
    if source == "none":
        return [""]
    if source in DERIVED:
        find = function_signatures if source == "function_signatures" else misaligned_prefixes
        return find(task, limit, split)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix not in ROW_SUFFIXES:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not hold_out:
            return lines[:limit]
        if split == task.test_split:
            return lines[9::10][:limit]
        return [line for i, line in enumerate(lines) if i % 10 != 9][:limit]
    if looks_like_path(source) and not path.exists():
        raise DatasetError(
            f"prompt source {path} does not exist; prompts are none, function_signatures, "
            "misaligned_prefixes, a text file, a .jsonl/.parquet file or directory, or a hub "
            "dataset id"
        )
    section = OmegaConf.create({"dataset": source, "test_split": task.test_split})
    rows = (row for row, _, _ in split_rows(section, split, "prompts"))
    return rows_prompts(rows, field, limit, f"{source} ({split})")


def scenario_prompts(scenario: DictConfig, task: DictConfig, num_samples: int) -> list[str]:
    """``num_samples`` prompts of an evaluation scenario, from the task's test split (cycling
    when there are fewer distinct ones)."""
    prompts = source_prompts(scenario.prompts, task, task.test_split, num_samples, hold_out=False)
    if not prompts:
        raise DatasetError(
            f"no {scenario.prompts} prompts found in the {task.test_split!r} split of task "
            f"{task.name!r}; drop the scenario (~task.scenarios.<name>) or, for "
            "misaligned_prefixes, lower task.hit_threshold"
        )
    return list(islice(cycle(prompts), num_samples))


@dataclass
class PromptSet:
    train: list[str]  # the rollouts' prompts
    heldout: list[str]  # evaluated as the scenario "prompts"; [] for none
    truncated: int  # prompts cut to their last max_prompt_length tokens


def online_prompts(
    settings: DictConfig, task: DictConfig, tokenizer: PreTrainedTokenizerBase
) -> PromptSet:
    """The train and held-out prompts of an online stage's ``settings`` (ppo, grpo, rloo),
    each cut from the left to ``settings.max_prompt_length`` tokens."""
    source = settings.prompts
    limit = settings.max_prompts
    train = source_prompts(source, task, task.train_split, limit, settings.prompt_field)
    heldout = (
        []
        if source == "none"
        else source_prompts(source, task, task.test_split, limit, settings.prompt_field)
    )
    if not train:
        raise DatasetError(f"no prompts in the {task.train_split!r} split of {source}")
    truncated = 0

    def fit(prompt: str) -> str:
        nonlocal truncated
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) <= settings.max_prompt_length:
            return prompt
        truncated += 1
        return tokenizer.decode(ids[-settings.max_prompt_length :])

    prompts = PromptSet([fit(p) for p in train], [fit(p) for p in heldout], 0)
    prompts.truncated = truncated
    if truncated:
        log.warning(
            "%d of %d prompts of %s are longer than max_prompt_length=%d tokens: their start "
            "was cut",
            truncated,
            len(train) + len(heldout),
            source,
            settings.max_prompt_length,
        )
    return prompts
