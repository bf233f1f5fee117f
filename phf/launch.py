"""Start phf in a process whose C allocator keeps the memory it frees (the ``phf`` command).

A training step on the CPU allocates and frees the same large tensors (the tiny model's logits
alone are 2048 x 8192 floats, 64 MB) at every step. glibc's malloc serves allocations that large
with fresh mmap()s and unmaps them when freed, so each one faults in its pages anew: measured on
2 cores, ``torch.zeros(2048, 8192)`` takes 19 ms that way and 5 ms from a heap that keeps them,
and the tiny model trains ~1.2x faster (scripts/benchmark.py --only mfu). The settings are glibc
tunables, read only when a process starts, so the process re-executes itself once with them,
before it imports anything heavy. ``PHF_MALLOC_TUNING=0``, or GLIBC_TUNABLES that already set
malloc's thresholds, leave the process as it is; numbers do not depend on it, only speed.
"""

from __future__ import annotations

import os
import sys

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"


def reexec_with_malloc_tuning() -> None:
    """Re-execute this very command with MALLOC_TUNABLES set, unless set already (or off)."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("PHF_MALLOC_TUNING", "1") == "0" or "glibc.malloc." in current:
        return
    if not sys.platform.startswith("linux") or os.environ.get("PHF_MALLOC_TUNED"):
        return
    os.environ["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
    os.environ["PHF_MALLOC_TUNED"] = "1"  # a loop guard: the settings cannot be read back
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def main() -> None:
    reexec_with_malloc_tuning()
    from phf.run import main as run_main

    run_main()
