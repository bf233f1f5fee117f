"""Prepared token stores: one split of a corpus, tokenized once, read by every run of a sweep.

Tokenizing is fast but not free (~0.8M tokens/s per core for the built-in BPE): on the paper's
3.3B-token datasets it would cost every run of a sweep hours, and a GPU would wait on it. A store
holds what training needs in memory-mapped NumPy arrays, so a run cuts its blocks from them at
memory speed (phf/data/blocks.py), and one store serves every objective: filtering is an index
over documents (their ``avg_score``) and conditional training's control tokens are inserted at
read time from the segment starts.

Layout of a store directory::

    manifest.json          what it is built from: the split's identity and fingerprint, the
                           tokenizer's hash, the format version; a store whose source or
                           tokenizer changed is stale and is rebuilt, never reused
    shards/shard_00000/    one per ``shard_rows`` rows, written whole, then renamed:
        tokens.npy         uint16 (vocabulary <= 65,536) or uint32; EOS after each document
        scores.npy         float32: each token's segment's score
        doc_offsets.npy    int64 [documents + 1] into tokens
        avg_scores.npy     float64 [documents]: the row's avg_score, else the mean segment score
        segment_starts.npy int64: the position (in the shard) of each segment's first token
        segment_scores.npy float32: each segment's score
        segment_offsets.npy int64 [documents + 1] into segment_starts
        stats.json         rows, documents, tokens, skipped documents
    complete.json          written last: the shards and their files' sizes

Each document is tokenized whole (merges across segment boundaries are the tokenizer's own) and
every token takes the score of the segment that holds its last character; the EOS that ends the
document takes the last segment's. Special-token strings inside documents are text, never
control or EOS tokens. A segment's first token is where conditional training puts its control
token (a segment whose characters all fall inside a neighbour's token has none).

Preparation runs in worker processes, one core each (``workers``), resumes after an
interruption (shards already renamed are kept) and refuses a partial store built from other
settings. Stores live in ``data.cache_dir`` (default $PHF_CACHE_DIR, else ~/.cache/phf) under a
key of the split's identity and the tokenizer's hash; ``python -m phf.data.prepare`` fills that
cache ahead of a sweep, and concurrent runs that need the same store build it once (a file lock).
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from phf.data.corpus import DatasetError, Document, SplitSource, parse_row, validate_row

log = logging.getLogger(__name__)

STORE_FORMAT = 1
SHARD_ROWS = 5000
TOKENIZE_CHUNK = 256  # documents per tokenizer call
ARRAYS = (
    "tokens",
    "scores",
    "doc_offsets",
    "avg_scores",
    "segment_starts",
    "segment_scores",
    "segment_offsets",
)


class StoreError(RuntimeError):
    """A store that is partial, stale, or built from other settings than asked for."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("PHF_CACHE_DIR") or Path.home() / ".cache" / "phf")


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides a document's token ids: the fast tokenizer's model, normalizer and
    pre-tokenizer, its non-special added tokens and the EOS id. Special tokens are left out
    (documents are tokenized with their strings as text), so adding conditional training's
    control tokens to a tokenizer does not change its stores."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend["added_tokens"] = [t for t in backend.get("added_tokens", []) if not t["special"]]
    for key in ("truncation", "padding", "post_processor"):
        backend.pop(key, None)
    payload = json.dumps([backend, tokenizer.eos_token_id], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------ tokenizing


@dataclass
class TokenizedDocument:
    ids: np.ndarray  # int64 token ids, EOS last
    scores: np.ndarray  # float32, the score of each token's segment
    segments: np.ndarray  # int64, the index of each token's segment (EOS: the last one)

    @property
    def segment_starts(self) -> np.ndarray:
        """Positions of the first token of each segment that has one."""
        return np.flatnonzero(np.diff(self.segments, prepend=-1) != 0)


def tokenize_documents(
    documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase
) -> list[TokenizedDocument]:
    """Token ids (EOS appended), per-token scores and segment indices of each (non-empty)
    document, in one batched call of the fast tokenizer."""
    encoded = tokenizer(
        [doc.text for doc in documents],
        add_special_tokens=False,
        split_special_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=False,
        # Whole documents may exceed model_max_length; blocks are cut later, so the
        # tokenizer's "sequence too long" warning would be noise.
        verbose=False,
    )
    out = []
    for doc, ids, offsets in zip(
        documents, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        segment_ends = np.cumsum([len(t) for t in doc.texts])
        scores = np.asarray(doc.scores, dtype=np.float32)
        ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        # The segment holding a token's last character (end offset - 1).
        last_chars = np.maximum(ends[:, 1] - 1, ends[:, 0])
        segment_index = np.searchsorted(segment_ends, last_chars, side="right")
        segment_index = np.minimum(segment_index, len(scores) - 1)
        segment_index = np.append(segment_index, len(scores) - 1).astype(np.int64)  # EOS
        out.append(
            TokenizedDocument(
                ids=np.append(np.asarray(ids, dtype=np.int64), tokenizer.eos_token_id),
                scores=scores[segment_index],
                segments=segment_index,
            )
        )
    return out


def _shard_arrays(
    documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase, token_dtype: np.dtype
) -> dict[str, np.ndarray]:
    ids, scores, starts, start_scores = [], [], [], []
    doc_lengths, segment_counts, avg = [], [], []
    position = 0
    for first in range(0, len(documents), TOKENIZE_CHUNK):
        chunk = documents[first : first + TOKENIZE_CHUNK]
        for doc, tokenized in zip(chunk, tokenize_documents(chunk, tokenizer), strict=True):
            doc_starts = tokenized.segment_starts
            ids.append(tokenized.ids)
            scores.append(tokenized.scores)
            starts.append(doc_starts + position)
            start_scores.append(tokenized.scores[doc_starts])
            doc_lengths.append(len(tokenized.ids))
            segment_counts.append(len(doc_starts))
            avg.append(doc.avg_score)
            position += len(tokenized.ids)

    def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return {
        "tokens": joined(ids, token_dtype),
        "scores": joined(scores, np.float32),
        "doc_offsets": np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)]),
        "avg_scores": np.asarray(avg, dtype=np.float64),
        "segment_starts": joined(starts, np.int64),
        "segment_scores": joined(start_scores, np.float32),
        "segment_offsets": np.concatenate([[0], np.cumsum(segment_counts, dtype=np.int64)]),
    }


