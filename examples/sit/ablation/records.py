"""The ablation's records on disk: one JSON per (dataset, seed, arm), reused when its config matches.

    <out>/runs/<dataset>/seed<k>/<arm>.json

A record holds the arm's curves (held-out FM loss, norms, fraction below alpha at every evaluation), its
checksums and timing, and ``config`` (the budget's cache key): a rerun with the same budget trains only
the records that are missing, and one with another budget or size retrains.
"""
from __future__ import annotations

import json
import os

from runtime.atomic import atomic_write

from ablation.arms import Arm, Budget

__all__ = ["run_path", "write_record", "read_record", "load_runs"]


def run_path(out_dir: str, dataset: str, seed: int, arm: str) -> str:
    """Where the record of one (dataset, seed, arm) lives."""
    return os.path.join(out_dir, "runs", dataset, f"seed{seed}", f"{arm}.json")


def write_record(out_dir: str, record: dict) -> str:
    """Write ``record`` (with its dataset, seed and name) atomically; returns its path."""
    path = run_path(out_dir, record["dataset"], record["seed"], record["name"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:  # a crash never leaves a half-written cache entry
        f.write(json.dumps(record).encode())
    return path


def read_record(out_dir: str, dataset: str, seed: int, arm: str, budget: Budget,
                uses_encoder: bool = True) -> dict | None:
    """The cached record, or None if there is none or it was trained with another config (the encoder counts
    only where the arm ``uses_encoder``: Budget.cache_key)."""
    path = run_path(out_dir, dataset, seed, arm)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    wanted = json.loads(json.dumps(budget.cache_key(uses_encoder)))  # as stored: tuples became lists
    return record if record.get("config") == wanted else None


def load_runs(out_dir: str, budget: Budget, arms: list[Arm]) -> dict:
    """runs[dataset][arm name][seed] = the cached record, for the runs that exist with this config."""
    runs: dict = {}
    for dataset in budget.datasets:
        for arm in arms:
            for seed in budget.seeds:
                record = read_record(out_dir, dataset, seed, arm.name, budget, arm.repa)
                if record is not None:
                    runs.setdefault(dataset, {}).setdefault(arm.name, {})[seed] = record
    return runs
