"""Writing sample PNGs in worker threads, off the sampling loop, with a bounded queue.

sample_ddp.py used to encode each PNG and fsync it (file and folder) before the next batch could start: on a
GPU the network waited for the disk. :class:`PngWriter` hands each image to a thread pool instead; the
sampling loop blocks only when ``max_pending`` images are still waiting to be written, so memory stays
bounded whatever the disk's pace. The bytes are those of :func:`save_png` (the same PIL call).

Durability: every PNG is written to a temp file, fsynced and renamed (runtime/atomic.py), so a sample's name
never holds a partial PNG, as before. The folder itself, which makes the renames survive a power loss, is
fsynced once per ``sync_every`` PNGs and at :meth:`PngWriter.flush` instead of after every file: a power
loss can forget the names of the last PNGs written, which the rerun then samples again.

Example:
    >>> import os, tempfile, numpy as np
    >>> from png_writer import PngWriter
    >>> folder = tempfile.mkdtemp()
    >>> with PngWriter(threads=2, max_pending=4) as writer:
    ...     writer.submit(np.zeros((8, 8, 3), np.uint8), os.path.join(folder, "000000.png"))
    ...     writer.flush()
    >>> os.listdir(folder)
    ['000000.png']
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from runtime.atomic import atomic_write, fsync_folder

__all__ = ["PngWriter", "save_png"]


def save_png(image: np.ndarray, path: str, sync_folder: bool = True) -> None:
    """Write one uint8 (H, W, 3) image as a PNG, atomically: an interrupted run or a full disk never leaves a
    partial PNG under path (full disk: cli.UsageError naming it). sync_folder=False leaves the folder's fsync
    to the caller."""
    with atomic_write(path, sync_folder=sync_folder) as f:
        Image.fromarray(image).save(f, format="PNG")


class PngWriter:
    """PNG writes in ``threads`` worker threads (0: in the caller's thread, as a plain loop would), at most
    ``max_pending`` images queued or in progress. A write's error (a full disk) is raised in the caller's
    thread by the next :meth:`submit` or by :meth:`flush`. As a context manager, leaving it waits for the
    writes already started (their files complete or absent) and stops the threads."""

    def __init__(self, threads: int = 4, max_pending: int = 64, sync_every: int = 64) -> None:
        if threads < 0 or max_pending < 1 or sync_every < 1:
            raise ValueError(f"threads >= 0, max_pending >= 1, sync_every >= 1; got {threads}, {max_pending}, "
                             f"{sync_every}")
        self.threads, self.sync_every = threads, sync_every
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="png") if threads else None
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._unsynced: dict[str, int] = {}  # folder -> PNGs renamed there since its last fsync
        self.written = 0

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc_info[0] is not None)
        if exc_info[0] is None:
            self.flush()

    def submit(self, image: np.ndarray, path: str) -> None:
        """Queue image for path (blocks while max_pending images wait); the caller must not change image
        afterwards."""
        self._raise_failed()
        if self._pool is None:
            self._write(image, path)
            return
        self._slots.acquire()
        future = self._pool.submit(self._write, image, path)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _write(self, image: np.ndarray, path: str) -> None:
        save_png(image, path, sync_folder=False)
        folder = os.path.dirname(os.path.abspath(path))
        with self._lock:
            self.written += 1
            self._unsynced[folder] = self._unsynced.get(folder, 0) + 1
            due = self._unsynced[folder] >= self.sync_every
            if due:
                self._unsynced[folder] = 0
        if due:
            fsync_folder(folder)

    def _raise_failed(self) -> None:
        """Raise the first error of a finished write; forget the finished ones."""
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()

    def flush(self) -> None:
        """Return once every PNG submitted so far is written and its folder fsynced; raise a write's error."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()
        with self._lock:
            folders = [folder for folder, count in self._unsynced.items() if count]
            self._unsynced.clear()
        for folder in folders:
            fsync_folder(folder)
