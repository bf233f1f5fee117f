"""Preference data for reward models: which of several responses to one prompt is best.

Three row schemas are read, each into the same ``Comparison`` (a prompt, N >= 2 responses and
the index of the best one):

- pairwise: ``prompt``, ``chosen``, ``rejected`` (TRL's), with an optional per-row ``margin``;
- hh: ``chosen`` and ``rejected`` whole transcripts of ``\\n\\nHuman:`` / ``\\n\\nAssistant:``
  turns (Anthropic/hh-rlhf), split into their shared prompt (up to the last Assistant turn) and
  the two final responses;
- best_of_n: ``query``, ``sample0`` .. ``sample{N-1}`` and ``best`` (OpenAI's 2019
  lm-human-preferences).

``reward.dataset`` picks the source: ``builtin`` (pairs derived from the task's own scored
corpus, see ``builtin_comparisons``), a local .jsonl/.jsonl.gz/.parquet file or a directory of
``<split>`` files, or a hub dataset id. A malformed row stops the run with its name.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from phf.data.corpus import (
    DatasetError,
    Document,
    file_rows,
    hub_rows,
    iter_documents,
    local_split_file,
    looks_like_path,
)

log = logging.getLogger(__name__)

FORMATS = ("auto", "pairwise", "hh", "best_of_n")
HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = "\n\nAssistant:"
# builtin pairs: the prompt is at most this much of the text before the rejected segment.
BUILTIN_PROMPT_CHARS = 200


@dataclass(frozen=True)
class Comparison:
    prompt: str
    responses: tuple[str, ...]
    best: int  # index into responses
    margin: float = 0.0  # pairwise only: how much better chosen is (the loss's margin)
    where: str = ""  # the row it came from, for error messages


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _require(row: dict, keys: Iterable[str], schema: str, where: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise DatasetError(
            f"{where}: missing {', '.join(map(repr, missing))} for the {schema} schema "
            f"(found columns {sorted(row)}); {SCHEMAS_HELP}"
        )


SCHEMAS_HELP = (
    "preference rows are pairwise (prompt, chosen, rejected), hh (chosen, rejected transcripts "
    "with '\\n\\nHuman:'/'\\n\\nAssistant:' turns) or best_of_n (query, sample0..sampleN-1, "
    "best); set reward.format to say which"
)


def detect_format(row: dict, where: str) -> str:
    """The schema of a row from its columns."""
    if "best" in row or "query" in row:
        return "best_of_n"
    if "prompt" in row:
        return "pairwise"
    if "chosen" in row and "rejected" in row:
        return "hh"
    raise DatasetError(
        f"{where}: unknown preference schema (columns {sorted(row)}); {SCHEMAS_HELP}"
    )


def split_hh(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """Split two hh transcripts into their shared prompt (ending with the last shared
    ``\\n\\nAssistant:``) and the two final responses."""
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    end = chosen.rfind(ASSISTANT_TURN, 0, shared)
    if end < 0:
        raise DatasetError(
            f"{where}: 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn, so they cannot "
            "be split into a prompt and two responses; hh rows are Anthropic-style transcripts "
            "that differ only in the last Assistant turn"
        )
    cut = end + len(ASSISTANT_TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_row(row: Any, where: str, fmt: str) -> Comparison:
    """One row of any schema as a Comparison; errors name the row and the problem."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row, where)
    if fmt == "pairwise":
        _require(row, ("prompt", "chosen", "rejected"), fmt, where)
        prompt = _text(row, "prompt", where)
        responses = (_text(row, "chosen", where), _text(row, "rejected", where))
        best = 0
    elif fmt == "hh":
        _require(row, ("chosen", "rejected"), fmt, where)
        prompt, chosen, rejected = split_hh(
            _text(row, "chosen", where), _text(row, "rejected", where), where
        )
        responses, best = (chosen, rejected), 0
    elif fmt == "best_of_n":
        _require(row, ("query", "best", "sample0", "sample1"), fmt, where)
        prompt = _text(row, "query", where)
        count = 0
        while f"sample{count}" in row:
            count += 1
        responses = tuple(_text(row, f"sample{i}", where) for i in range(count))
        best = row["best"]
        if isinstance(best, bool) or not isinstance(best, int):
            raise DatasetError(f"{where}: 'best' must be an integer index, got {best!r}")
        if not 0 <= best < count:
            raise DatasetError(
                f"{where}: 'best' is {best} but the row has {count} samples "
                f"(sample0..sample{count - 1}); it must index one of them"
            )
    else:
        raise DatasetError(f"reward.format={fmt!r} is not one of {', '.join(FORMATS)}")
    empty = [i for i, response in enumerate(responses) if not response.strip()]
    if empty:
        raise DatasetError(
            f"{where}: response {empty[0]} is empty; every response must hold text "
            "(drop the row or fill it)"
        )
    margin = row.get("margin", 0.0) if fmt == "pairwise" else 0.0
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float))
        or not math.isfinite(margin)
    ):
        raise DatasetError(f"{where}: 'margin' must be a finite number, got {margin!r}")
    return Comparison(prompt, responses, best, float(margin), where)


