"""Where evaluate_run.py keeps the metrics of a run's checkpoints, so that a rerun computes only what is missing
and results of different settings never mix:

    <run>/metrics/<digest>/settings.json  the settings (evaluation/sample_metrics.metric_settings), their digest
                                          and the reference's path
    <run>/metrics/<digest>/<step>.json    one checkpoint's fid, sfid, precision, recall, fid_seconds (written
                                          atomically once complete: an interrupted evaluation leaves nothing)
    <run>/eval_log.csv                    every result of every settings, rebuilt from those files: one row per
                                          (settings, step), columns step, fid, sfid, precision, recall,
                                          fid_seconds, settings (the digest), checkpoint, then each setting as
                                          fid_<name> (fid_samples, fid_ref, fid_ref_fingerprint, fid_mode, ...)

The digest covers every setting that changes the numbers (the reference by content, so a moved reference
keeps its results); log.csv's FIDs of a run trained with --fid-every have the same settings in args.json's
fid_settings, and the same digest when the settings match.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any

from runtime.atomic import atomic_write
from runtime.checkpoints import ROLLING_FILE
from runtime.checks import checkpoint_paths
from runtime.cli import UsageError

from evaluation.sample_metrics import METRIC_KEYS, settings_digest

__all__ = ["EVAL_LOG", "SETTINGS_FILE", "run_checkpoints", "prepare_folder", "done_steps", "write_result",
           "write_eval_log"]

EVAL_LOG = "eval_log.csv"
SETTINGS_FILE = "settings.json"
FIRST_COLUMNS = ["step", *METRIC_KEYS, "fid_seconds", "settings", "checkpoint"]


def run_checkpoints(run: str, steps: list[int] | None) -> dict[int, str]:
    """{step: path} of the checkpoints to evaluate: the given steps, or every milestone (those of --ckpt-every and
    the last step; the rolling ones of --ckpt-every-minutes and of stops, which --keep-last deletes, are left
    out). cli.UsageError when the run has none, or lacks a step asked for."""
    folder = os.path.join(run, "checkpoints")
    if not os.path.isdir(run) or not os.path.isdir(folder):
        raise UsageError(f"{run} is no train.py run folder (it has no checkpoints/): pass <results-dir>/<exp-name>")
    found = {int(os.path.basename(path)[:-3]): path for path in checkpoint_paths(folder)}
    if steps is not None:
        missing = sorted(set(steps) - set(found))
        if missing:
            raise UsageError(f"--steps {missing[0]}: {folder} has no checkpoint of that step (it has "
                             f"{', '.join(map(str, sorted(found))) or 'none'})")
        return {step: found[step] for step in sorted(set(steps))}
    rolling = set()
    if os.path.exists(os.path.join(folder, ROLLING_FILE)):
        try:
            with open(os.path.join(folder, ROLLING_FILE)) as f:
                rolling = {int(name[:-3]) for name in json.load(f) if re.fullmatch(r"\d+\.pt", str(name))}
        except (ValueError, OSError) as error:
            raise UsageError(f"{folder}/{ROLLING_FILE} is unreadable ({error}): pass --steps") from error
    chosen = {step: path for step, path in sorted(found.items()) if step not in rolling}
    if not chosen:
        raise UsageError(f"{folder} holds no milestone checkpoint: pass --steps to evaluate rolling ones")
    return chosen


def prepare_folder(run: str, settings: dict[str, Any], ref_path: str) -> str:
    """<run>/metrics/<digest>/ with its settings.json (made, or checked when it exists); returns the folder."""
    digest = settings_digest(settings)
    folder = os.path.join(run, "metrics", digest)
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)["settings"]
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise UsageError(f"{path} is unreadable ({error}): its results cannot be trusted; delete {folder}") \
                from error
        if old != settings:
            raise UsageError(f"{path} holds other settings under the digest {digest}: delete {folder}")
        return folder
    os.makedirs(folder, exist_ok=True)
    with atomic_write(path) as f:
        f.write(json.dumps(dict(digest=digest, settings=settings, ref=ref_path), indent=1).encode())
    return folder


def _result_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"{step:07d}.json")


def done_steps(folder: str) -> set[int]:
    """The steps whose results the folder holds."""
    if not os.path.isdir(folder):
        return set()
    return {int(name[:-5]) for name in os.listdir(folder) if re.fullmatch(r"\d{7,}\.json", name)}


def write_result(folder: str, step: int, result: dict[str, float], checkpoint: str, extra: dict[str, Any]) -> str:
    """<folder>/<step>.json, atomically."""
    path = _result_path(folder, step)
    with atomic_write(path) as f:
        f.write(json.dumps(dict(step=step, checkpoint=os.path.abspath(checkpoint), **result, **extra),
                           indent=1).encode())
    return path


def write_eval_log(run: str) -> str:
    """Rebuild <run>/eval_log.csv from every settings folder's results (atomically); returns its path."""
    rows, setting_columns = [], []
    root = os.path.join(run, "metrics")
    for digest in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, digest)
        if not os.path.isfile(os.path.join(folder, SETTINGS_FILE)):
            continue
        with open(os.path.join(folder, SETTINGS_FILE)) as f:
            record = json.load(f)
        settings = dict(ref=record.get("ref"), **record["settings"])
        columns = {f"fid_{key}": json.dumps(value) if isinstance(value, list) else value
                   for key, value in settings.items()}
        setting_columns += [key for key in columns if key not in setting_columns]
        for step in sorted(done_steps(folder)):
            with open(_result_path(folder, step)) as f:
                result = json.load(f)
            rows.append(dict({key: result.get(key) for key in FIRST_COLUMNS}, settings=digest, **columns))
    rows.sort(key=lambda row: (row["settings"], row["step"]))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=FIRST_COLUMNS + setting_columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    path = os.path.join(run, EVAL_LOG)
    with atomic_write(path) as f:
        f.write(text.getvalue().encode())
    return path
