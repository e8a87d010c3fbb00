"""Stopping a long job cleanly when the cluster asks: SIGTERM, SIGUSR1 or SIGINT become a request to stop
after the current unit of work (an optimizer step, a batch of samples, a chunk of latents), not a death.

SLURM, at a preemption or the time limit, sends SIGTERM to every task and SIGKILL after a grace period
(``KillWait``, often 30 s); ``#SBATCH --signal=USR1@120`` adds SIGUSR1 that long before the limit. torchrun's
agent forwards SIGTERM and SIGINT to its workers and kills them 30 s later. Each process of a job sees the
signal at its own moment, so :class:`StepAgreement` makes the ranks of a training agree on one last step, and
:class:`BatchAgreement` makes every rank of a batch loop (sampling, encoding) stop within a few seconds of any
rank's signal.

A process stopped this way exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of sysexits.h: a temporary
failure, retry later), which a requeue script tests; its work so far is on disk and a rerun resumes it.

Example:
    >>> import os, signal
    >>> from preemption import StopSignals
    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     stop.requested, stop.first
    (True, 'SIGUSR1')
"""
from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import torch
import torch.distributed as dist

from runtime.distributed import all_reduce_

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "SYNC_SECONDS", "StopSignals", "StepAgreement", "BatchAgreement",
           "Preempted", "exit_preempted", "catches_stop_signals", "ignore_stop_signals"]

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Ranks compare their stop flags about this often: a stop then costs at most this, one step and the save, well
# inside SLURM's usual 30 s KillWait and torchrun's 30 s, while the sync itself is a few bytes every few seconds.
SYNC_SECONDS = 5.0
MAX_SYNC_INTERVAL = 1000  # steps between syncs, at most (very fast steps)


class StopSignals:
    """While active (a context manager), the stop signals are recorded instead of ending the process.

    The handler only appends the signal number: it is safe whatever the process was doing, and a second
    signal while the work is being saved is recorded and otherwise ignored. A DataLoader worker forked while
    this is active inherits the handler, so a signal sent to the whole job does not kill the workers under
    the training loop. Outside the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: list[int] = []
        self._previous: dict[int, Callable | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return bool(self.received)

    @property
    def first(self) -> str | None:
        """The first signal's name, e.g. 'SIGTERM' (None if none arrived)."""
        return signal.Signals(self.received[0]).name if self.received else None

    def later(self) -> list[str]:
        """Names of the signals that arrived after the first one (ignored: the stop was already under way)."""
        return [signal.Signals(signum).name for signum in self.received[1:]]


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores the stop signals, which SLURM sends to every process
    of a job, and leaves the stop to the process that owns it (torch's own SIGTERM handler in the worker would
    otherwise end it, and the main process with "DataLoader worker ... is killed by signal")."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def catches_stop_signals(fn: Callable) -> Callable:
    """``fn(args, stop=StopSignals)`` called as ``fn(args)``, with the stop signals recorded while it runs
    (the previous handlers come back afterwards, however it ends).

    When ``fn`` is the running script's own (``__main__``) and ends with :class:`Preempted`, the stop signals
    stay ignored until the process is gone: torchrun's agent SIGTERMs the other workers as soon as one exits,
    which would otherwise turn their clean exit (status 75, work saved) into a kill."""
    @functools.wraps(fn)
    def wrapper(args: object, *rest: object, **kwargs: object) -> object:
        try:
            with StopSignals() as stop:
                return fn(args, *rest, stop=stop, **kwargs)
        except Preempted:
            if fn.__module__ == "__main__":
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_IGN)
            raise

    return wrapper


