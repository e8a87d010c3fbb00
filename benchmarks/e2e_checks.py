"""What benchmarks/example_e2e.py checks about the runs it launches: checkpoints compared key by key, a run's
steps and write times read from its log.txt and log.csv, and the signalling of a whole process tree.

    >>> import torch
    >>> from e2e_checks import compare_states
    >>> compare_states({"model": {"w": torch.ones(2)}}, {"model": {"w": torch.tensor([1.0, 1.5])}})["max_abs_diff"]
    {'model': 0.5}
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch
from runtime.run_log import read_rows  # examples/sit on sys.path (example_e2e.py, tests/sit)

__all__ = ["compare_states", "logged_step", "last_write_seconds", "parents", "process_tree", "steps_per_sec",
           "signal_tree", "stop_budget", "worker_exit_codes"]

CHECKPOINT_KEYS = ("model", "ema", "opt", "rng", "anm", "terms", "step", "epoch", "epoch_step")


def compare_states(a: dict, b: dict, keys: tuple[str, ...] = CHECKPOINT_KEYS, listed: int = 8) -> dict:
    """Two checkpoints (or any nested dicts of tensors) key by key: ``bit_exact`` over ``keys`` present in
    either, the largest absolute difference of the tensors under each top-level key (0.0 when equal), and
    the first ``listed`` paths that differ.

    Example:
        >>> import torch
        >>> compare_states({"step": 3, "model": {"w": torch.ones(1)}}, {"step": 4, "model": {"w": torch.ones(1)}})
        {'bit_exact': False, 'max_abs_diff': {'model': 0.0}, 'differing': ['step: 3 != 4']}
    """
    differing: list[str] = []
    max_abs: dict[str, float] = {}
    for key in keys:
        if key not in a and key not in b:
            continue
        if (key in a) != (key in b):
            differing.append(f"{key}: in one checkpoint only")
            continue
        worst = _compare(a[key], b[key], key, differing)
        if worst is not None:
            max_abs[key] = worst
    return dict(bit_exact=not differing, max_abs_diff=max_abs, differing=differing[:listed])


def _compare(a, b, where: str, differing: list[str]) -> float | None:
    """Append the paths under ``where`` that differ; return the largest tensor difference (None: no tensor)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            differing.append(f"{where}: {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}")
            return float("inf")
        if torch.equal(a, b):
            return 0.0
        differing.append(where)
        if not a.is_floating_point():
            return float("inf") if a.dtype == torch.bool else float((a.long() - b.long()).abs().max())
        return float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            differing.append(f"{where}: keys differ")
        parts = [_compare(a[k], b[k], f"{where}/{k}", differing) for k in a if k in b]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        parts = [_compare(x, y, f"{where}[{i}]", differing) for i, (x, y) in enumerate(zip(a, b, strict=True))]
    else:
        if a != b:
            differing.append(f"{where}: {a!r} != {b!r}")
        return None
    values = [part for part in parts if part is not None]
    return max(values) if values else None


def logged_step(log_txt: Path) -> int:
    """The newest step log.txt has a loss line for (0 before the first, or before log.txt exists)."""
    try:
        steps = re.findall(r"\(step=(\d+)\) FM loss", log_txt.read_text())
    except FileNotFoundError:
        return 0
    return int(steps[-1]) if steps else 0


def last_write_seconds(log_txt: Path) -> float | None:
    """How long the newest checkpoint named in log.txt took to write ("Saved checkpoint to ... in X s"); None
    without one (or without log.txt)."""
    try:
        times = re.findall(r"Saved checkpoint to .* in ([0-9.]+) s", log_txt.read_text())
    except FileNotFoundError:
        return None
    return float(times[-1]) if times else None


def steps_per_sec(log_csv: Path) -> float | None:
    """steps_per_sec of log.csv's last row that has it (the training rate, compilation left out); None without
    one (or without log.csv)."""
    try:
        rows = read_rows(str(log_csv))[1]
    except FileNotFoundError:
        return None
    rates = [float(row["steps_per_sec"]) for row in rows if row.get("steps_per_sec")]
    return rates[-1] if rates and rates[-1] > 0 else None


def stop_budget(sync_seconds: float, step_seconds: float | None, write_seconds: float | None) -> float | None:
    """What docs/sit.md ("How long a stop takes") says a stop costs: the ranks' next agreement, one step and
    the checkpoint's write (None when one of them is unknown).

    Example:
        >>> stop_budget(5.0, 0.5, 2.0)
        7.5
    """
    if step_seconds is None or write_seconds is None:
        return None
    return sync_seconds + step_seconds + write_seconds


def worker_exit_codes(output: str) -> list[int]:
    """The exit codes torchrun's failure report lists for its workers (``exitcode  : 75``)."""
    return [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", output)]


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process in /proc now (one that ends while being read is left out)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                found[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc (torchrun starts its workers with setsid: no process group holds
    them all)."""
    children: dict[int, list[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def signal_tree(pid: int, sig: signal.Signals) -> int:
    """Send ``sig`` to pid and every descendant, as SLURM signals every process of a job step; returns how
    many processes it reached."""
    reached = 0
    for member in process_tree(pid):
        try:
            os.kill(member, sig)
            reached += 1
        except ProcessLookupError:
            pass
    return reached
