"""Load a task's documents in the PHF format: ``texts`` (segments) and ``scores`` (one per segment).

``task.dataset`` picks the source, in this order of precedence:
1. ``builtin``: the corpus shipped in phf/assets/datasets/<task name>/<split>.jsonl.gz;
2. a local directory holding ``<split>.jsonl``, ``<split>.jsonl.gz`` or ``<split>.parquet``;
3. otherwise a Hugging Face hub dataset id, streamed (e.g. tomekkorbak/pile-detoxify).
Rows are validated as they stream; a malformed row stops the run with its file and row number.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_DATASETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "datasets"
SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class DatasetError(ValueError):
    """A dataset that cannot be found or read, or a row that is not in the PHF format."""


@dataclass(frozen=True)
class Document:
    texts: list[str]
    scores: list[float]
    # The row's own avg_score when it has one (the paper's datasets do), else the mean of scores.
    given_avg_score: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def avg_score(self) -> float:
        if self.given_avg_score is not None:
            return self.given_avg_score
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


def validate_row(row: Any, where: str) -> Document:
    """Check one row of the PHF format and return it as a Document; ``where`` names the row."""
    fix = "each row needs 'texts' (list of strings) and 'scores' (list of numbers, same length)"
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}; {fix}")
    missing = [key for key in ("texts", "scores") if key not in row]
    if missing:
        raise DatasetError(f"{where}: missing {', '.join(map(repr, missing))}; {fix}")
    texts, scores = row["texts"], row["scores"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DatasetError(f"{where}: 'texts' must be a list of strings; {fix}")
    if not isinstance(scores, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores
    ):
        raise DatasetError(f"{where}: 'scores' must be a list of numbers; {fix}")
    if len(texts) != len(scores):
        raise DatasetError(
            f"{where}: {len(texts)} texts but {len(scores)} scores; they must pair up one to one"
        )
    if not all(math.isfinite(s) for s in scores):
        raise DatasetError(f"{where}: 'scores' holds NaN or infinity")
    avg = row.get("avg_score")
    if avg is not None and (isinstance(avg, bool) or not isinstance(avg, (int, float))):
        raise DatasetError(f"{where}: 'avg_score' must be a number, got {avg!r}")
    return Document(
        texts=list(texts),
        scores=[float(s) for s in scores],
        given_avg_score=None if avg is None else float(avg),
    )


def raw_file_rows(path: Path) -> Iterator[tuple[Any, str, int]]:
    """(payload, "file, row N", N) for each row of a .jsonl, .jsonl.gz or .parquet file: the
    line's bytes for JSON lines (parsed by ``parse_row``, possibly in another process), the row
    itself for parquet. Blank lines are skipped (their numbers still count)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row_number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                yield row, f"{path}, row {row_number}", row_number
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for row_number, line in enumerate(f, start=1):
            if line.strip():
                yield line, f"{path}, row {row_number}", row_number


def parse_row(payload: Any, where: str) -> Any:
    """A row from ``raw_file_rows``: JSON lines are decoded (UTF-8) and parsed here, so a bad
    byte or bad JSON is reported with its own row."""
    if not isinstance(payload, bytes):
        return payload
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{where}: not UTF-8 ({error}); re-encode the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not valid JSON ({error})") from None


def file_rows(path: Path) -> Iterator[tuple[Any, str, int]]:
    """(row, "file, row N", N) for each row of a .jsonl, .jsonl.gz or .parquet file.

    Content problems (bad JSON, not UTF-8) raise DatasetError naming the row; a file that
    cannot be opened raises OSError, which callers turn into an error or a counted skip.
    """
    for payload, where, row_number in raw_file_rows(path):
        yield parse_row(payload, where), where, row_number


def local_split_file(directory: Path, split: str) -> Path:
    for suffix in SPLIT_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise DatasetError(
        f"no {split!r} split in {directory}: expected one of "
        f"{', '.join(split + s for s in SPLIT_SUFFIXES)}; found {found or 'nothing'}"
    )


