"""Preemption and time limits: checkpoint at the next step boundary, then requeue.

On SLURM, submitit binds USR2 (which SLURM sends before a preemption or the time limit, as
configured by hydra-submitit-launcher) to a handler that requeues the job and exits at once,
wherever the program is. ``PreemptionGuard`` stands in front of that handler: the signal only
sets a flag, the training loop notices it after the current optimizer step, writes a
checkpoint, and then hands the signal to submitit's handler, which requeues the job (the same
Hydra job, same output directory) and exits. The requeued job resumes from that checkpoint.
Without submitit (a local run sent USR2 by hand) the guard raises ``Preempted`` after the
checkpoint instead.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTION_SIGNAL = signal.SIGUSR2


class Preempted(RuntimeError):
    """The run stopped for a preemption after writing its checkpoint; run it again to resume."""


class PreemptionGuard:
    """Defers the preemption signal to a step boundary (see the module docstring)."""

    def __init__(self) -> None:
        self.pending: tuple[int, FrameType | None] | None = None
        self._previous: Any = None

    def __enter__(self) -> PreemptionGuard:
        self._previous = signal.getsignal(PREEMPTION_SIGNAL)
        signal.signal(PREEMPTION_SIGNAL, self._defer)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        signal.signal(PREEMPTION_SIGNAL, self._previous)

    def _defer(self, signum: int, frame: FrameType | None) -> None:
        log.warning(
            "received %s: checkpointing after the current step", signal.Signals(signum).name
        )
        self.pending = (signum, frame)

    @property
    def requested(self) -> bool:
        return self.pending is not None

    def hand_over(self) -> None:
        """Pass the deferred signal on: submitit requeues the job and exits the process.
        (A data-parallel process that did not get the signal itself stops too.)"""
        signum, frame = self.pending or (PREEMPTION_SIGNAL, None)
        signal.signal(PREEMPTION_SIGNAL, self._previous)
        if callable(self._previous):
            self._previous(signum, frame)  # submitit: requeue, then sys.exit
        raise Preempted(
            f"stopped by {signal.Signals(signum).name} after a checkpoint; run the same command "
            "again (same output directory) to resume"
        )
