"""The device setup every benchmark shares: which device, how many CPU threads, TF32, and syncing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def pick_device(name: str | None = "auto", threads: int | None = None) -> torch.device:
    """CUDA when there is one (``"auto"`` / ``None``), else the named device; sets the CPU thread count.

    On CUDA, TF32 is switched on: the reference code trains and samples "fp32" with TF32 matmuls.
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "auto") else name)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def fp32_exact() -> Iterator[None]:
    """TF32 off inside the block (for exact fp32 reference paths), restored afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