def looks_like_path(source: str) -> bool:
    """A path (existing, or spelt like one), as opposed to a hub dataset id."""
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def resolve_local_dir(task_name: str, source: str) -> Path | None:
    """The directory a task's dataset lives in, or None for a hub dataset id."""
    if source == "builtin":
        directory = BUILTIN_DATASETS_DIR / task_name
        if not directory.is_dir():
            available = sorted(p.name for p in BUILTIN_DATASETS_DIR.iterdir() if p.is_dir())
            raise DatasetError(
                f"there is no built-in dataset for task {task_name!r} (built-in: {available}); "
                "set task.dataset to a local directory or a hub dataset id"
            )
        return directory
    if looks_like_path(source):
        directory = Path(source).expanduser()
        if not directory.exists():
            raise DatasetError(
                f"dataset path {directory} does not exist; set task.dataset to an existing "
                "directory, a hub dataset id, or builtin"
            )
        if not directory.is_dir():
            raise DatasetError(
                f"dataset path {directory} is a file; task.dataset must be a directory holding "
                f"<split>.jsonl / .jsonl.gz / .parquet files"
            )
        return directory
    return None


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a task's dataset is: a local file, or a hub dataset (``path`` None)."""

    dataset: str  # task.dataset as given: builtin, a directory, a hub id
    split: str
    path: Path | None

    def rows(self) -> Iterator[tuple[Any, str, int]]:
        """(payload, where, row number): see raw_file_rows; hub rows come parsed."""
        if self.path is None:
            return hub_rows(self.dataset, self.split)
        return raw_file_rows(self.path)

    def identity(self) -> dict[str, str]:
        """What names the split (not its content): the file, or the hub id and split."""
        if self.path is None:
            return {"hub": self.dataset, "split": self.split}
        return {"file": str(self.path.resolve())}

    def fingerprint(self) -> dict[str, Any]:
        """What changes when the split's content does: a file's size, modification time and a
        hash of its first and last MiB (hashing a 20 GB file whole would cost every run a
        minute); a hub dataset's revision when the hub is reachable (else None)."""
        if self.path is None:
            return {"revision": hub_revision(self.dataset)}
        stat = self.path.stat()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            digest.update(f.read(1 << 20))
            if stat.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read(1 << 20))
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def split_source(task_name: str, source: str, split: str) -> SplitSource:
    directory = resolve_local_dir(task_name, source)
    path = None if directory is None else local_split_file(directory, split)
    return SplitSource(source, split, path)


def iter_documents(task_name: str, source: str, split: str) -> Iterator[Document]:
    """Stream one split of a task's dataset as validated Documents."""
    rows = split_source(task_name, source, split).rows()
    try:
        for payload, where, _ in rows:
            yield validate_row(parse_row(payload, where), where)
    except OSError as error:  # the file is opened lazily, on the first row
        raise DatasetError(f"cannot read the {split!r} split of {source}: {error}") from error


def hub_revision(dataset_id: str) -> str | None:
    """The commit of a hub dataset, or None when the hub cannot be asked (offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset_id, timeout=10).sha
    except Exception:  # any hub failure means "unknown"
        return None


def hub_rows(dataset_id: str, split: str) -> Iterator[tuple[Any, str, int]]:
    """(row, "dataset (split), row N", N) for each row of a Hugging Face hub dataset, streamed."""
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as error:  # the hub raises many types; all mean "cannot load it"
        raise DatasetError(
            f"{dataset_id!r} is not a local path and could not be loaded from the Hugging Face "
            f"hub ({type(error).__name__}: {error}). Use a local path (or task.dataset=builtin), "
            "or connect to the hub"
        ) from error
    for row_number, row in enumerate(stream, start=1):
        yield row, f"{dataset_id} ({split}), row {row_number}", row_number