# -------------------------------------------------------------------------- preparation

_worker_tokenizer: PreTrainedTokenizerBase | None = None


@dataclass
class ShardJob:
    index: int
    rows: list[tuple[Any, str]]  # (payload, where)
    directory: Path  # the shard's final directory
    token_dtype: str


def _write_shard(job: ShardJob) -> dict[str, int]:
    """Parse, validate and tokenize one shard's rows; write its arrays, then rename."""
    assert _worker_tokenizer is not None, "worker started without a tokenizer"
    documents, empty = [], 0
    for payload, where in job.rows:
        document = validate_row(parse_row(payload, where), where)
        if not document.texts or not document.text:
            empty += 1  # nothing to train on; counted, reported once at the end
            continue
        documents.append(document)
    arrays = _shard_arrays(documents, _worker_tokenizer, np.dtype(job.token_dtype))
    partial = job.directory.with_name(f".{job.directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(partial / f"{name}.npy", array)
    stats = {
        "rows": len(job.rows),
        "documents": len(documents),
        "tokens": len(arrays["tokens"]),
        "empty_documents": empty,
    }
    (partial / "stats.json").write_text(json.dumps(stats))
    partial.rename(job.directory)
    return stats


def _init_worker(tokenizer: PreTrainedTokenizerBase) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    reset_signals()


def reset_signals() -> None:
    """In a worker process: the default SIGTERM (the pool's terminate), SIGINT left to the
    parent, not the run's stop handlers inherited through fork (phf/signals.py)."""
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class PrepareReport:
    directory: Path
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    empty_documents: int = 0
    shards_written: int = 0
    shards_resumed: int = 0
    seconds: float = 0.0

    @property
    def documents_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def store_manifest(
    source: SplitSource, tokenizer: PreTrainedTokenizerBase, shard_rows: int = SHARD_ROWS
) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT,
        "source": source.identity(),
        "fingerprint": source.fingerprint(),
        "tokenizer": tokenizer_hash(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "token_dtype": "uint16" if len(tokenizer) <= 1 << 16 else "uint32",
        "shard_rows": shard_rows,
    }


def prepare(
    source: SplitSource,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    workers: int = 1,
    manifest: dict[str, Any] | None = None,
) -> PrepareReport:
    """Tokenize ``source`` into a store at ``directory``, resuming the shards already there
    (``manifest`` must then equal theirs); ``workers`` processes of one core each."""
    manifest = manifest or store_manifest(source, tokenizer)
    shards = directory / "shards"
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            raise StoreError(
                f"{directory} holds a partial store of other settings (source, tokenizer or "
                f"format differ: {manifest_path}); delete it, or prepare into another directory"
            )
    else:
        shards.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1))
    (directory / "complete.json").unlink(missing_ok=True)

    # One core per worker: the tokenizer's own thread pool would make "N workers" mean more.
    previous_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    report = PrepareReport(directory)
    start = time.perf_counter()

    def jobs() -> Iterator[ShardJob]:
        rows = ((payload, where) for payload, where, _ in source.rows())
        index = 0
        while chunk := list(islice(rows, manifest["shard_rows"])):
            shard = shards / f"shard_{index:05d}"
            if (shard / "stats.json").is_file():
                report.shards_resumed += 1
                _add(report, json.loads((shard / "stats.json").read_text()))
            else:
                yield ShardJob(index, chunk, shard, manifest["token_dtype"])
            index += 1

    pool = None
    try:
        if workers <= 1:
            _init_worker(tokenizer)
            results: Iterator[dict[str, int]] = map(_write_shard, jobs())
        else:
            # fork: the workers inherit the tokenizer; imap keeps a few shards in flight. The
            # heap is frozen first, so that the workers' garbage collections skip the million
            # objects torch and transformers made (and copy-on-write leaves their pages shared):
            # ~10% of a two-worker preparation otherwise.
            gc.freeze()
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer,)
            )
            gc.unfreeze()
            results = pool.imap(_write_shard, jobs(), chunksize=1)
        for stats in results:
            report.shards_written += 1
            _add(report, stats)
    except OSError as error:
        raise DatasetError(f"cannot read {source.identity()}: {error}") from error
    finally:
        if pool is not None:
            pool.terminate()
        if previous_parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous_parallelism
    report.seconds = time.perf_counter() - start
    if report.documents == 0:
        raise DatasetError(
            f"{source.identity()} holds no documents with text ({report.rows} rows, "
            f"{report.empty_documents} of them empty)"
        )
    if report.empty_documents:
        log.warning(
            "%s: %d of %d documents have no text and were skipped",
            source.identity(),
            report.empty_documents,
            report.rows,
        )
    names = sorted(p.name for p in shards.iterdir() if p.is_dir() and not p.name.startswith("."))
    complete = {
        "shards": {
            name: {a: (shards / name / f"{a}.npy").stat().st_size for a in ARRAYS} for name in names
        },
        "documents": report.documents,
        "tokens": report.tokens,
        "empty_documents": report.empty_documents,
    }
    tmp = directory / "complete.json.tmp"
    tmp.write_text(json.dumps(complete, indent=1))
    tmp.replace(directory / "complete.json")
    return report


