"""Real text found offline on a Debian machine, read for the built-in corpora.

Used by the scripts in this folder (each script's folder is on sys.path when it runs).
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import sysconfig
from pathlib import Path

FORTUNES_DIR = "/usr/share/games/fortunes"
CHANGELOG_GLOB = "/usr/share/doc/*/changelog*.gz"

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


def stdlib_python_files() -> list[Path]:
    """The CPython standard library's own modules (PSF license), without its test suites and
    without machine-generated modules (codec tables, pydoc's topic dump)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "__pycache__",
        "lib2to3",
        "encodings",
        "pydoc_data",
    }
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skip and not d.startswith("."))
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py"))
    return files