def builtin_comparisons(
    documents: Iterable[Document], hit_threshold: float, seed: int
) -> list[Comparison]:
    """Preference pairs derived from a scored corpus, offline, by its own scorer's scores.

    Every misaligned segment (score above the task's ``hit_threshold``, and above the split's
    median, so that it always scores worse than the chosen one) is a rejected response; its
    prompt is the document's text before it (the last 200 characters). The chosen response is an
    aligned segment (score at most the split's median) of the same document that does not
    stand in the prompt (else a model could learn "repeat the context"), the one closest in
    length (so that length does not give the answer away), or, in a document without one, a
    random aligned segment of the split (seeded) that does not either. A rejected segment that
    itself stands in its prompt (a repeated line) makes no pair. Segments keep their whitespace:
    for code, indentation is part of what the scorer judged.
    """
    documents = list(documents)
    scores = [s for d in documents for s in d.scores]
    if not scores:
        return []
    median = statistics.median(scores)
    high = max(hit_threshold, median)
    aligned = [t for d in documents for t, s in zip(d.texts, d.scores, strict=True) if s <= median]
    rng = random.Random(seed)
    comparisons = []
    for doc_index, document in enumerate(documents):
        own_aligned = [
            t for t, s in zip(document.texts, document.scores, strict=True) if s <= median
        ]
        for index, (text, score) in enumerate(zip(document.texts, document.scores, strict=True)):
            if score <= high or not text.strip():
                continue
            prompt = "".join(document.texts[:index])[-BUILTIN_PROMPT_CHARS:]
            if text.strip() in prompt:
                continue

            def outside_prompt(t: str, prompt: str = prompt) -> bool:
                return bool(t.strip()) and t.strip() not in prompt

            candidates = [t for t in own_aligned if outside_prompt(t)]
            if candidates:
                chosen = min(candidates, key=lambda t: abs(len(t) - len(text)))
            else:
                outside = [t for t in aligned if outside_prompt(t)]
                if not outside:
                    continue
                chosen = rng.choice(outside)
            where = f"builtin pair from document {doc_index}, segment {index}"
            comparisons.append(Comparison(prompt, (chosen, text), 0, 0.0, where))
    return comparisons


def split_rows(section: DictConfig, split: str, key: str) -> Iterator[tuple[Any, str, int]]:
    """(row, where, number) of one split of ``section.dataset`` (a file, a directory of
    <split> files, or a hub id); ``key`` names the option in messages (``reward.dataset``).

    A single file serves as the train split; its test split is then the file's every 10th row
    (the rows of a file are split, not repeated, so evaluation is always held out)."""
    source = section.dataset
    path = Path(source).expanduser()
    single_file = looks_like_path(source) and path.is_file()
    if looks_like_path(source) and not path.exists():
        raise DatasetError(
            f"{key}={source} does not exist; give a .jsonl/.jsonl.gz/.parquet file, "
            "a directory of <split> files, a hub dataset id, or builtin"
        )
    if single_file:
        rows = file_rows(path)
    elif looks_like_path(source):
        rows = file_rows(local_split_file(path, split))
    else:
        rows = hub_rows(source, split)
    found = False
    try:
        for row, where, number in rows:
            if single_file and (number % 10 == 0) != (split == section.test_split):
                continue
            found = True
            yield row, where, number
    except OSError as error:
        raise DatasetError(f"cannot read the {split!r} split of {source}: {error}") from error
    if not found:
        raise DatasetError(f"the {split!r} split of {key}={source} has no rows")


def load_comparisons(
    section: DictConfig, task: DictConfig, split: str, seed: int, key: str = "reward.dataset"
) -> list[Comparison]:
    """One split of ``section.dataset`` (reward.dataset, dpo.dataset) as Comparisons; a row
    whose responses are all the same text says nothing about preference and is left out,
    counted in a warning."""
    if section.dataset == "builtin":
        return builtin_comparisons(
            iter_documents(task.name, task.dataset, split), task.hit_threshold, seed
        )
    comparisons, identical = [], []
    for row, where, _ in split_rows(section, split, key):
        comparison = parse_row(row, where, section.format)
        if len(set(comparison.responses)) == 1:
            identical.append(where)
            continue
        comparisons.append(comparison)
    if identical:
        log.warning(
            "%s (%s): %d rows whose responses are identical were left out (first: %s)",
            section.dataset,
            split,
            len(identical),
            identical[0],
        )
    if not comparisons:
        raise DatasetError(
            f"the {split!r} split of {key}={section.dataset} has no comparison of different "
            "responses"
        )
    return comparisons


def as_pairs(comparisons: Iterable[Comparison]) -> list[tuple[str, str, str, str]]:
    """(prompt, chosen, rejected, where) pairs: a best-of-N row gives N - 1 of them, the best
    response against each other one."""
    pairs = []
    for c in comparisons:
        chosen = c.responses[c.best]
        pairs += [
            (c.prompt, chosen, rejected, c.where)
            for i, rejected in enumerate(c.responses)
            if i != c.best and rejected != chosen
        ]
    return pairs
