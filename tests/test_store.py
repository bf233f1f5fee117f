"""Token stores and the blocks cut from them: exactly the tokens and scores that tokenizing the
documents gives, filtering and conditional training's control tokens from the stored metadata,
random access equal to reading the stream in order, stale and partial stores, and a preparation
killed mid-way that resumes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from phf.data.blocks import ControlTokens, PackedBlocks, control_token_ids, unit_hash
from phf.data.corpus import DatasetError, Document, split_source
from phf.data.segment import split_lines, split_sentences
from phf.data.store import StoreError, TokenStore, ensure_store, tokenize_documents
from phf.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def write_split(directory: Path, rows: list[dict], split: str = "train") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def store_of(tmp_path: Path, rows: list[dict], tokenizer, **kwargs) -> TokenStore:
    data = tmp_path / "data"
    write_split(data, rows)
    return ensure_store(
        split_source("x", str(data), "train"), tokenizer, tmp_path / "cache", **kwargs
    )


def row(texts: list[str], scores: list[float], **extra) -> dict:
    return {"texts": texts, "scores": scores, **extra}


CORPUS = [
    row(["Clean words here. ", "Bad words there. ", "Fine again."], [0.0, 1.0, 0.25]),
    row(["A second document. ", "It ends."], [0.5, 0.1], avg_score=0.9),
    row(["Third one, short."], [0.0]),
]


def test_segments_concatenate_back_to_the_document() -> None:
    text = 'He said "stop!" Then he left.\n\nA new paragraph? Yes. Trailing words'
    segments = split_sentences(text)
    assert "".join(segments) == text
    assert segments[0] == 'He said "stop!" ' and segments[-1] == "Trailing words"
    assert len(segments) == 5
    assert split_lines("def f():\n    return 1\n") == ["def f():\n", "    return 1\n"]


def test_every_token_takes_the_score_of_its_segment(tokenizer) -> None:
    doc = Document(
        texts=["Clean words here. ", "Bad words there. ", "Fine again."], scores=[0.0, 1.0, 0.25]
    )
    [tokenized] = tokenize_documents([doc], tokenizer)
    ids, scores = tokenized.ids, tokenized.scores
    assert tokenized.segments.tolist()[-1] == 2 and tokenized.segments[0] == 0
    assert ids[-1] == tokenizer.eos_token_id and scores[-1] == 0.25
    by_score: dict[float, list[int]] = {}
    for token_id, score in zip(ids[:-1], scores[:-1], strict=True):
        by_score.setdefault(float(score), []).append(int(token_id))
    # Whitespace moves with the token that carries it: compare stripped text.
    assert tokenizer.decode(by_score[0.0]).strip() == "Clean words here."
    assert tokenizer.decode(by_score[1.0]).strip() == "Bad words there."
    assert tokenizer.decode(by_score[0.25]).strip() == "Fine again."
    assert tokenizer.decode(ids[:-1].tolist()) == doc.text


def test_special_token_strings_in_documents_are_text(tokenizer) -> None:
    [tokenized] = tokenize_documents(
        [Document(["say <|aligned|> <|endoftext|>"], [0.0])], tokenizer
    )
    aligned, _ = control_token_ids(tokenizer)
    assert aligned not in tokenized.ids.tolist()
    assert tokenized.ids.tolist().count(tokenizer.eos_token_id) == 1  # only the one appended


def test_the_store_holds_exactly_the_tokenized_documents(tmp_path: Path, tokenizer) -> None:
    store = store_of(tmp_path, CORPUS, tokenizer)
    documents = [Document(r["texts"], r["scores"], r.get("avg_score")) for r in CORPUS]
    expected = tokenize_documents(documents, tokenizer)
    assert store.num_documents == 3
    assert store.num_tokens == sum(len(d.ids) for d in expected)
    for index, doc in enumerate(expected):
        start, end = store.doc_offsets[index], store.doc_offsets[index + 1]
        ids, scores = store.span(int(start), int(end))
        assert ids.tolist() == doc.ids.tolist()
        assert scores.tolist() == doc.scores.tolist()
        first, last = store.segment_offsets[index], store.segment_offsets[index + 1]
        assert (store.segment_starts[first:last] - start).tolist() == doc.segment_starts.tolist()
    # The row's own avg_score wins; otherwise the mean of the segments' scores.
    assert store.avg_scores.tolist() == pytest.approx([1.25 / 3, 0.9, 0.0])
    assert store.shard_tokens[0].dtype == np.uint16  # an 8,192-token vocabulary


def test_blocks_in_order_are_the_stream_cut_into_block_size(tmp_path: Path, tokenizer) -> None:
    rows = [
        row([f"Document number {i} says hello. ", "It ends here."], [i / 10, 0.5])
        for i in range(10)
    ]
    store = store_of(tmp_path, rows, tokenizer)
    documents = [Document(r["texts"], r["scores"]) for r in rows]
    stream = tokenize_documents(documents, tokenizer)
    ids = np.concatenate([d.ids for d in stream])
    scores = np.concatenate([d.scores for d in stream])
    blocks = PackedBlocks(store, 16, seed=0, shuffle=False)
    assert blocks.blocks_per_epoch == len(ids) // 16  # the short tail is dropped
    got = [blocks.block(i) for i in range(blocks.blocks_per_epoch)]
    assert all(len(b[0]) == 16 == len(b[1]) for b in got)
    flat_ids = np.concatenate([b[0] for b in got])
    assert flat_ids.tolist() == ids[: len(flat_ids)].tolist()
    assert np.concatenate([b[1] for b in got]).tolist() == scores[: len(flat_ids)].tolist()
    assert tokenizer.eos_token_id in got[0][0].tolist()  # EOS separates documents in a block


def test_filtering_is_an_index_over_documents(tmp_path: Path, tokenizer) -> None:
    store = store_of(tmp_path, CORPUS, tokenizer)
    blocks = PackedBlocks(store, 4, seed=0, max_avg_score=0.5, shuffle=False)
    assert blocks.documents.tolist() == [0, 2]  # avg 0.42 and 0.0 kept, the row's 0.9 dropped
    lengths = store.document_lengths()
    assert blocks.tokens_per_epoch == lengths[0] + lengths[2]


def test_control_tokens_go_before_each_segment_with_its_score(tmp_path: Path, tokenizer) -> None:
    store = store_of(tmp_path, CORPUS[:1], tokenizer)
    aligned, misaligned = control_token_ids(tokenizer)
    controls = ControlTokens(aligned, misaligned, threshold=0.5, drop_fraction=0.0)
    blocks = PackedBlocks(store, 1, seed=0, controls=controls, shuffle=False)
    [doc] = tokenize_documents([Document(CORPUS[0]["texts"], CORPUS[0]["scores"])], tokenizer)
    starts = doc.segment_starts.tolist()
    expected_ids = doc.ids.tolist()
    expected_scores = doc.scores.tolist()
    for offset, start in enumerate(starts):  # inserting before each start shifts the rest
        control = aligned if doc.scores[start] <= 0.5 else misaligned
        expected_ids.insert(start + offset, control)
        expected_scores.insert(start + offset, float(doc.scores[start]))
    got = [blocks.block(i) for i in range(blocks.blocks_per_epoch)]
    assert [int(b[0][0]) for b in got] == expected_ids
    assert [float(b[1][0]) for b in got] == pytest.approx(expected_scores)
    assert expected_ids[0] == aligned and misaligned in expected_ids
    assert blocks.tokens_per_epoch == len(doc.ids) + 3  # three segments, three controls


def test_control_tokens_are_dropped_at_the_seeded_rate(tmp_path: Path, tokenizer) -> None:
    rows = [row([f"Sentence {i}. " for i in range(100)], [0.0] * 100) for _ in range(10)]
    store = store_of(tmp_path, rows, tokenizer)
    aligned, misaligned = control_token_ids(tokenizer)

    def control_count(seed: int, fraction: float) -> int:
        controls = ControlTokens(aligned, misaligned, 0.5, drop_fraction=fraction)
        blocks = PackedBlocks(store, 64, seed=seed, controls=controls, shuffle=False)
        return int(
            sum((blocks.block(i)[0] == aligned).sum() for i in range(blocks.blocks_per_epoch))
        )

    segments = len(store.segment_starts)
    kept = control_count(1, 0.3)
    assert 0.6 * segments < kept < 0.8 * segments  # ~70% keep their token
    assert kept == control_count(1, 0.3) and kept != control_count(2, 0.3)
    assert control_count(1, 1.0) == 0
    assert unit_hash(1, np.arange(5)).tolist() == unit_hash(1, np.arange(5)).tolist()


def test_random_access_equals_the_stream_and_epochs_reshuffle(tmp_path: Path, tokenizer) -> None:
    rows = [row([f"Sentence {i} is short. "], [0.0]) for i in range(40)]
    store = store_of(tmp_path, rows, tokenizer)
    blocks = PackedBlocks(store, 8, seed=3)
    per_epoch = blocks.blocks_per_epoch
    in_order = [blocks.block(i)[0].tolist() for i in range(3 * per_epoch)]
    backwards = [
        PackedBlocks(store, 8, seed=3).block(i)[0].tolist() for i in reversed(range(3 * per_epoch))
    ]
    assert in_order == backwards[::-1]
    assert in_order[:per_epoch] != in_order[per_epoch : 2 * per_epoch]  # a new order per epoch
    assert [
        PackedBlocks(store, 8, seed=4).block(i)[0].tolist() for i in range(per_epoch)
    ] != in_order[:per_epoch]
    batch = blocks.batch(0, 4)
    assert batch["input_ids"].shape == (4, 8) and batch["token_scores"].dtype.is_floating_point


def test_too_little_data_for_one_block_is_an_error(tmp_path: Path, tokenizer) -> None:
    store = store_of(tmp_path, [row(["Hi."], [0.0])], tokenizer)
    with pytest.raises(ValueError, match="block_size=512"):
        PackedBlocks(store, 512, seed=0)


def test_empty_documents_are_skipped_and_counted(tmp_path: Path, tokenizer, caplog) -> None:
    # 64 empty documents in a row crashed the tokenizer once (a call with no texts).
    rows = [row([], [])] * 64 + [row([""], [0.0])] + [row(["Some text here. " * 8], [0.1])]
    store = store_of(tmp_path, rows, tokenizer)
    assert store.num_documents == 1
    assert "65 of 66 documents have no text and were skipped" in caplog.text


def test_a_bad_row_is_named_with_its_row_number(tmp_path: Path, tokenizer) -> None:
    data = tmp_path / "data"
    path = write_split(data, [row(["fine. "], [0.0])] * 4)
    with open(path, "ab") as f:
        f.write(b'{"texts": ["caf\xe9"], "scores": [0.0]}\n')  # latin-1, not UTF-8
    with pytest.raises(DatasetError, match=r"train.jsonl, row 5: not UTF-8"):
        ensure_store(split_source("x", str(data), "train"), tokenizer, tmp_path / "cache")


def test_a_changed_source_makes_the_store_stale(tmp_path: Path, tokenizer, caplog) -> None:
    data = tmp_path / "data"
    path = write_split(data, CORPUS)
    source = split_source("x", str(data), "train")
    caplog.set_level("INFO", logger="phf.data.store")
    first = ensure_store(source, tokenizer, tmp_path / "cache")
    again = ensure_store(source, tokenizer, tmp_path / "cache")  # current: opened, not rebuilt
    assert again.directory == first.directory
    assert caplog.text.count("preparing the token store") == 1
    path.write_text("".join(json.dumps(r) + "\n" for r in CORPUS[:2]))  # new content
    changed = ensure_store(source, tokenizer, tmp_path / "cache")
    assert "changed since its store" in caplog.text
    assert changed.num_documents == 2 and changed.directory == first.directory


def test_a_damaged_store_is_refused(tmp_path: Path, tokenizer) -> None:
    store = store_of(tmp_path, CORPUS, tokenizer)
    tokens = store.directory / "shards" / "shard_00000" / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(StoreError, match="missing or truncated"):
        TokenStore.open(store.directory)


@pytest.mark.slow
def test_a_preparation_killed_midway_resumes(tmp_path: Path, tokenizer) -> None:
    """kill -9 while it writes shards; the same command resumes from the shards already there
    and the store equals one prepared in one go."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        row([f"Line {i} of a document. ", "And another sentence. " * 3], [0.1, 0.2])
        for i in range(30000)
    ]
    with gzip.open(data / "train.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    command = [
        sys.executable,
        "-m",
        "phf.data.prepare",
        str(data),
        "--splits",
        "train",
        "--out",
        str(tmp_path / "cache"),
        "--workers",
        "1",
        "--shard-rows",
        "1000",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shards = tmp_path / "cache" / "stores"
    deadline = time.time() + 120
    while len(list(shards.glob("*/shards/shard_*"))) < 3:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    [directory] = [d for d in shards.glob("data-train-*") if d.is_dir()]
    assert not (directory / "complete.json").exists()
    written = len(list(directory.glob("shards/shard_*")))
    assert 3 <= written < 30

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{written} shards resumed" in resumed.stderr
    store = TokenStore.open(directory)
    fresh = ensure_store(
        split_source("x", str(data), "train"), tokenizer, tmp_path / "fresh", 1, 1000
    )
    assert store.num_documents == fresh.num_documents == 30000
    for a, b in zip(store.shard_tokens, fresh.shard_tokens, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(store.segment_starts, fresh.segment_starts)
