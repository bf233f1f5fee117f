"""Training blocks cut from a token store with random access: block k of epoch e, in O(block).

The semantics are those of packing a stream: each epoch shuffles the documents (a seeded
permutation per epoch) and concatenates them, documents separated by their EOS; blocks of
``block_size`` tokens are cut from that stream (a block may span documents; the tail shorter
than a block is dropped at each epoch's end), and every token carries its segment's score. The
objective changes the stream, not the store:

- filtering keeps the documents whose ``avg_score`` is at most ``objective.threshold``: an
  index over documents;
- conditional training puts ``<|aligned|>`` (segment score <= threshold) or ``<|misaligned|>``
  before the first token of each segment, except a ``drop_token_fraction`` of them chosen by a
  seeded hash of the segment (the same segments in every epoch); a control token takes its
  segment's score.

Because every block is a pure function of (seed, epoch, position), a resumed run reads exactly
the blocks it would have, without replaying anything, and DataLoader workers can build batches
in any order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from phf.data.store import TokenStore, reset_signals
from phf.tokenizer import CONTROL_TOKENS

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed hash of uint64 values (SplitMix64's finaliser), vectorised."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def unit_hash(seed: int, indices: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per index, fixed by ``seed``."""
    keyed = indices.astype(np.uint64) ^ _splitmix64(np.asarray([seed], dtype=np.uint64))
    return (_splitmix64(keyed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class ControlTokens:
    """Conditional training's control tokens: which id goes before which segment."""

    aligned_id: int
    misaligned_id: int
    threshold: float
    drop_fraction: float


class PackedBlocks:
    """The packed stream of a store's documents under an objective (see the module docstring).

    ``shuffle=False`` keeps the stored order in every epoch.
    """

    def __init__(
        self,
        store: TokenStore,
        block_size: int,
        seed: int,
        max_avg_score: float | None = None,
        controls: ControlTokens | None = None,
        shuffle: bool = True,
    ) -> None:
        self.store = store
        self.block_size = block_size
        self.seed = seed
        self.shuffle = shuffle
        self.controls = controls
        documents = np.arange(store.num_documents)
        if max_avg_score is not None:
            documents = documents[store.avg_scores <= max_avg_score]
        self.documents = documents
        lengths = store.document_lengths()
        if controls is not None:
            kept = unit_hash(seed, np.arange(len(store.segment_starts))) >= controls.drop_fraction
            self.kept_segments = kept
            per_document = np.add.reduceat(
                np.append(kept, False).astype(np.int64), store.segment_offsets[:-1]
            )
            # reduceat of an empty range gives the next element: documents without segments
            per_document[np.diff(store.segment_offsets) == 0] = 0
            lengths = lengths + per_document
        self.lengths = lengths
        self.tokens_per_epoch = int(lengths[documents].sum())
        self.blocks_per_epoch = self.tokens_per_epoch // block_size
        if self.blocks_per_epoch == 0:
            raise ValueError(
                f"the training split holds {self.tokens_per_epoch} tokens, fewer than "
                f"block_size={block_size}; lower train.block_size or use a larger dataset"
            )
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end of each document in the epoch's stream), cached per epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.documents)
            else:
                order = self.documents
            self._epoch = (epoch, order, np.cumsum(self.lengths[order]))
        return self._epoch[1], self._epoch[2]

    def _document_piece(self, document: int, low: int, high: int) -> tuple[np.ndarray, ...]:
        """Positions [low, high) of ``document`` as it appears in the stream (its control
        tokens inserted), as int64 ids and float32 scores."""
        store = self.store
        begin = int(store.doc_offsets[document])
        if self.controls is None:
            return store.span(begin + low, begin + high)
        first, last = store.segment_offsets[document], store.segment_offsets[document + 1]
        kept = self.kept_segments[first:last]
        starts = store.segment_starts[first:last][kept] - begin  # within the document
        segment_scores = store.segment_scores[first:last][kept]
        # Control j sits at stream position starts[j] + j: positions before ``low`` hold
        # n_low controls and low - n_low of the document's own tokens.
        control_positions = starts + np.arange(len(starts))
        n_low = int(np.searchsorted(control_positions, low, side="left"))
        n_high = int(np.searchsorted(control_positions, high, side="left"))
        own_low, own_high = low - n_low, high - n_high
        ids, scores = store.span(begin + own_low, begin + own_high)
        if n_high > n_low:
            where = starts[n_low:n_high] - own_low
            piece_scores = segment_scores[n_low:n_high]
            c = self.controls
            control_ids = np.where(piece_scores <= c.threshold, c.aligned_id, c.misaligned_id)
            ids = np.insert(ids, where, control_ids)
            scores = np.insert(scores, where, piece_scores)
        return ids, scores

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``index`` of the endless stream (epoch = index // blocks_per_epoch)."""
        epoch, within = divmod(index, self.blocks_per_epoch)
        order, ends = self._plan(epoch)
        low = within * self.block_size
        high = low + self.block_size
        first = int(np.searchsorted(ends, low, side="right"))
        last = int(np.searchsorted(ends, high - 1, side="right"))
        ids, scores = [], []
        for position in range(first, last + 1):
            start = int(ends[position - 1]) if position else 0
            document = int(order[position])
            piece = self._document_piece(
                document, max(low, start) - start, min(high, int(ends[position])) - start
            )
            ids.append(piece[0])
            scores.append(piece[1])
        return np.concatenate(ids), np.concatenate(scores)

    def batch(self, first_block: int, count: int) -> dict[str, torch.Tensor]:
        """``count`` consecutive blocks as tensors: input_ids int64, token_scores float32."""
        blocks = [self.block(first_block + i) for i in range(count)]
        return {
            "input_ids": torch.from_numpy(np.stack([b[0] for b in blocks])),
            "token_scores": torch.from_numpy(np.stack([b[1] for b in blocks]).astype(np.float32)),
        }

    def heldout(self, max_blocks: int) -> torch.Tensor:
        """The first ``max_blocks`` blocks of one pass, as input ids [n, block_size]."""
        count = min(max_blocks, self.blocks_per_epoch)
        if count == 0:
            return torch.zeros((0, self.block_size), dtype=torch.long)
        return self.batch(0, count)["input_ids"]


class StepBatches(torch.utils.data.Dataset):
    """Batch number ``step`` (0-based) of a run: blocks [step * batch_size, ...)."""

    def __init__(self, blocks: PackedBlocks, batch_size: int) -> None:
        self.blocks = blocks
        self.batch_size = batch_size

    def __len__(self) -> int:
        return 1 << 62  # endless: the sampler decides which steps are drawn

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.blocks.batch(step * self.batch_size, self.batch_size)


def _worker_init(worker_id: int) -> None:
    reset_signals()


def training_batches(
    blocks: PackedBlocks,
    batch_size: int,
    first_step: int,
    last_step: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of steps first_step .. last_step - 1, built in ``workers`` DataLoader
    processes (0: in this one), pinned for a faster copy to the GPU when asked."""
    loader = torch.utils.data.DataLoader(
        StepBatches(blocks, batch_size),
        batch_size=None,
        sampler=range(first_step, max(first_step, last_step)),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=_worker_init if workers else None,
    )
    return iter(loader)


# ------------------------------------------------------------------- objectives' streams


def required_threshold(objective: DictConfig) -> float:
    if objective.threshold is None:
        raise ValueError(
            f"objective={objective.name} needs objective.threshold; set it on the command line "
            f"or in conf/task_objective/<task>_{objective.name}.yaml"
        )
    return float(objective.threshold)


def control_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The ids of <|aligned|> and <|misaligned|>; the tokenizer must know them as special tokens."""
    ids = tokenizer.convert_tokens_to_ids(list(CONTROL_TOKENS))
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(
            f"the tokenizer has no {CONTROL_TOKENS} tokens; phf.models.add_control_tokens adds them"
        )
    return ids[0], ids[1]


def objective_blocks(
    objective: DictConfig,
    store: TokenStore,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    seed: int,
    heldout: bool = False,
) -> PackedBlocks:
    """The blocks an objective trains on (filtering drops documents, conditional training adds
    control tokens); ``heldout``: the test split's blocks, unfiltered, with every segment's
    control token (the model's own input format for its held-out loss), the documents shuffled
    by ``seed``."""
    max_avg_score, controls = None, None
    if objective.name == "filtering" and not heldout:
        max_avg_score = required_threshold(objective)
    if objective.name == "conditional":
        aligned, misaligned = control_token_ids(tokenizer)
        drop = 0.0 if heldout else float(objective.drop_token_fraction)
        controls = ControlTokens(aligned, misaligned, required_threshold(objective), drop)
    return PackedBlocks(store, block_size, seed, max_avg_score, controls)
