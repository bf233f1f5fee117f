"""Packing: exact block boundaries, EOS between documents, per-token scores aligned with tokens."""

from __future__ import annotations

import itertools
import random

import pytest

from phf.data.corpus import Document
from phf.data.packing import batches, pack_blocks, shuffled, tokenize_documents, training_blocks
from phf.data.segment import split_lines, split_sentences
from phf.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def test_segments_concatenate_back_to_the_document() -> None:
    text = 'He said "stop!" Then he left.\n\nA new paragraph? Yes. Trailing words'
    segments = split_sentences(text)
    assert "".join(segments) == text
    assert segments[0] == 'He said "stop!" '
    assert segments[-1] == "Trailing words"
    assert len(segments) == 5
    code = "def f():\n    return 1\n"
    assert split_lines(code) == ["def f():\n", "    return 1\n"]


def test_every_token_takes_the_score_of_its_segment(tokenizer) -> None:
    doc = Document(
        texts=["Clean words here. ", "Bad words there. ", "Fine again."], scores=[0.0, 1.0, 0.25]
    )
    [tokenized] = tokenize_documents([doc], tokenizer)
    ids, scores = tokenized.ids, tokenized.scores
    assert tokenized.segments.tolist()[-1] == 2 and tokenized.segments[0] == 0
    assert ids[-1] == tokenizer.eos_token_id and scores[-1] == 0.25
    # Decode the tokens of each score back: they reproduce each segment (whitespace moves with
    # the token that carries it, so compare stripped text).
    by_score = {}
    for token_id, score in zip(ids[:-1], scores[:-1], strict=True):
        by_score.setdefault(float(score), []).append(int(token_id))
    assert tokenizer.decode(by_score[0.0]).strip() == "Clean words here."
    assert tokenizer.decode(by_score[1.0]).strip() == "Bad words there."
    assert tokenizer.decode(by_score[0.25]).strip() == "Fine again."
    assert tokenizer.decode(ids[:-1].tolist()) == doc.text


def test_blocks_have_exact_size_and_cover_the_stream_in_order(tokenizer) -> None:
    docs = [
        Document(texts=[f"Document number {i} says hello. ", "It ends here."], scores=[i / 10, 0.5])
        for i in range(10)
    ]
    expected = [
        pair
        for doc in tokenize_documents(docs, tokenizer)
        for pair in zip(doc.ids, doc.scores, strict=True)
    ]
    blocks = list(pack_blocks(docs, tokenizer, block_size=16))
    assert blocks and all(len(b.input_ids) == 16 == len(b.token_scores) for b in blocks)
    assert len(blocks) == len(expected) // 16  # the short tail is dropped
    flat = [(i, s) for b in blocks for i, s in zip(b.input_ids, b.token_scores, strict=True)]
    assert [i for i, _ in flat] == [int(i) for i, _ in expected[: len(flat)]]
    assert [s for _, s in flat] == pytest.approx([float(s) for _, s in expected[: len(flat)]])
    # EOS separates documents inside a block.
    assert tokenizer.eos_token_id in blocks[0].input_ids


def test_empty_documents_are_skipped(tokenizer) -> None:
    docs = [Document(texts=[], scores=[]), Document(texts=["Some text here. " * 8], scores=[0.1])]
    blocks = list(pack_blocks(docs, tokenizer, block_size=8))
    assert blocks and all(s == pytest.approx(0.1) for b in blocks for s in b.token_scores)


def test_shuffle_is_seeded_and_a_permutation() -> None:
    items = list(range(100))
    first = list(shuffled(items, 10, random.Random(3)))
    assert sorted(first) == items and first != items
    assert list(shuffled(items, 10, random.Random(3))) == first
    assert list(shuffled(items, 10, random.Random(4))) != first


def test_training_blocks_repeat_epochs_with_a_new_order(tokenizer) -> None:
    docs = [Document(texts=[f"Sentence {i} is short. "], scores=[0.0]) for i in range(40)]
    stream = training_blocks(lambda: iter(docs), tokenizer, block_size=8, shuffle_buffer=8, seed=0)
    per_epoch = len(list(pack_blocks(docs, tokenizer, 8)))
    taken = list(itertools.islice(stream, 3 * per_epoch))
    assert len(taken) == 3 * per_epoch
    assert [b.input_ids for b in taken[:per_epoch]] != [
        b.input_ids for b in taken[per_epoch : 2 * per_epoch]
    ]


def test_too_little_data_for_one_block_is_an_error(tokenizer) -> None:
    docs = [Document(texts=["Hi."], scores=[0.0])]
    stream = training_blocks(
        lambda: iter(docs), tokenizer, block_size=512, shuffle_buffer=8, seed=0
    )
    with pytest.raises(ValueError, match="block_size=512"):
        next(stream)


def test_batches_are_tensors_of_the_right_shape(tokenizer) -> None:
    docs = [Document(texts=["Some words to pack into blocks. " * 20], scores=[0.3])]
    blocks = list(pack_blocks(docs, tokenizer, block_size=8))
    first = next(batches(iter(blocks), 4))
    assert first["input_ids"].shape == (4, 8) and first["token_scores"].shape == (4, 8)
