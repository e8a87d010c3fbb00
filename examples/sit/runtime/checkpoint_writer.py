"""Writing checkpoints without stopping training for the disk: a copy of the state in host memory, written by a
background thread, one checkpoint at a time.

A checkpoint of SiT-XL/2 (weights, EMA and AdamW's two moments) is 10.8 GB: at the write rates of cluster file
systems that is minutes of a paused run, and every other rank waiting for rank 0 in a collective meanwhile.
:class:`CheckpointWriter` takes a copy of the state (:func:`to_host`: a few seconds from GPU memory) and writes
it in a thread while training goes on. Every write goes through :func:`write_state`: an atomic, fsynced
rename (runtime/atomic.py), so a checkpoint is complete under its name or absent, whatever happens to the
process; a write still running when the process is killed leaves only a temp file, which ``--resume auto``
never picks and the next start removes.

A rolling write (the time cadence) that is still running when a synchronous checkpoint is asked for (a stop,
the last step) is abandoned: the new checkpoint supersedes it, and the stop's write need not wait for it.

Example:
    >>> import os, tempfile, torch
    >>> from checkpoint_writer import CheckpointWriter
    >>> writer, folder = CheckpointWriter(), tempfile.mkdtemp()
    >>> writer.submit(os.path.join(folder, "0000010.pt"), {"w": torch.ones(3)}, rolling=True)
    >>> writer.wait()
    ('', None)
    >>> sorted(os.listdir(folder))
    ['0000010.pt']
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from runtime.atomic import atomic_write
from runtime.cli import UsageError

__all__ = ["CheckpointWriter", "to_host", "write_state", "WriteStats"]


def to_host(state: Any) -> Any:
    """``state`` with every tensor replaced by a CPU copy of its own (containers rebuilt, other values kept):
    training may change the originals in place while the copy is written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):  # OrderedDict (state dicts) stays one: load_state_dict keeps its order
        copied = {key: to_host(value) for key, value in state.items()}
        return copied if type(state) is dict else type(state)(copied)
    if isinstance(state, (list, tuple)):
        return type(state)(to_host(value) for value in state)
    return state


class WriteStats:
    """Size and duration of one checkpoint write, for log.txt: the rate a stop's write can count on."""

    def __init__(self, path: str, seconds: float) -> None:
        self.path, self.seconds = path, seconds
        self.bytes = os.path.getsize(path)

    def describe(self) -> str:
        """e.g. '10.80 GB in 54.0 s, 200 MB/s'."""
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 1e9 else f"{self.bytes / 1e6:.1f} MB"
        return f"{size} in {self.seconds:.1f} s, {self.bytes / max(self.seconds, 1e-9) / 1e6:.0f} MB/s"


class _Abandonable:
    """A file whose writes fail once ``abandoned()`` holds, so that torch.save stops mid-file."""

    def __init__(self, f: BinaryIO, abandoned: Callable[[], bool]) -> None:
        self.f, self.abandoned = f, abandoned

    def write(self, data: bytes) -> int:
        if self.abandoned():
            raise InterruptedError("checkpoint write abandoned")
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str) -> Any:  # the rest of the file's interface (name, fileno, ...)
        return getattr(self.f, name)


def write_state(path: str, state: Any, abandoned: Callable[[], bool] | None = None) -> WriteStats:
    """torch.save(state) to path, atomically and durably (fsync, rename, folder fsync); returns its size and
    duration. A full disk raises cli.UsageError naming path. With ``abandoned``, the write stops (raising,
    leaving nothing) once it returns True."""
    start = time.monotonic()
    with atomic_write(path) as f:
        torch.save(state, _Abandonable(f, abandoned) if abandoned is not None else f)
    return WriteStats(path, time.monotonic() - start)


class CheckpointWriter:
    """At most one checkpoint being written in a background thread (on the rank that writes them).

    :meth:`submit` starts writing a host copy; :meth:`wait` (before the next checkpoint, and before the process
    leaves) returns the failure of the write in flight, if any, once it has ended. :meth:`after` runs code once
    a checkpoint is on disk (pruning older ones, a log line), in the writer thread for a background write. The
    thread is not a daemon: an interpreter that exits during a write first lets it finish."""

    def __init__(self, write: Callable[[str, Any, Callable[[], bool] | None], WriteStats] = write_state) -> None:
        self.write = write
        self._thread: threading.Thread | None = None
        self._path: str | None = None
        self._rolling = False
        self._abandon = threading.Event()
        self._failure = ""
        self._then: list[Callable[[WriteStats | None], None]] = []
        self._lock = threading.Lock()
        self.last: WriteStats | None = None  # the newest write that completed, background or not

    @property
    def pending(self) -> str | None:
        """The path being written in the background, or None."""
        return self._path if self._thread is not None and self._thread.is_alive() else None

    def write_now(self, path: str, state: Any) -> WriteStats:
        """Write ``state`` to ``path`` in this thread (a stop's checkpoint, the last step's): on disk when this
        returns. Call :meth:`wait` first."""
        if self._thread is not None:
            raise RuntimeError("CheckpointWriter.write_now while a write is in flight: wait() first")
        self.last = self.write(path, state, None)
        return self.last

    def submit(self, path: str, state: Any, rolling: bool) -> None:
        """Write ``state`` (a host copy: :func:`to_host`) to ``path`` in the background; rolling: a checkpoint
        a synchronous one may supersede. Call :meth:`wait` first: one write at a time."""
        if self._thread is not None:
            raise RuntimeError("CheckpointWriter.submit while a write is in flight: wait() first")
        self._path, self._rolling, self._failure, self._then = path, rolling, "", []
        self._abandon.clear()
        self._thread = threading.Thread(target=self._run, args=(path, state), name="checkpoint-writer")
        self._thread.start()

    def _run(self, path: str, state: Any) -> None:
        try:
            stats = self.write(path, state, self._abandon.is_set)
        except BaseException as error:  # noqa: BLE001 — reported by wait(), on the training thread
            if not self._abandon.is_set():  # an abandoned write fails by design (torch.save says "unexpected pos")
                self._failure = str(error) if isinstance(error, UsageError) else \
                    f"cannot write checkpoint {path} ({error}): fix the folder and resume with --resume auto"
            return
        with self._lock:
            then, self._then = self._then, []
            self._path, self.last = None, stats  # from here on, after() runs its code at once
        try:
            for fn in then:
                fn(stats)
        except BaseException as error:  # noqa: BLE001
            self._failure = f"after writing checkpoint {path}: {error}"

    def after(self, path: str, fn: Callable[[WriteStats | None], None]) -> None:
        """Run fn(stats) once ``path`` is on disk: in the writer thread when it is being written in the
        background, else now (stats: its write's, if it was the newest one; None when it is not known)."""
        with self._lock:
            if self._thread is not None and self._path == path:
                self._then.append(fn)
                return
        fn(self.last if self.last is not None and self.last.path == path else None)

    def wait(self, abandon_rolling: bool = False) -> tuple[str, str | None]:
        """End the write in flight, if any: (its failure or "", the path abandoned or None). With
        ``abandon_rolling``, a rolling write is stopped where it is (its temp file removed) instead of
        completed; a milestone is always completed."""
        if self._thread is None:
            return "", None
        abandoned = None
        if abandon_rolling and self._rolling and self._thread.is_alive():
            self._abandon.set()
            abandoned = self._path
        self._thread.join()
        if abandoned is not None and self._path is None:  # it had finished before the abandon reached it
            abandoned = None
        self._thread, self._path = None, None
        return self._failure, abandoned
