"""Signals that stop a run: each ends at a step boundary, after a checkpoint, with nothing lost.

- **USR2**, which SLURM sends before a preemption or the time limit (as hydra-submitit-launcher
  configures it): the training loop finishes its step, writes a checkpoint and hands the signal
  to submitit's handler, which requeues the job (same Hydra job, same output directory) and
  exits. The MLflow run stays RUNNING; the requeued job resumes it. Without submitit (USR2 sent
  by hand) ``Preempted`` is raised after the checkpoint instead.
- **SIGTERM** (what ``kill``, container runtimes and schedulers send) and **SIGINT** (Ctrl-C):
  the loop finishes its step, writes a checkpoint, and the run ends KILLED; the process exits
  with 128 + the signal's number. The same command resumes it. A second signal stops at once.
  Inside a SLURM job submitit owns SIGTERM (it ignores it: SLURM sends it just before USR2 on a
  preemption, which is what requeues), and it is left to submitit.
- Outside the training loop (loading models, preparing data, publishing the final model) there is
  no step to finish: SIGTERM and SIGINT stop the run at once, KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTION_SIGNAL = signal.SIGUSR2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """The run stopped for a preemption after writing its checkpoint; run it again to resume."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run (a KeyboardInterrupt, so the MLflow run ends KILLED)."""

    def __init__(self, signum: int, checkpointed: bool) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        done = (
            "after writing a checkpoint; run the same command again to resume"
            if checkpointed
            else "before training started; nothing to checkpoint"
        )
        super().__init__(f"stopped by {name} {done}")


def _owned_by_submitit(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return type(owner).__module__.startswith("submitit")


class StopSignals:
    """Installed for a whole run (phf.run.execute); the training loop defers signals to its step
    boundaries inside ``deferred()``. See the module docstring."""

    PREEMPTION = PREEMPTION_SIGNAL

    def __init__(self) -> None:
        self.pending: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if signum == signal.SIGTERM and _owned_by_submitit(current):
                continue
            self._previous[signum] = current
            signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """While inside, a stop or preemption signal only marks ``requested``."""
        previous_usr2 = signal.getsignal(PREEMPTION_SIGNAL)
        self._previous_usr2 = previous_usr2
        signal.signal(PREEMPTION_SIGNAL, self._handle)
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
            signal.signal(PREEMPTION_SIGNAL, previous_usr2)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._deferring and self.pending is None:
            log.warning("received %s: checkpointing after the current step", name)
            self.pending = signum
            self._frame = frame
            return
        if signum == PREEMPTION_SIGNAL:  # outside the loop: submitit's own handling
            previous = getattr(self, "_previous_usr2", signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            return
        log.warning("received %s: stopping now", name)
        raise Interrupted(signum, checkpointed=False)

    @property
    def requested(self) -> bool:
        return self.pending is not None

    @property
    def preempted(self) -> bool:
        return self.pending == PREEMPTION_SIGNAL

    def hand_over(self, signum: int | None = None) -> None:
        """After the checkpoint: requeue (submitit) or raise Preempted for USR2; raise
        Interrupted for SIGTERM/SIGINT. ``signum`` is the signal all processes of a
        data-parallel run agreed on (phf.distributed.agreed_signal), so a process that did not
        get it itself stops the same way."""
        signum = signum or self.pending or PREEMPTION_SIGNAL
        self._deferring = False
        if signum != PREEMPTION_SIGNAL:
            raise Interrupted(signum, checkpointed=True)
        previous = getattr(self, "_previous_usr2", signal.SIG_DFL)
        signal.signal(PREEMPTION_SIGNAL, previous)
        if callable(previous):
            previous(signum, getattr(self, "_frame", None))  # submitit: requeue, then sys.exit
        raise Preempted(
            f"stopped by {signal.Signals(signum).name} after a checkpoint; run the same command "
            "again (same output directory) to resume"
        )