class StepAgreement:
    """Decides, identically on every rank, after which step to stop for a signal and when the time-based
    checkpoint cadence (``--ckpt-every-minutes``) is due, without a host sync per step.

    Every ``interval`` steps the ranks all-reduce (max) three numbers: a stop flag, rank 0's "the time
    cadence is due" (rank 0's clock alone: rank clocks differ), and each rank's seconds per step. All ranks
    get the same three numbers, so they take the same decision and compute the same next interval, chosen
    so that the next sync comes about :data:`SYNC_SECONDS` later. A single process checks after every step
    (a Python flag and a clock read: no device sync)."""

    def __init__(self, stop: StopSignals, world_size: int, rank: int, device: torch.device, step: int,
                 save_every_s: float | None, sync_s: float = SYNC_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stop, self.world_size, self.rank, self.device = stop, world_size, rank, device
        self.save_every_s, self.sync_s, self.clock = save_every_s, sync_s, clock
        self.interval = 1
        self.next_check = step + 1
        self.last_check_step, self.last_check_time = step, clock()
        self.last_save_time = self.last_check_time

    def poll(self, step: int) -> tuple[bool, bool]:
        """After optimizer step ``step``: (stop now, save now for the time cadence), the same on every rank."""
        if step < self.next_check:
            return False, False
        now = self.clock()
        due = self.rank == 0 and self.save_every_s is not None and now - self.last_save_time >= self.save_every_s
        per_step = (now - self.last_check_time) / max(step - self.last_check_step, 1)
        stop, due_any, per_step = float(self.stop.requested), float(due), per_step
        if self.world_size > 1:
            flags = torch.tensor([stop, due_any, per_step], dtype=torch.float64, device=self.device)
            stop, due_any, per_step = all_reduce_(flags, op=dist.ReduceOp.MAX).tolist()
            self.interval = max(1, min(MAX_SYNC_INTERVAL, math.floor(self.sync_s / max(per_step, 1e-9))))
        self.next_check = step + self.interval
        self.last_check_step, self.last_check_time = step, now
        return stop > 0, due_any > 0

    def saved(self) -> None:
        """A checkpoint was just written: the time cadence counts from now."""
        self.last_save_time = self.clock()


class BatchAgreement:
    """Makes the ranks of a loop over batches stop together for a signal that reached any of them, within
    about ``sync_s`` seconds and one batch, without a sync per batch; the ranks may have different numbers
    of batches (and skip different ones).

    Call :meth:`poll` before each batch that does work and leave the loop when it says so; then every rank
    calls :meth:`finish`, which says (the same on every rank) whether the loop was stopped. A rank that got
    the signal leaves at once; the others learn it at their next sync. Every ``interval`` batches a rank
    all-reduces (max) its stop flag, whether it still works and its seconds per batch; the interval that
    follows is the same on every rank, chosen so the next sync comes about ``sync_s`` later. A rank that ran
    out of batches keeps answering the others' syncs in :meth:`finish` until no rank works, so the number of
    collectives always matches. A single process checks its flag before every batch (no device sync)."""

    def __init__(self, stop: StopSignals, world_size: int, device: torch.device, sync_s: float = SYNC_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stop, self.world_size, self.device, self.sync_s, self.clock = stop, world_size, device, sync_s, clock
        self.interval, self.since_sync, self.last_sync = 1, 0, clock()
        self.stopped = False  # a sync said some rank stopped
        self.syncs = 0

    def _sync(self, working: bool) -> tuple[bool, bool]:
        """(some rank stopped, some rank still works); also sets the next interval."""
        per_batch = (self.clock() - self.last_sync) / max(self.since_sync, 1) if working else 0.0
        flags = torch.tensor([float(self.stop.requested), float(working), per_batch], dtype=torch.float64,
                             device=self.device)
        stop, working_any, per_batch = all_reduce_(flags, op=dist.ReduceOp.MAX).tolist()
        self.syncs += 1
        self.interval = max(1, min(MAX_SYNC_INTERVAL, math.floor(self.sync_s / max(per_batch, 1e-9))))
        self.since_sync, self.last_sync = 0, self.clock()
        self.stopped = self.stopped or stop > 0
        return stop > 0, working_any > 0

    def poll(self) -> bool:
        """Before a batch: whether to leave the loop now (this rank's own signal, or another's at a sync)."""
        if self.stop.requested or self.stopped:
            return True
        if self.world_size > 1 and self.since_sync >= self.interval:
            self._sync(working=True)
        self.since_sync += 1
        return self.stopped

    def finish(self) -> bool:
        """After the loop, on every rank: whether it was stopped by a signal (to any rank). Also a barrier:
        it returns once every rank has left its loop."""
        if self.world_size == 1:
            return self.stop.requested
        while not self.stopped:
            stop, working = self._sync(working=False)
            if not working:
                return stop
        # Some rank saw the stop at a sync; the others see it at theirs (or here): all leave, none waits.
        return True


class Preempted(SystemExit):
    """The process stopped for a signal after saving its work; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message


def exit_preempted(prog: str, message: str, is_main: bool = True) -> None:
    """One line on stderr (main rank only), then :class:`Preempted` (exit status 75)."""
    if is_main:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise Preempted(message)
