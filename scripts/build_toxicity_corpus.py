"""Build the built-in toxicity corpus shipped in phf/assets/datasets/toxicity.

Sources (real English text available offline on a Debian machine):
- the `fortunes` Debian package (/usr/share/games/fortunes): quotations, jokes, literature and
  song lyrics, some of them profane; consecutive fortunes of one file are grouped into documents
  of about `--doc-chars` characters;
- Debian package changelogs (/usr/share/doc/*/changelog*.gz): one document per release entry,
  with maintainer signature lines, contributor headers, e-mail addresses and URLs removed.

Each document is split into sentence segments, each segment is scored with alt-profanity-check
(`scorer=profanity`), and the document is written in the PHF format: `texts`, `scores`,
`avg_score` (mean of segment scores) plus `source`. Documents are assigned to the test split by a
hash of their text, so the split is stable when the corpus is rebuilt.

    apt-get install -y fortunes   # once
    python scripts/build_toxicity_corpus.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_sources import changelog_documents, fortune_documents  # scripts/ is on sys.path

from phf.data.corpus import BUILTIN_DATASETS_DIR
from phf.data.scoring import JobStats, phf_rows, split_summary, write_splits
from phf.data.segment import split_sentences
from phf.scorers import ProfanityScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc-chars", type=int, default=600)
    parser.add_argument("--changelog-entries-per-package", type=int, default=6)
    parser.add_argument("--changelog-min-chars", type=int, default=200)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--out-dir", type=Path, default=BUILTIN_DATASETS_DIR / "toxicity")
    args = parser.parse_args()

    docs = fortune_documents(args.doc_chars) + changelog_documents(
        args.changelog_entries_per_package, args.changelog_min_chars
    )
    stats = JobStats()
    rows = phf_rows(
        [split_sentences(text) for text, _ in docs],
        [{"source": source} for _, source in docs],
        ProfanityScorer(),
        stats,
    )
    splits = write_splits(rows, args.out_dir, args.test_fraction)
    print(split_summary(splits, threshold=0.5))
    print(f"written to {args.out_dir}; problems: {dict(stats.counts) or 'none'}")


if __name__ == "__main__":
    main()
