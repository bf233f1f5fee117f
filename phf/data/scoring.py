"""Score any corpus into the PHF format: segment each document, score every segment, write shards.

    python -m phf.data.scoring SOURCE --out DIR --scorer pep8 [--workers 2] [scorer.key=value ...]

SOURCE is a local file (.jsonl, .jsonl.gz, .parquet, .txt, .py), a folder of such files (searched
recursively; each .py or .txt file is one document), or a Hugging Face hub dataset id. Rows of
jsonl/parquet/hub data take their text from ``--text-field`` (default ``text``), or join their
``texts`` segments when that field is absent (re-scoring data already in the PHF format).

The job is cut into shards of ``--shard-size`` documents; each shard is scored in a worker process
and written atomically to DIR/shards/. Re-running the same command after an interruption skips
the shards already written. When every shard is done, DIR/train.jsonl.gz and DIR/test.jsonl.gz
are written, split by a hash of each document's text, so DIR works as ``task.dataset=DIR``.

Bad input is counted and skipped with a warning (unreadable files, empty documents, documents
whose segments the scorer could not score); undecodable bytes are replaced with U+FFFD and
counted; rows without the text field stop the job with the file and row named.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phf.data.corpus import DatasetError, file_rows, hub_rows, looks_like_path
from phf.data.segment import split_lines, split_sentences
from phf.scorers import Scorer, build_scorer

log = logging.getLogger(__name__)

DOCUMENT_SUFFIXES = (".py", ".txt")  # one document per file
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # one document per row
SEGMENTERS = {"sentences": split_sentences, "lines": split_lines}


@dataclass
class SourceDocument:
    text: str
    source: str  # the file or dataset it came from
    row: int  # its row in that source (0 for a whole-file document)


@dataclass
class JobStats:
    """What happened to the input; every skipped item is counted, none silently."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first example of each problem

    def note(self, problem: str, example: str) -> None:
        self.counts[problem] += 1
        self.examples.setdefault(problem, example)

    def merge(self, other: JobStats) -> None:
        self.counts.update(other.counts)
        for key, value in other.examples.items():
            self.examples.setdefault(key, value)


# ---------------------------------------------------------------------------- reading the source


def _suffix(path: Path) -> str:
    return ".jsonl.gz" if path.name.endswith(".jsonl.gz") else path.suffix


def _read_text(path: Path, stats: JobStats) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as error:
        stats.note("unreadable files", f"{path}: {error.strerror or error}")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        stats.note("files with undecodable bytes (replaced with U+FFFD)", f"{path}: {error}")
        return data.decode("utf-8", errors="replace")


def _row_text(row: Any, text_field: str, where: str) -> str:
    if isinstance(row, dict):
        if text_field in row and isinstance(row[text_field], str):
            return row[text_field]
        texts = row.get("texts")
        if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DatasetError(
        f"{where}: no text field {text_field!r} (string) or 'texts' (list of strings); the row "
        f"has {keys}. Pick the field with --text-field"
    )


def _file_documents(path: Path, text_field: str, stats: JobStats) -> Iterator[SourceDocument]:
    suffix = _suffix(path)
    if suffix in DOCUMENT_SUFFIXES:
        text = _read_text(path, stats)
        if text is not None:
            yield SourceDocument(text=text, source=str(path), row=0)
        return
    try:
        for row, where, row_number in file_rows(path):
            yield SourceDocument(_row_text(row, text_field, where), str(path), row_number)
    except OSError as error:
        stats.note("unreadable files", f"{path}: {error.strerror or error}")


def list_source_files(root: Path) -> list[Path]:
    """Every supported file under ``root``, in a stable (sorted) order: resuming relies on it."""
    suffixes = DOCUMENT_SUFFIXES + ROW_SUFFIXES
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names):
            path = Path(directory) / name
            if _suffix(path) in suffixes:
                files.append(path)
    return files


