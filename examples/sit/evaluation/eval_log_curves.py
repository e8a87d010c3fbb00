"""The sample-quality points of a run for compare_runs.py: log.csv's (train.py --fid-every) and eval_log.csv's
(evaluate_run.py on its checkpoints), under one comparable description of how they were measured.

Two runs' FIDs compare only when drawn and scored alike: the same sample count, reference (by content), sampler,
guidance and precision. ``comparable_settings`` turns a run's settings (args.json's ``fid_settings``, or the
``fid_<name>`` columns of one eval_log.csv settings group) into one string that holds all of them (the
sampling seed --fid-global-seed included: arms compare best on the same noise) but the reference's path (a
moved reference keeps its content); compare_runs.py refuses runs whose strings differ, naming the settings.
"""
from __future__ import annotations

import json
import os
from typing import Any

from runtime.cli import UsageError
from runtime.run_log import read_rows

EVAL_LOG = "eval_log.csv"
NOT_COMPARED = frozenset({"ref"})  # the reference is compared by content (ref_fingerprint): its path may move


def _canonical_value(value: Any) -> str:
    """How eval_log.csv writes a setting: lists as JSON, None as an empty cell, the rest as str()."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list) else str(value)


def comparable_settings(settings: dict[str, Any]) -> str:
    """One string for the settings that must match between compared runs.

    >>> comparable_settings({"samples": 10000, "ref": "a.npz", "num_steps": None, "mode": "ode"})
    'mode=ode, samples=10000'
    """
    # An unset setting (None) and one an older record lacks are the same: both leave an empty eval_log.csv cell.
    return ", ".join(f"{key}={_canonical_value(value)}" for key, value in sorted(settings.items())
                     if key not in NOT_COMPARED and _canonical_value(value) != "")


def differing_settings(a: str, b: str) -> str:
    """The items of two comparable_settings strings that differ, for an error message.

    >>> differing_settings("samples=10000, num_steps=250", "samples=5000, num_steps=250")
    'samples=10000 vs samples=5000'
    """
    left, right = a.split(", "), b.split(", ")
    only_a = [item for item in left if item not in right]
    only_b = [item for item in right if item not in left]
    return f"{'; '.join(only_a) or '(none)'} vs {'; '.join(only_b) or '(none)'}"


def eval_log_groups(run: str) -> dict[str, tuple[str, list[dict[str, str]]]]:
    """eval_log.csv's rows by settings digest: {digest: (comparable settings, rows)}; {} without the file."""
    path = os.path.join(run, EVAL_LOG)
    if not os.path.isfile(path):
        return {}
    groups: dict[str, tuple[str, list[dict[str, str]]]] = {}
    for row in read_rows(path)[1]:
        settings = {key.removeprefix("fid_"): value for key, value in row.items()
                    if key.startswith("fid_") and key != "fid_seconds"}
        groups.setdefault(row.get("settings") or "", (comparable_settings(settings), []))[1].append(row)
    return groups


def eval_log_points(run: str, metric: str, digest: str | None,
                    trained_with: str | None) -> tuple[list[int], list[float], str | None]:
    """(steps, values, comparable settings) of ``metric`` from eval_log.csv's settings group: ``digest`` when
    given, else the group measured as log.csv's FIDs were (``trained_with``), else the only group. No file, or
    no such group: empty points and None; several groups and none chosen: UsageError naming the digests."""
    groups = eval_log_groups(run)
    if digest is not None:
        if digest not in groups:
            raise UsageError(f"{run}/{EVAL_LOG} has no results of settings {digest!r}; it has: "
                             f"{', '.join(groups) or 'none'}")
        chosen = digest
    else:
        matching = [key for key, (settings, _) in groups.items() if settings == trained_with]
        if matching:
            chosen = matching[0]
        elif len(groups) == 1:
            chosen = next(iter(groups))
        elif not groups:
            return [], [], None
        else:
            raise UsageError(f"{run}/{EVAL_LOG} holds results of {len(groups)} settings ({', '.join(groups)}): "
                             "choose one with --fid-settings DIGEST (evaluate_run.py prints it; "
                             f"{run}/metrics/<digest>/settings.json says what it is)")
    settings, rows = groups[chosen]
    steps, values = [], []
    for row in rows:
        cell = (row.get(metric) or "").strip()
        if cell:
            steps.append(int(row["step"]))
            values.append(float(cell))
    return steps, values, settings
