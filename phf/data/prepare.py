"""Prepare the token stores of a dataset once, ahead of the runs that read them.

    python -m phf.data.prepare builtin --task toxicity --tokenizer builtin
    python -m phf.data.prepare /data/my_corpus --tokenizer gpt2 --workers 16
    python -m phf.data.prepare tomekkorbak/pile-detoxify --tokenizer gpt2 --out /shared/phf-cache

DATASET is what ``task.dataset`` takes (builtin, a directory of <split>.jsonl[.gz]/.parquet
files, a hub dataset id, streamed once); each split becomes a store under ``--out`` (the cache
directory, default $PHF_CACHE_DIR or ~/.cache/phf), exactly where a run with
``data.cache_dir=<that directory>`` and the same dataset and tokenizer looks for it, so a whole
sweep reads one prepared copy. Re-running after an interruption resumes; re-running on a current
store does nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from phf.data.corpus import DatasetError, split_source
from phf.data.store import SHARD_ROWS, StoreError, default_cache_dir, ensure_store
from phf.models import resolve_source
from phf.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phf.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", help="builtin, a local directory, or a hub dataset id")
    parser.add_argument("--task", default="toxicity", help="for builtin: whose corpus")
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    parser.add_argument(
        "--tokenizer",
        default="builtin",
        help="builtin, a hub id, a local path or runs:/<id>/model (the run's model.tokenizer, "
        "or its model.pretrained when that is null)",
    )
    parser.add_argument("--out", type=Path, default=None, help="cache directory (data.cache_dir)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="rows per shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    tokenizer = load_tokenizer(resolve_source(args.tokenizer))
    cache_dir = args.out or default_cache_dir()
    for split in args.splits:
        try:
            source = split_source(args.task, args.dataset, split)
            store = ensure_store(source, tokenizer, cache_dir, args.workers, args.shard_rows)
        except (DatasetError, StoreError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(
            f"{split}: {store.num_documents} documents, {store.num_tokens} tokens in "
            f"{store.directory}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
