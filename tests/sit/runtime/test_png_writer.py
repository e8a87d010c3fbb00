"""runtime/png_writer.py: PNGs written by threads are byte for byte the sampling loop's, the queue is bounded,
the folder is fsynced per batch instead of per file, and a write's error reaches the sampling loop."""
from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime import png_writer
from runtime.cli import UsageError
from runtime.png_writer import PngWriter, save_png


def images(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_threads_write_the_bytes_save_png_writes(tmp_path: Path) -> None:
    batch = images()
    for i, image in enumerate(batch):
        save_png(image, str(tmp_path / f"ref{i}.png"))
    with PngWriter(threads=3, max_pending=4) as writer:
        for i, image in enumerate(batch):
            writer.submit(image, str(tmp_path / f"{i}.png"))
        writer.flush()
        assert writer.written == len(batch)
    for i in range(len(batch)):
        assert (tmp_path / f"{i}.png").read_bytes() == (tmp_path / f"ref{i}.png").read_bytes()
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_the_queue_is_bounded(tmp_path: Path, monkeypatch) -> None:
    """A slow disk makes submit wait: never more than max_pending images queued or being written."""
    lock, busy, most = threading.Lock(), [0], [0]
    real = png_writer.save_png

    def slow(image, path, sync_folder=True):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.02)
        real(image, path, sync_folder)
        with lock:
            busy[0] -= 1

    monkeypatch.setattr(png_writer, "save_png", slow)
    pending = []
    with PngWriter(threads=2, max_pending=3) as writer:
        real_submit = writer._pool.submit

        def counting_submit(*args, **kwargs):
            pending.append(len([f for f in writer._futures if not f.done()]))
            return real_submit(*args, **kwargs)

        writer._pool.submit = counting_submit
        for i, image in enumerate(images(20)):
            writer.submit(image, str(tmp_path / f"{i}.png"))
    assert max(pending) <= 3 and most[0] <= 2 and len(os.listdir(tmp_path)) == 20


def test_the_folder_is_fsynced_per_batch_not_per_file(tmp_path: Path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(png_writer, "fsync_folder", lambda folder: synced.append(folder))
    monkeypatch.setattr("runtime.atomic.fsync_folder", lambda folder: synced.append(("per file", folder)))
    with PngWriter(threads=2, max_pending=8, sync_every=4) as writer:
        for i, image in enumerate(images(10)):
            writer.submit(image, str(tmp_path / f"{i}.png"))
    assert synced == [str(tmp_path)] * 3  # after the 4th and 8th PNG, and the last two at the end


def test_a_full_disk_reaches_the_sampling_loop_and_leaves_no_partial_png(tmp_path: Path, monkeypatch) -> None:
    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UsageError, match="no space left"), PngWriter(threads=2, max_pending=2) as writer:
        for i, image in enumerate(images(6)):
            writer.submit(image, str(tmp_path / f"{i}.png"))
        writer.flush()
    assert os.listdir(tmp_path) == []


def test_no_threads_writes_in_the_callers_thread(tmp_path: Path) -> None:
    seen = []
    real = png_writer.save_png
    png_writer.save_png = lambda image, path, sync_folder=True: (seen.append(threading.current_thread()),
                                                                 real(image, path, sync_folder))
    try:
        with PngWriter(threads=0) as writer:
            writer.submit(images(1)[0], str(tmp_path / "0.png"))
    finally:
        png_writer.save_png = real
    assert seen == [threading.current_thread()] and os.listdir(tmp_path) == ["0.png"]
