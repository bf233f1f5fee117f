"""Tokenize documents and pack them into fixed-length blocks that carry a score per token.

Each document is tokenized whole (so merges across segment boundaries are the tokenizer's natural
ones) and every token takes the score of the segment that holds its last character; the EOS
token that ends the document takes the score of the document's last segment. Blocks are cut
from the concatenated stream, so a block may span documents: the EOS between them marks the
boundary, as in GPT-2 pretraining.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from phf.data.corpus import Document

TOKENIZE_CHUNK = 64  # documents per tokenizer call: batching is ~5x faster than one at a time


@dataclass
class Block:
    input_ids: list[int]
    token_scores: list[float]


@dataclass
class TokenizedDocument:
    ids: np.ndarray  # int64 token ids, EOS last
    scores: np.ndarray  # float32, the score of each token's segment
    segments: np.ndarray  # int64, the index of each token's segment (EOS: the last one)


# A per-document change of the token stream, e.g. conditional training's control tokens.
TokenTransform = Callable[[TokenizedDocument], TokenizedDocument]


def tokenize_documents(
    documents: list[Document], tokenizer: PreTrainedTokenizerBase
) -> list[TokenizedDocument]:
    """Token ids (EOS appended), per-token scores and segment indices for each document."""
    encoded = tokenizer(
        [doc.text for doc in documents],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        # Whole documents may exceed model_max_length; packing cuts them into blocks, so the
        # tokenizer's "sequence too long" warning would be noise.
        verbose=False,
    )
    out = []
    for doc, ids, offsets in zip(
        documents, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        segment_ends = np.cumsum([len(t) for t in doc.texts])
        scores = np.asarray(doc.scores, dtype=np.float32)
        # The segment holding a token's last character (end offset - 1).
        last_chars = np.asarray([max(end - 1, start) for start, end in offsets], dtype=np.int64)
        segment_index = np.searchsorted(segment_ends, last_chars, side="right")
        segment_index = np.minimum(segment_index, len(scores) - 1).astype(np.int64)
        segment_index = np.append(segment_index, len(scores) - 1)  # EOS: the last segment
        out.append(
            TokenizedDocument(
                ids=np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int64),
                scores=scores[segment_index],
                segments=segment_index,
            )
        )
    return out


def pack_blocks(
    documents: Iterable[Document],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    transform: TokenTransform | None = None,
) -> Iterator[Block]:
    """Pack a stream of documents into blocks of exactly ``block_size`` tokens, applying
    ``transform`` to each tokenized document first.

    The tail shorter than a block is dropped at the end of the stream.
    """
    ids_buffer: list[np.ndarray] = []
    scores_buffer: list[np.ndarray] = []
    buffered = 0
    doc_iter = iter(documents)
    while chunk := list(islice(doc_iter, TOKENIZE_CHUNK)):
        for doc in tokenize_documents([d for d in chunk if d.texts], tokenizer):
            if transform is not None:
                doc = transform(doc)
            ids_buffer.append(doc.ids)
            scores_buffer.append(doc.scores)
            buffered += len(doc.ids)
        if buffered < block_size:
            continue
        all_ids = np.concatenate(ids_buffer)
        all_scores = np.concatenate(scores_buffer)
        n_full = len(all_ids) // block_size * block_size
        for start in range(0, n_full, block_size):
            yield Block(
                all_ids[start : start + block_size].tolist(),
                all_scores[start : start + block_size].tolist(),
            )
        ids_buffer, scores_buffer = [all_ids[n_full:]], [all_scores[n_full:]]
        buffered = len(all_ids) - n_full


def shuffled(items: Iterable[Document], buffer_size: int, rng: random.Random) -> Iterator[Document]:
    """A streaming shuffle: draw uniformly from a buffer of ``buffer_size`` items."""
    buffer: list[Document] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def training_blocks(
    open_documents: Callable[[], Iterable[Document]],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    shuffle_buffer: int,
    seed: int,
    transform: TokenTransform | None = None,
) -> Iterator[Block]:
    """Endless blocks: each pass over the documents is reshuffled with a seed derived per epoch."""
    epoch = 0
    while True:
        rng = random.Random(seed * 100_003 + epoch)
        documents = shuffled(open_documents(), shuffle_buffer, rng)
        produced = 0
        for block in pack_blocks(documents, tokenizer, block_size, transform):
            produced += 1
            yield block
        if produced == 0:
            raise ValueError(
                f"the training split holds fewer than block_size={block_size} tokens; "
                "lower train.block_size or use a larger dataset"
            )
        epoch += 1


def collate(blocks: list[Block]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([b.input_ids for b in blocks], dtype=torch.long),
        "token_scores": torch.tensor([b.token_scores for b in blocks], dtype=torch.float32),
    }


def batches(blocks: Iterator[Block], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group blocks into tensors of ``batch_size`` sequences (the last partial batch is kept)."""
    while chunk := list(islice(blocks, batch_size)):
        yield collate(chunk)
