"""phf's Hydra launchers for sweeps on SLURM and on local GPUs: hydra-submitit-launcher's, except
that the processes they run end promptly.

Every job of such a sweep is a fresh Python process (submitit's) that imports torch,
transformers, MLflow and Hydra. When it ends, CPython's finalization runs the cyclic garbage
collector over every object those imports created, a heap of well over a million objects: about
1.5 s of CPU per job on the 2-core machine of the README's figures, after the job's result is
already written, while SLURM still holds the job's resources and the next job of an array with
``array_parallelism`` reached cannot start. Freezing the heap at exit (``gc.freeze``: collections
skip frozen objects) cuts that to ~0.2 s. Everything a job writes is written before: its MLflow
run is ended, its result pickled, and atexit handlers (MLflow's, logging's) still run. What is
skipped is only the collection of reference cycles in a process that is about to end, whose
memory the operating system takes back anyway.

conf/hydra/launcher/phf_slurm.yaml and phf_local.yaml select them: ``hardware=slurm`` and
``hardware=local_gpus`` do.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


def freeze_heap_at_exit() -> None:
    """Freeze the heap when this process exits, before the interpreter tears it down.

    atexit runs its handlers last-registered first, so handlers registered later (MLflow's, at
    the start of a run) run before the freeze, and those registered earlier (logging's) after
    it; neither is affected by it.
    """
    atexit.register(gc.freeze)


class _PromptExit:
    """Mixed into a hydra-submitit-launcher launcher, before it in the bases."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        # Runs in the job's own process: submitit unpickles the launcher there and calls it.
        freeze_heap_at_exit()
        return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        # Runs in the process that launched the sweep, which imported the same libraries: it
        # ends right after the sweep, so its exit is sped up the same way.
        freeze_heap_at_exit()
        return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]


class SlurmLauncher(_PromptExit, submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher (``hydra/launcher=phf_slurm``)."""


class LocalLauncher(_PromptExit, submitit_launcher.LocalLauncher):
    """hydra-submitit-launcher's local launcher (``hydra/launcher=phf_local``)."""
