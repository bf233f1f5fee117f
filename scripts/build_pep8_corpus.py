"""Build the built-in PEP8 corpus shipped in phf/assets/datasets/pep8.

Source: the CPython standard library of the running interpreter (Python Software Foundation
License), without its test suites. Each module is cut into documents of at most `--max-lines`
lines, only at top-level statements (a new `def`, `class`, decorator, import or assignment in
column 0), so every document is valid Python on its own; at most `--chunks-per-file` documents
are kept per module, so that no single module dominates. Each line is one segment, scored by the
`pep8` scorer in the context of its whole document (pycodestyle checks some rules across lines).

    python scripts/build_pep8_corpus.py
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from offline_sources import stdlib_python_files  # scripts/ is on sys.path

from phf.config import compose_config
from phf.data.corpus import BUILTIN_DATASETS_DIR
from phf.data.scoring import JobStats, phf_rows, split_summary, write_splits
from phf.data.segment import split_lines
from phf.scorers import build_scorer


def top_level_chunks(source: str, max_lines: int) -> list[tuple[int, str]]:
    """(first line number, text) chunks of at most ``max_lines`` lines (longer top-level blocks
    stay whole), cut only before a line that starts in column 0 and is not a comment."""
    lines = source.splitlines(keepends=True)
    chunks, start = [], 0
    for i, line in enumerate(lines):
        starts_statement = bool(line.strip()) and not line[0].isspace() and line[0] != "#"
        previous_closed = i > 0 and not lines[i - 1].rstrip().endswith(("\\", ",", "(", "["))
        if i - start >= max_lines and starts_statement and previous_closed:
            chunks.append((start + 1, "".join(lines[start:i])))
            start = i
    if start < len(lines):
        chunks.append((start + 1, "".join(lines[start:])))
    # A chunk's trailing blank lines belonged between it and the next statement; left in, they
    # would be a W391 (blank line at end of file) that the original module does not have.
    return [(n, text.rstrip() + "\n") for n, text in chunks if text.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-lines", type=int, default=60)
    parser.add_argument("--chunks-per-file", type=int, default=2)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--out-dir", type=Path, default=BUILTIN_DATASETS_DIR / "pep8")
    args = parser.parse_args()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    segment_lists, metadata = [], []
    for path in stdlib_python_files():
        source = path.read_text(encoding="utf-8", errors="replace")
        for first_line, text in top_level_chunks(source, args.max_lines)[: args.chunks_per_file]:
            segment_lists.append(split_lines(text))
            relative = path.relative_to(stdlib).as_posix()
            metadata.append({"source": f"cpython-stdlib/{relative}", "first_line": first_line})
    scorer = build_scorer(compose_config(["scorer=pep8"]).scorer)
    stats = JobStats()
    rows = phf_rows(segment_lists, metadata, scorer, stats)
    splits = write_splits(rows, args.out_dir, args.test_fraction)
    print(split_summary(splits, threshold=0.0))
    print(f"written to {args.out_dir}; problems: {dict(stats.counts) or 'none'}")


if __name__ == "__main__":
    main()