def _add(report: PrepareReport, stats: dict[str, int]) -> None:
    report.rows += stats["rows"]
    report.documents += stats["documents"]
    report.tokens += stats["tokens"]
    report.empty_documents += stats["empty_documents"]


# ------------------------------------------------------------------------------ reading


@dataclass
class TokenStore:
    """A complete store, memory-mapped: global document offsets over all shards, per-document
    ``avg_scores``, the segment starts and scores, and each shard's token and score arrays."""

    directory: Path
    manifest: dict[str, Any]
    doc_offsets: np.ndarray  # int64 [documents + 1], global token positions
    avg_scores: np.ndarray  # float64 [documents]
    segment_offsets: np.ndarray  # int64 [documents + 1] into segment_starts
    segment_starts: np.ndarray  # int64, global token positions
    segment_scores: np.ndarray  # float32
    shard_token_bases: np.ndarray  # int64 [shards + 1]
    shard_tokens: list[np.ndarray] = field(repr=False)
    shard_scores: list[np.ndarray] = field(repr=False)

    @property
    def num_documents(self) -> int:
        return len(self.avg_scores)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def digest(self) -> str:
        """Names this store's content: its source's fingerprint and the tokenizer."""
        payload = json.dumps([self.manifest["fingerprint"], self.manifest["tokenizer"]])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def document_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def span(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and scores of global positions [start, end), within one document."""
        shard = int(np.searchsorted(self.shard_token_bases, start, side="right")) - 1
        base = self.shard_token_bases[shard]
        ids = self.shard_tokens[shard][start - base : end - base].astype(np.int64)
        return ids, np.asarray(self.shard_scores[shard][start - base : end - base])

    @classmethod
    def open(cls, directory: Path) -> TokenStore:
        """Open a complete store; StoreError when it is partial or a file was truncated."""
        complete_path = directory / "complete.json"
        if not complete_path.is_file():
            raise StoreError(f"{directory} is not a complete store (no complete.json)")
        complete = json.loads(complete_path.read_text())
        manifest = json.loads((directory / "manifest.json").read_text())
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        for name, sizes in complete["shards"].items():
            for array, size in sizes.items():
                path = directory / "shards" / name / f"{array}.npy"
                if not path.is_file() or path.stat().st_size != size:
                    raise StoreError(f"{path} is missing or truncated: the store is damaged")
                parts[array].append(np.load(path, mmap_mode="r"))
        token_counts = [len(t) for t in parts["tokens"]]
        token_bases = np.concatenate([[0], np.cumsum(token_counts, dtype=np.int64)])
        doc_offsets = [
            np.asarray(o[:-1]) + b
            for o, b in zip(parts["doc_offsets"], token_bases[:-1], strict=True)
        ]
        segment_bases = np.cumsum([0] + [len(s) for s in parts["segment_starts"]])
        segment_offsets = [
            np.asarray(o[:-1]) + b
            for o, b in zip(parts["segment_offsets"], segment_bases[:-1], strict=True)
        ]
        starts = [
            np.asarray(s) + b
            for s, b in zip(parts["segment_starts"], token_bases[:-1], strict=True)
        ]
        return cls(
            directory=directory,
            manifest=manifest,
            doc_offsets=np.concatenate([*doc_offsets, [token_bases[-1]]]).astype(np.int64),
            avg_scores=np.concatenate(parts["avg_scores"]) if parts["avg_scores"] else np.zeros(0),
            segment_offsets=np.concatenate([*segment_offsets, [segment_bases[-1]]]).astype(
                np.int64
            ),
            segment_starts=np.concatenate(starts).astype(np.int64)
            if starts
            else np.zeros(0, np.int64),
            segment_scores=np.concatenate(parts["segment_scores"]).astype(np.float32),
            shard_token_bases=token_bases,
            shard_tokens=parts["tokens"],
            shard_scores=parts["scores"],
        )


# -------------------------------------------------------------------------------- the cache


def store_directory(cache_dir: Path, source: SplitSource, tokenizer_digest: str) -> Path:
    """<cache>/stores/<readable name>-<key>: the key names the split and the tokenizer."""
    identity = json.dumps([source.identity(), tokenizer_digest, STORE_FORMAT], sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = source.dataset if source.path is None else source.path.parent.name
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{source.split}")[-60:]
    return cache_dir / "stores" / f"{readable}-{key}"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_store(
    source: SplitSource,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: Path | None = None,
    workers: int | None = None,
    shard_rows: int = SHARD_ROWS,
) -> TokenStore:
    """The store of ``source`` for ``tokenizer``: opened from the cache when it is complete and
    current, else prepared (resuming a partial one). Concurrent callers build it once."""
    cache_dir = cache_dir or default_cache_dir()
    directory = store_directory(cache_dir, source, tokenizer_hash(tokenizer))
    with _locked(directory):
        manifest = store_manifest(source, tokenizer, shard_rows)
        if (directory / "manifest.json").is_file():
            previous = json.loads((directory / "manifest.json").read_text())
            if previous.get("fingerprint") != manifest["fingerprint"] and not (
                source.path is None and manifest["fingerprint"]["revision"] is None
            ):
                log.warning(
                    "%s changed since its store %s was prepared: preparing it again",
                    source.identity(),
                    directory,
                )
                shutil.rmtree(directory)
            elif (directory / "complete.json").is_file():
                return TokenStore.open(directory)
            else:
                manifest = previous  # a partial store of the same source: resume it
        workers = workers or os.cpu_count() or 1
        log.info("preparing the token store %s from %s", directory, source.identity())
        report = prepare(source, tokenizer, directory, workers, manifest)
        log.info(
            "prepared %d documents, %d tokens in %.1f s (%d worker(s), %d shards resumed)",
            report.documents,
            report.tokens,
            report.seconds,
            workers,
            report.shards_resumed,
        )
        return TokenStore.open(directory)