def iter_source_documents(
    source: str, text_field: str, split: str, stats: JobStats
) -> Iterator[SourceDocument]:
    """The documents of a local file, a folder, or a hub dataset, in a stable order."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = list_source_files(path)
        if not files:
            raise DatasetError(
                f"{path} holds no {', '.join(DOCUMENT_SUFFIXES + ROW_SUFFIXES)} files"
            )
        for file in files:
            yield from _file_documents(file, text_field, stats)
    elif path.is_file():
        if _suffix(path) not in DOCUMENT_SUFFIXES + ROW_SUFFIXES:
            raise DatasetError(
                f"{path}: unsupported file type; use {', '.join(DOCUMENT_SUFFIXES + ROW_SUFFIXES)}"
            )
        yield from _file_documents(path, text_field, stats)
    elif looks_like_path(source):
        raise DatasetError(f"{path} does not exist")
    else:
        yield from _hub_documents(source, text_field, split)


def _hub_documents(dataset_id: str, text_field: str, split: str) -> Iterator[SourceDocument]:
    for row, where, row_number in hub_rows(dataset_id, split):
        yield SourceDocument(_row_text(row, text_field, where), dataset_id, row_number)


# ----------------------------------------------------------------------------- segment and score


def segment(text: str, segmenter: str, max_segment_chars: int) -> tuple[list[str], int]:
    """Segments of ``text``, with any segment longer than ``max_segment_chars`` cut into pieces
    (scorers are slow or wrong on giant segments); returns the segments and how many were cut."""
    segments, cut = [], 0
    for piece in SEGMENTERS[segmenter](text):
        if len(piece) <= max_segment_chars:
            segments.append(piece)
            continue
        cut += 1
        segments.extend(
            piece[i : i + max_segment_chars] for i in range(0, len(piece), max_segment_chars)
        )
    return segments, cut


def phf_rows(
    segment_lists: Sequence[list[str]],
    metadata: Sequence[dict[str, Any]],
    scorer: Scorer,
    stats: JobStats,
) -> list[dict[str, Any]]:
    """Score already-segmented documents; one PHF row per document, ``metadata`` merged in.

    A document with a segment the scorer could not score (NaN) is dropped and counted.
    """
    all_scores = scorer.score_documents(segment_lists)
    rows = []
    for segments, scores, meta in zip(segment_lists, all_scores, metadata, strict=True):
        if not all(math.isfinite(s) for s in scores):
            stats.note("documents dropped: the scorer failed on a segment", str(meta))
            continue
        rows.append(
            {
                "texts": list(segments),
                "scores": [round(float(s), 6) for s in scores],
                "avg_score": round(statistics.fmean(scores), 6),
                **meta,
            }
        )
    return rows


def score_documents(
    documents: Sequence[SourceDocument],
    scorer: Scorer,
    segmenter: str,
    max_segment_chars: int,
    stats: JobStats,
) -> list[dict[str, Any]]:
    """Segment and score ``documents`` into PHF rows carrying their source and row."""
    segment_lists, metadata = [], []
    for doc in documents:
        if not doc.text.strip():
            stats.note("empty documents", f"{doc.source}, row {doc.row}")
            continue
        segments, cut = segment(doc.text, segmenter, max_segment_chars)
        if cut:
            stats.note(
                f"segments longer than {max_segment_chars} characters (cut into pieces)",
                f"{doc.source}, row {doc.row}",
            )
        segment_lists.append(segments)
        metadata.append({"source": doc.source, "row": doc.row})
    return phf_rows(segment_lists, metadata, scorer, stats)


# ------------------------------------------------------------------------------- the sharded job


def write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically: a half-written file never carries the final name, so resuming can trust it."""
    tmp = path.with_name(path.name + ".tmp")
    # mtime=0: the same rows give the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    os.replace(tmp, path)


_worker_scorer: Scorer | None = None


def _init_worker(scorer_cfg: dict[str, Any]) -> None:
    global _worker_scorer
    _worker_scorer = build_scorer(OmegaConf.create(scorer_cfg))


def _score_shard(
    task: tuple[int, list[SourceDocument], Path, str, int],
) -> tuple[int, int, int, int, JobStats]:
    index, documents, shard_path, segmenter, max_segment_chars = task
    stats = JobStats()
    assert _worker_scorer is not None, "worker started without _init_worker"
    rows = score_documents(documents, _worker_scorer, segmenter, max_segment_chars, stats)
    write_jsonl_gz(shard_path, rows)
    segments = sum(len(r["texts"]) for r in rows)
    chars = sum(len(t) for r in rows for t in r["texts"])
    return index, len(documents), segments, chars, stats


@dataclass
class ScoringReport:
    documents: int
    segments: int
    chars: int
    seconds: float
    shards_written: int
    shards_resumed: int
    stats: JobStats

    @property
    def documents_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0


def _manifest(args: dict[str, Any]) -> dict[str, Any]:
    keys = ("source", "text_field", "split", "segmenter", "shard_size", "max_segment_chars")
    return {key: args[key] for key in keys} | {"scorer": args["scorer"]}


