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
import glob
import gzip
import hashlib
import json
import os
import re
import statistics
from pathlib import Path

from phf.data.segment import split_sentences
from phf.scorers import ProfanityScorer

FORTUNES_DIR = "/usr/share/games/fortunes"
CHANGELOG_GLOB = "/usr/share/doc/*/changelog*.gz"
OUT_DIR = Path(__file__).resolve().parent.parent / "phf" / "assets" / "datasets" / "toxicity"

EMAIL = re.compile(r"\S+@\S+")
URL = re.compile(r"\b(?:https?|ftp)://\S+")
CHANGELOG_HEADER = re.compile(r"^\S.*\(.*\).*;\s*urgency=", re.IGNORECASE)
SIGNATURE = re.compile(r"^\s*--\s")
CONTRIBUTOR = re.compile(r"^\s*\[.*\]\s*$")


def fortune_documents(doc_chars: int) -> list[tuple[str, str]]:
    if not os.path.isdir(FORTUNES_DIR):
        raise SystemExit(
            f"{FORTUNES_DIR} not found: install the source text with `apt-get install -y fortunes`"
        )
    docs = []
    for path in sorted(glob.glob(os.path.join(FORTUNES_DIR, "*"))):
        name = os.path.basename(path)
        if "." in name or name in {"art", "ascii-art"} or os.path.islink(path):
            continue  # .dat indexes, .u8 duplicates, ASCII drawings
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        fortunes = [f.strip("\n") for f in text.split("\n%\n") if f.strip()]
        buf: list[str] = []
        for fortune in fortunes:
            fortune = URL.sub("", EMAIL.sub("", fortune))
            buf.append(fortune)
            if sum(map(len, buf)) >= doc_chars:
                docs.append(("\n\n".join(buf) + "\n", f"fortunes/{name}"))
                buf = []
        if buf:
            docs.append(("\n\n".join(buf) + "\n", f"fortunes/{name}"))
    return docs


def changelog_documents(max_per_package: int, min_chars: int) -> list[tuple[str, str]]:
    docs = []
    for path in sorted(glob.glob(CHANGELOG_GLOB)):
        package = path.split("/")[-2]
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        entries: list[list[str]] = []
        for line in lines:
            if CHANGELOG_HEADER.match(line):
                entries.append([])
            elif entries and not SIGNATURE.match(line) and not CONTRIBUTOR.match(line):
                entries[-1].append(URL.sub("", EMAIL.sub("", line)).rstrip())
        kept = 0
        for entry in entries:
            body = "\n".join(line.strip() for line in entry if line.strip())
            if len(body) < min_chars:
                continue
            docs.append((body + "\n", f"debian-changelog/{package}"))
            kept += 1
            if kept >= max_per_package:
                break
    return docs


def is_test(text: str, test_fraction: float) -> bool:
    digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < test_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc-chars", type=int, default=600)
    parser.add_argument("--changelog-entries-per-package", type=int, default=6)
    parser.add_argument("--changelog-min-chars", type=int, default=200)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    docs = fortune_documents(args.doc_chars) + changelog_documents(
        args.changelog_entries_per_package, args.changelog_min_chars
    )
    segmented = [(split_sentences(text), source) for text, source in docs]
    scorer = ProfanityScorer()
    flat_scores = iter(scorer.score_texts([s for segs, _ in segmented for s in segs]))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "test": []}
    for segments, source in segmented:
        scores = [round(next(flat_scores), 4) for _ in segments]
        row = {
            "texts": segments,
            "scores": scores,
            "avg_score": round(statistics.fmean(scores), 4),
            "source": source,
        }
        split = "test" if is_test("".join(segments), args.test_fraction) else "train"
        splits[split].append(row)

    for split, rows in splits.items():
        path = args.out_dir / f"{split}.jsonl.gz"
        # mtime=0 keeps the gzip bytes identical across rebuilds of the same text.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            for row in rows:
                gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        scores = [s for row in rows for s in row["scores"]]
        chars = sum(len(t) for row in rows for t in row["texts"])
        share = sum(s > 0.5 for s in scores) / len(scores)
        print(
            f"{split}: {len(rows)} documents, {len(scores)} segments, {chars / 1e6:.2f}M chars, "
            f"{share:.1%} of segments score > 0.5 -> {path} ({path.stat().st_size / 1e6:.2f} MB)"
        )


if __name__ == "__main__":
    main()
