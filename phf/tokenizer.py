"""The tokenizer shipped with phf and the special tokens every phf model knows."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

BUILTIN_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
EOS_TOKEN = "<|endoftext|>"
# Conditional training (Korbak et al. 2023) prefixes segments with these.
CONTROL_TOKENS = ("<|aligned|>", "<|misaligned|>")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load ``builtin`` (the shipped BPE), a local directory or a hub id.

    A tokenizer without a pad token (GPT-2's) gets EOS as pad: phf pads only where the attention
    mask hides it.
    """
    path = BUILTIN_TOKENIZER_DIR if name_or_path == "builtin" else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
