"""What could not be sent to the tracking server, kept on disk until it can be.

``<output_dir>/unrecorded/records.jsonl`` holds one JSON record per call that failed or was
held back during an outage (metrics, tags, tables, artifacts, the final model, the end status),
in order; files they refer to are copied beside it. Written as they happen, so that a run killed
during an outage loses none of them: the same command run again (which resumes the run from its
checkpoint) sends them first.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

RECORDS_FILE = "records.jsonl"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._count = len(self.records())

    @property
    def path(self) -> Path:
        return self.directory / RECORDS_FILE

    def __len__(self) -> int:
        return self._count

    def add(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self._count += 1

    def keep_file(self, source: Path, name: str) -> Path:
        """A copy of ``source`` (file or directory) that outlives it, for a later upload."""
        target = self.directory / "files" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        return target

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def replace(self, records: list[dict[str, Any]]) -> None:
        """Keep only ``records`` (those still unsent); remove the spool when none are left."""
        if not records:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._count = 0
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path)
        self._count = len(records)

    def summary(self) -> str:
        """What is in it, in words: "312 metric points, 2 tables, the end status FINISHED"."""
        records = self.records()
        kinds = Counter(r["kind"] for r in records)
        parts = []
        points = sum(len(r["metrics"]) for r in records if r["kind"] == "metrics")
        if points:
            parts.append(f"{points} metric points")
        for kind, word in (
            ("table", "samples tables"),
            ("artifact", "artifacts"),
            ("tags", "tag updates"),
            ("inputs", "dataset records"),
        ):
            if kinds[kind]:
                parts.append(f"{kinds[kind]} {word}")
        if kinds["model"]:
            parts.append("the final model")
        statuses = [r["status"] for r in records if r["kind"] == "status"]
        if statuses:
            parts.append(f"the end status {statuses[-1]}")
        return ", ".join(parts) or "nothing"
