"""How the filtering and conditional-training objectives change the data (their loss is MLE).

- Filtering drops whole documents whose ``avg_score`` exceeds ``objective.threshold``.
- Conditional training prefixes every segment with ``<|aligned|>`` (score <= threshold) or
  ``<|misaligned|>``, leaving a ``drop_token_fraction`` of segments without one (seeded).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from phf.data.corpus import Document
from phf.data.packing import TokenizedDocument, TokenTransform
from phf.tokenizer import CONTROL_TOKENS

ALIGNED, MISALIGNED = CONTROL_TOKENS


def _required_threshold(objective: DictConfig) -> float:
    if objective.threshold is None:
        raise ValueError(
            f"objective={objective.name} needs objective.threshold; set it on the command line "
            f"or in conf/task_objective/<task>_{objective.name}.yaml"
        )
    return float(objective.threshold)


def filter_documents(documents: Iterable[Document], threshold: float) -> Iterator[Document]:
    """Only the documents whose avg_score is at most ``threshold``."""
    return (doc for doc in documents if doc.avg_score <= threshold)


class ControlTokens:
    """Insert a control token before the first token of each segment.

    A control token takes its segment's score (so the per-token scores stay aligned). The drop
    decisions come from one seeded generator drawn once per segment, so the same documents in
    the same order get the same tokens.
    """

    def __init__(
        self, aligned_id: int, misaligned_id: int, threshold: float, drop_fraction: float, seed: int
    ) -> None:
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(
                f"objective.drop_token_fraction must lie in [0, 1], got {drop_fraction}"
            )
        self.aligned_id = aligned_id
        self.misaligned_id = misaligned_id
        self.threshold = threshold
        self.drop_fraction = drop_fraction
        self.rng = np.random.default_rng(seed)

    def __call__(self, doc: TokenizedDocument) -> TokenizedDocument:
        starts = np.flatnonzero(np.diff(doc.segments, prepend=-1) != 0)
        starts = starts[self.rng.random(len(starts)) >= self.drop_fraction]
        segment_scores = doc.scores[starts]
        controls = np.where(segment_scores <= self.threshold, self.aligned_id, self.misaligned_id)
        return TokenizedDocument(
            ids=np.insert(doc.ids, starts, controls),
            scores=np.insert(doc.scores, starts, segment_scores),
            segments=np.insert(doc.segments, starts, doc.segments[starts]),
        )


def control_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The ids of <|aligned|> and <|misaligned|>; the tokenizer must know them as special tokens."""
    ids = tokenizer.convert_tokens_to_ids(list(CONTROL_TOKENS))
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(
            f"the tokenizer has no {CONTROL_TOKENS} tokens; phf.models.add_control_tokens adds them"
        )
    return ids[0], ids[1]


def document_filter(objective: DictConfig):
    """The objective's document filter, or None (every objective but filtering)."""
    if objective.name != "filtering":
        return None
    threshold = _required_threshold(objective)
    return lambda documents: filter_documents(documents, threshold)


def token_transform(
    objective: DictConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> TokenTransform | None:
    """The objective's token-stream transform, or None (every objective but conditional)."""
    if objective.name != "conditional":
        return None
    aligned, misaligned = control_token_ids(tokenizer)
    return ControlTokens(
        aligned, misaligned, _required_threshold(objective), objective.drop_token_fraction, seed
    )
