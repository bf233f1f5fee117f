"""Prompts for evaluation scenarios."""

from __future__ import annotations

import re
from itertools import cycle, islice
from pathlib import Path

from omegaconf import DictConfig

from phf.data.corpus import DatasetError, iter_documents

# A complete one-line function signature: `def name(args):` or `def name(args) -> T:`.
_SIGNATURE = re.compile(r"^\s*(?:async\s+)?def\s+\w+\(.*\)\s*(?:->\s*[^:]+)?:\s*$")


def function_signatures(task: DictConfig, limit: int) -> list[str]:
    """Up to ``limit`` distinct one-line ``def`` signatures from the task's test split, dedented,
    each ending in a newline so that the model continues with the body."""
    seen: dict[str, None] = {}
    for document in iter_documents(task.name, task.dataset, task.test_split):
        for line in document.text.splitlines():
            if _SIGNATURE.match(line):
                seen.setdefault(line.strip() + "\n")
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def misaligned_prefixes(task: DictConfig, limit: int) -> list[str]:
    """Up to ``limit`` distinct openings of the test split's misaligned segments (score above
    task.hit_threshold): the first half of their words, at most 8, from segments of at least 4
    words. An offline stand-in for "challenging" prompts such as RealToxicityPrompts'."""
    seen: dict[str, None] = {}
    for document in iter_documents(task.name, task.dataset, task.test_split):
        for text, score in zip(document.texts, document.scores, strict=True):
            words = text.split()
            if score > task.hit_threshold and len(words) >= 4:
                seen.setdefault(" ".join(words[: min(8, len(words) // 2)]))
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def scenario_prompts(scenario: DictConfig, task: DictConfig, num_samples: int) -> list[str]:
    """``num_samples`` prompts for one scenario (cycling when there are fewer distinct ones)."""
    if scenario.prompts == "none":
        return [""] * num_samples
    if scenario.prompts in ("function_signatures", "misaligned_prefixes"):
        find = (
            function_signatures
            if scenario.prompts == "function_signatures"
            else misaligned_prefixes
        )
        prompts = find(task, num_samples)
        where = f"the {task.test_split!r} split of task {task.name!r}"
    else:
        path = Path(scenario.prompts).expanduser()
        if not path.is_file():
            raise DatasetError(
                f"prompt file {path} does not exist; a scenario's prompts are none, "
                "function_signatures, misaligned_prefixes, or a text file with one prompt per line"
            )
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = str(path)
    if not prompts:
        raise DatasetError(
            f"no {scenario.prompts} prompts found in {where}; drop the scenario "
            "(~task.scenarios.<name>) or, for misaligned_prefixes, lower task.hit_threshold"
        )
    return list(islice(cycle(prompts), num_samples))
