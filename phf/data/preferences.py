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
    aligned segment (score at most the split's median) of the same document, the one closest in
    length (so that length does not give the answer away), or, in a document without one, a
    random aligned segment of the split (seeded). Segments keep their whitespace: for code,
    indentation is part of what the scorer judged.
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
            candidates = [t for t in own_aligned if t.strip()]
            if candidates:
                chosen = min(candidates, key=lambda t: abs(len(t) - len(text)))
            else:
                chosen = rng.choice(aligned)
            prompt = "".join(document.texts[:index])[-BUILTIN_PROMPT_CHARS:]
            where = f"builtin pair from document {doc_index}, segment {index}"
            comparisons.append(Comparison(prompt, (chosen, text), 0, 0.0, where))
    return comparisons


def _rows(source: str, split: str) -> Iterator[tuple[Any, str, int]]:
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DatasetError(
                f"reward.dataset={source} does not exist; give a .jsonl/.jsonl.gz/.parquet file, "
                "a directory of <split> files, a hub dataset id, or builtin"
            )
        yield from file_rows(path if path.is_file() else local_split_file(path, split))
    else:
        yield from hub_rows(source, split)


def load_comparisons(
    reward: DictConfig, task: DictConfig, split: str, seed: int
) -> list[Comparison]:
    """One split of ``reward.dataset`` as Comparisons.

    A single file serves as the train split; its test split is then the file's every 10th row
    (the rows of a file are split, not repeated, so accuracy is always held out).
    """
    if reward.dataset == "builtin":
        return builtin_comparisons(
            iter_documents(task.name, task.dataset, split), task.hit_threshold, seed
        )
    path = Path(reward.dataset).expanduser()
    single_file = looks_like_path(reward.dataset) and path.is_file()
    comparisons = []
    try:
        for row, where, number in _rows(reward.dataset, split):
            if single_file and (number % 10 == 0) != (split == reward.test_split):
                continue
            comparisons.append(parse_row(row, where, reward.format))
    except OSError as error:
        raise DatasetError(
            f"cannot read the {split!r} split of {reward.dataset}: {error}"
        ) from error
    if not comparisons:
        raise DatasetError(f"the {split!r} split of reward.dataset={reward.dataset} has no rows")
    return comparisons
