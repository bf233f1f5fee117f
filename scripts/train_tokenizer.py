"""Train the byte-level BPE tokenizer shipped in phf/assets/tokenizer.

It is trained on the train splits of every built-in corpus (phf/assets/datasets/*/train.jsonl.gz),
so rebuild it after adding or rebuilding a corpus:

    python scripts/train_tokenizer.py --vocab-size 8192

The result loads with ``transformers.AutoTokenizer.from_pretrained("phf/assets/tokenizer")``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from phf.tokenizer import (
    BUILTIN_TOKENIZER_DIR,
    CONTROL_TOKENS,
    EOS_TOKEN,
)

DATASETS_DIR = Path(__file__).resolve().parent.parent / "phf" / "assets" / "datasets"


def corpus_documents() -> Iterator[str]:
    for path in sorted(DATASETS_DIR.glob("*/train.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield "".join(json.loads(line)["texts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out-dir", type=Path, default=BUILTIN_TOKENIZER_DIR)
    args = parser.parse_args()

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    # The control tokens of conditional training are reserved now so that every built-in model
    # shares one vocabulary, whatever objective it was trained with.
    bpe.train_from_iterator(
        corpus_documents(),
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, *CONTROL_TOKENS],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(CONTROL_TOKENS),
        model_max_length=1024,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out_dir)
    print(f"vocab {len(tokenizer)} -> {args.out_dir}")


if __name__ == "__main__":
    main()
