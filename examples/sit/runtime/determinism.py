"""train.py --deterministic: kernels that sum in a fixed order, so that two runs of one command, and a run and
its resume, can agree bit for bit on GPUs as they do on the CPU.

Without it a GPU may sum in an order that changes from run to run: atomics in some backward kernels (cuDNN's
weight gradients, attention backward), and under torch.compile the kernel variant Inductor picks by timing
candidates in each new process. Each difference is in the last bits, then grows as training goes on. What
this sets, before the first kernel runs (train.py calls it from data/streams.py's ``seed_everything``):

- ``torch.use_deterministic_algorithms(True)``: PyTorch's deterministic variants where it has them; an op
  without one raises, naming itself. Strict on purpose: attention's backward (flash, memory-efficient) takes
  its deterministic path only then (with ``warn_only=True`` it warns and keeps the atomic one);
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless it is set: what cuBLAS needs to be reproducible, and what
  PyTorch asks for in this mode;
- cuDNN: deterministic algorithms only, no benchmarking of candidates;
- Inductor's deterministic mode, where the torch release has it (``torch._inductor.config.deterministic``):
  no choice of kernels by timing.

It costs speed (not measured here: no GPU). On the CPU, where these kernels are deterministic already, a run
is the same with and without it (tested).

    >>> import torch
    >>> from runtime.determinism import deterministic_kernels, restore_kernels
    >>> before = deterministic_kernels()
    >>> torch.are_deterministic_algorithms_enabled()
    True
    >>> restore_kernels(before); torch.are_deterministic_algorithms_enabled()
    False
"""
from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["CUBLAS_WORKSPACE", "deterministic_kernels", "restore_kernels"]

CUBLAS_WORKSPACE = ":4096:8"


def _inductor_config() -> Any | None:
    try:
        import torch._inductor.config as config
    except ImportError:  # a torch build without Inductor
        return None
    return config if hasattr(config, "deterministic") else None


def deterministic_kernels() -> dict[str, Any]:
    """Switch every setting above on; returns the settings as they were (for :func:`restore_kernels`)."""
    inductor = _inductor_config()
    before = dict(algorithms=torch.are_deterministic_algorithms_enabled(),
                  warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                  cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                  cudnn=(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
                  inductor=None if inductor is None else inductor.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if inductor is not None:
        inductor.deterministic = True
    return before


def restore_kernels(before: dict[str, Any]) -> None:
    """Put back the settings :func:`deterministic_kernels` returned (tests; a script just exits)."""
    torch.use_deterministic_algorithms(before["algorithms"], warn_only=before["warn_only"])
    if before["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before["cublas"]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before["cudnn"]
    inductor = _inductor_config()
    if inductor is not None and before["inductor"] is not None:
        inductor.deterministic = before["inductor"]