def score_corpus(
    source: str,
    out_dir: Path,
    scorer_cfg: DictConfig,
    segmenter: str,
    workers: int = 1,
    shard_size: int = 200,
    text_field: str = "text",
    split: str = "train",
    max_segment_chars: int = 5000,
    test_fraction: float = 0.05,
    progress: bool = True,
) -> ScoringReport:
    """Score ``source`` into ``out_dir`` (resuming the shards already there); see module doc."""
    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; choose one of {sorted(SEGMENTERS)}")
    shards_dir = out_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    scorer_dict = OmegaConf.to_container(scorer_cfg, resolve=True, enum_to_str=True)
    manifest = _manifest(
        {
            "source": source,
            "text_field": text_field,
            "split": split,
            "segmenter": segmenter,
            "shard_size": shard_size,
            "max_segment_chars": max_segment_chars,
            "scorer": scorer_dict,
        }
    )
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            raise ValueError(
                f"{out_dir} holds a scoring job with other settings ({manifest_path}); resume "
                "with the same arguments, or write to a new --out directory"
            )
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2))

    stats = JobStats()
    documents = iter_source_documents(source, text_field, split, stats)
    resumed = 0

    def pending_shards() -> Iterator[tuple[int, list[SourceDocument], Path, str, int]]:
        nonlocal resumed
        index = 0
        while chunk := list(islice(documents, shard_size)):
            shard_path = shards_dir / f"shard_{index:05d}.jsonl.gz"
            if shard_path.exists():
                resumed += 1  # written before an interruption: keep it, score nothing
            else:
                yield index, chunk, shard_path, segmenter, max_segment_chars
            index += 1

    totals = Counter()
    start = time.perf_counter()
    bar = tqdm(desc="scoring", unit="doc", disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        _init_worker(scorer_dict)
        results: Iterable = map(_score_shard, pending_shards())
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(scorer_dict,)
        )
        # imap keeps at most a few shards in flight per worker and returns them in order.
        results = pool.imap(_score_shard, pending_shards(), chunksize=1)
    try:
        for _, n_docs, n_segments, n_chars, shard_stats in results:
            totals.update(documents=n_docs, segments=n_segments, chars=n_chars, shards=1)
            stats.merge(shard_stats)
            bar.update(n_docs)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start

    _merge_splits(shards_dir, out_dir, test_fraction)
    report = ScoringReport(
        documents=totals["documents"],
        segments=totals["segments"],
        chars=totals["chars"],
        seconds=seconds,
        shards_written=totals["shards"],
        shards_resumed=resumed,
        stats=stats,
    )
    for problem, count in sorted(report.stats.counts.items()):
        log.warning("%d %s (first: %s)", count, problem, report.stats.examples[problem])
    return report


def is_test_document(text: str, test_fraction: float) -> bool:
    """A stable split: a hash of the text, so a rebuilt corpus puts each document where it was."""
    digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < test_fraction


def write_splits(
    rows: list[dict[str, Any]], out_dir: Path, test_fraction: float
) -> dict[str, list[dict[str, Any]]]:
    """Write ``rows`` as out_dir/train.jsonl.gz and out_dir/test.jsonl.gz; returns the splits."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for row in rows:
        split = "test" if is_test_document("".join(row["texts"]), test_fraction) else "train"
        splits[split].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in splits.items():
        write_jsonl_gz(out_dir / f"{split}.jsonl.gz", split_rows)
    return splits


def split_summary(splits: dict[str, list[dict[str, Any]]], threshold: float) -> str:
    """One line per split: documents, segments, characters, and the share of misaligned ones."""
    lines = []
    for split, rows in splits.items():
        scores = [s for row in rows for s in row["scores"]]
        chars = sum(len(t) for row in rows for t in row["texts"])
        segment_share = sum(s > threshold for s in scores) / max(1, len(scores))
        document_share = sum(max(r["scores"]) > threshold for r in rows) / max(1, len(rows))
        lines.append(
            f"{split}: {len(rows)} documents, {len(scores)} segments, {chars / 1e6:.2f}M chars; "
            f"score > {threshold}: {segment_share:.1%} of segments, {document_share:.1%} of "
            "documents have one"
        )
    return "\n".join(lines)


def _merge_splits(shards_dir: Path, out_dir: Path, test_fraction: float) -> None:
    """All shards, in order -> train.jsonl.gz and test.jsonl.gz."""
    rows = []
    for shard in sorted(shards_dir.glob("shard_*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f)
    write_splits(rows, out_dir, test_fraction)


def main(argv: list[str] | None = None) -> int:
    from phf.config import compose_config

    parser = argparse.ArgumentParser(
        prog="python -m phf.data.scoring", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", help="file, folder, or hub dataset id")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--scorer", required=True, help="a scorer option: profanity, pii, ...")
    parser.add_argument(
        "--segmenter",
        choices=sorted(SEGMENTERS),
        default=None,
        help="default: lines for the pep8 scorer, sentences otherwise",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=200, help="documents per shard")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--split", default="train", help="hub dataset split")
    parser.add_argument("--max-segment-chars", type=int, default=5000)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("overrides", nargs="*", help="scorer overrides, e.g. scorer.batch_size=64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    scorer_cfg = compose_config([f"scorer={args.scorer}", *args.overrides]).scorer
    segmenter = args.segmenter or ("lines" if args.scorer == "pep8" else "sentences")
    try:
        report = score_corpus(
            args.source,
            args.out,
            scorer_cfg,
            segmenter,
            workers=args.workers,
            shard_size=args.shard_size,
            text_field=args.text_field,
            split=args.split,
            max_segment_chars=args.max_segment_chars,
            test_fraction=args.test_fraction,
        )
    except (DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"scored {report.documents} documents ({report.segments} segments, "
        f"{report.chars / 1e6:.2f}M characters) in {report.seconds:.1f} s with {args.workers} "
        f"worker(s): {report.documents_per_s:.1f} documents/s, "
        f"{report.segments / max(report.seconds, 1e-9):,.0f} segments/s; "
        f"{report.shards_written} shards written, {report.shards_resumed} already done"
    )
    print(f"output: {args.out / 'train.jsonl.gz'}, {args.out / 'test.jsonl.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
