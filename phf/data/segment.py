"""Split documents into the segments that scorers annotate.

Segments keep their surrounding whitespace, so ``"".join(split_sentences(doc)) == doc``: packing
the segments back together reproduces the document byte for byte.
"""

from __future__ import annotations

import re

# A sentence ends at ., ! or ? (optionally followed by closing quotes/brackets) and the whitespace
# after it; a blank line also ends a segment so that headings and list items stand alone.
_SENTENCE_END = re.compile(r"""(?<=[.!?])["')\]]*\s+|\n\s*\n""")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentence segments that concatenate back to ``text``."""
    segments: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if end > start:
            segments.append(text[start:end])
            start = end
    if start < len(text):
        segments.append(text[start:])
    return segments


def split_lines(text: str) -> list[str]:
    """Split code into line segments (each keeps its newline) that concatenate back to ``text``."""
    return text.splitlines(keepends=True)
