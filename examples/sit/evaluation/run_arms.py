"""train.py runs as compare_runs.py reads them: a run folder's settings (args.json) and one metric column
of its log.csv, and the runs grouped into arms, each arm one setting trained with one or more seeds.

Every key of args.json falls in one of four classes for a comparison (train.py's own classes, for a resume,
are in runtime/run_flags.py):

- ignored: how and where a stretch of a run was carried out (run_flags.OPERATIONAL: results folder, name,
  resume, logging, evaluation and checkpoint cadences, workers, loggers, progress, ...);
- the seed (``global_seed``): runs that differ only in it and in ignored keys are one arm;
- comparable (:data:`COMPARABLE`, plus the metric's own evaluation settings, :func:`metric_settings`): what
  must be equal for two curves to be compared at all — data, model, optimisation. A difference is refused,
  naming the flag and both values, or with ``force`` listed as a warning;
- everything else (ANM and its settings, precision, gradient clipping, label dropout, any key unknown here)
  defines an arm: the arm's label names each one whose value differs from the baseline's.

    runs = [load_run(path, "heldout_fm_loss_ema") for path in ("results/anm-s0", "results/anm-s1")]
    base = [load_run("results/base-s0", "heldout_fm_loss_ema")]
    grouping = group_arms(runs, base, "heldout_fm_loss_ema")   # grouping.arms[0].label == "anm (...)"
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from runtime.cli import UsageError
from runtime.run_flags import GIVEN_KEY, LOCATIONS, OPERATIONAL
from runtime.run_log import read_rows

from evaluation.eval_log_curves import EVAL_LOG, comparable_settings, differing_settings, eval_log_points
from evaluation.speedup import Curve, clean_curve

__all__ = ["COMPARABLE", "SEED", "Run", "Arm", "Grouping", "metric_settings", "load_run", "group_arms", "flag"]

SEED = "global_seed"
COMPARABLE = frozenset({
    "data", "data_path", "image_size", "data_size", "vae",
    "model", "hidden_size", "depth", "num_heads", "path_type", "prediction",
    "global_batch_size", "lr", "weight_decay", "ema_decay",
})
# Sample-quality columns whose values depend on how the samples were drawn and scored: every args.json key
# starting with "fid_" (sample count, reference batch, sampler settings) is one of their settings.
SAMPLE_METRICS = frozenset({"fid", "sfid", "precision", "recall", "kid", "inception"})
MIN_VALUES = 2  # one point is no curve
ABSENT = "(absent)"  # the value of a key an older run's args.json does not hold
# How a run's sample metrics were measured (evaluation/eval_log_curves.py), added to its args when they are read.
SAMPLE_SETTINGS = "sample_metric_settings"
# --fid-* keys that do not change the numbers: the cadence, the batch (SAMPLE_SETTINGS has it where it matters:
# an adaptive solver) and the record of them all with this run's sampling seed.
NOT_SAMPLE_SETTINGS = frozenset({"fid_every", "fid_per_proc_batch_size", "fid_settings"})


def flag(key: str) -> str:
    """The command-line flag of an args.json key: ``lr`` -> ``--lr``."""
    return "--" + key.replace("_", "-")


def metric_settings(metric: str, keys: set[str]) -> set[str]:
    """The args.json keys among ``keys`` that set how ``metric`` is measured (they must match between runs).

    Example: metric_settings("heldout_fm_loss_ema", {"eval_samples", "lr"}) == {"eval_samples"}
    """
    if metric.startswith("heldout"):
        return {"eval_samples", "eval_data_path"} & keys
    if is_sample_metric(metric):  # the flags, and what the results' own records say (SAMPLE_SETTINGS)
        return ({SAMPLE_SETTINGS} | {key for key in keys if key.startswith("fid_")}) - NOT_SAMPLE_SETTINGS
    return set()


def is_sample_metric(metric: str) -> bool:
    """Whether ``metric`` is a sample-quality column (fid, sfid, precision, recall, ...)."""
    return re.split(r"[_/.\-]", metric.lower())[0] in SAMPLE_METRICS


@dataclass(frozen=True)
class Run:
    """One run folder: its args.json and the usable points of one log.csv column."""

    path: str
    args: dict[str, Any]
    curve: Curve

    @property
    def seed(self) -> Any:
        return self.args.get(SEED, ABSENT)


def _read_args(path: str) -> dict[str, Any]:
    args_json = os.path.join(path, "args.json")
    if not os.path.isfile(args_json):
        raise UsageError(f"{path} has no args.json, so it is not a train.py run folder: pass "
                         "<results-dir>/<exp-name> of a run (train.py writes args.json when it starts)")
    try:
        with open(args_json) as f:
            args = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {args_json} ({error}): pass another run folder") from error
    if not isinstance(args, dict):
        raise UsageError(f"{args_json} does not hold train.py's flags (a JSON object): pass another run folder")
    return args


def _heldout_hint(metric: str) -> str:
    return " (train.py logs held-out losses only with --eval-every > 0)" if metric.startswith("heldout") else ""


def _read_column(path: str, metric: str) -> Curve:
    log_csv = os.path.join(path, "log.csv")
    if not os.path.isfile(log_csv):
        raise UsageError(f"{path} has no log.csv: the run has logged nothing yet (train.py writes a row every "
                         "--log-every steps); wait for its first rows or pass another run")
    columns, rows = read_rows(log_csv)  # complete rows: one cut short by a kill is left out
    if metric not in columns:
        raise UsageError(f"{log_csv} has no column {metric!r}{_heldout_hint(metric)}; its columns: "
                         f"{', '.join(columns)}")
    steps, values = [], []
    for row in rows:
        cell = row[metric].strip()
        if not cell:  # another cadence's row
            continue
        try:
            values.append(float(cell))
        except ValueError:
            raise UsageError(f"{log_csv} step {row['step']}: {metric} is {cell!r}, not a number") from None
        steps.append(int(row["step"]))
    return clean_curve(steps, values)


def load_run(path: str, metric: str, fid_settings: str | None = None) -> Run:
    """A run folder's args.json and the usable points of ``metric`` in its log.csv (steps > 0, values
    present and finite, the last row of a repeated step); UsageError naming the fix for anything missing.
    A sample metric (fid, sfid, precision, recall) also takes evaluate_run.py's points from eval_log.csv (the
    settings group ``fid_settings``, a digest, or the one measured as log.csv's), and records how they were
    measured in the run's args (SAMPLE_SETTINGS) for the comparability check."""
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such folder; pass a train.py run folder (<results-dir>/<exp-name>, "
                         "holding args.json and log.csv)")
    args = _read_args(path)
    if is_sample_metric(metric):
        return _load_sample_metric_run(path, args, metric, fid_settings)
    run = Run(path, args, _read_column(path, metric))
    if len(run.curve) < MIN_VALUES:
        fix = _heldout_hint(metric) if len(run.curve) == 0 else ""
        raise UsageError(f"{path}/log.csv has {len(run.curve)} logged value(s) of {metric} at steps > 0{fix}; a "
                         f"speed-up needs at least {MIN_VALUES}: let the run train and log longer, or pick another "
                         "--metric")
    return run


@dataclass(frozen=True)
class Arm:
    """Runs of one setting, one per seed, and how that setting differs from the baseline's."""

    label: str
    runs: dict[Any, Run]  # by seed
    settings: dict[str, Any]  # the arm-defining keys
    differs: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (baseline's value, this arm's)


@dataclass(frozen=True)
class Grouping:
    """The baseline arm, the other arms, and the comparable settings that differ (accepted with force)."""

    baseline: Arm
    arms: list[Arm]
    forced: list[dict[str, Any]]


def _value(args: dict[str, Any], key: str) -> Any:
    return args.get(key, ABSENT)


def _classes(runs: list[Run], metric: str) -> tuple[list[str], list[str]]:
    """(comparable keys, arm-defining keys) among every run's args.json keys."""
    keys = set().union(*(run.args for run in runs))
    comparable = (COMPARABLE | metric_settings(metric, keys)) & keys
    ignored = (OPERATIONAL | LOCATIONS | {SEED, GIVEN_KEY, SAMPLE_SETTINGS}
               | {key for key in keys if key.startswith("fid_")})
    return sorted(comparable), sorted(keys - comparable - ignored)


def _first_difference(runs: list[Run], key: str) -> tuple[Run, Run] | None:
    first = runs[0]
    other = next((run for run in runs[1:] if _value(run.args, key) != _value(first.args, key)), None)
    return None if other is None else (first, other)


def _describe(key: str, pair: tuple[Run, Run]) -> str:
    a, b = pair
    if key == SAMPLE_SETTINGS:
        return (f"the settings of the sample metrics (--fid-* flags, evaluate_run.py's): "
                f"{differing_settings(str(_value(a.args, key)), str(_value(b.args, key)))} ({a.path} vs {b.path})")
    return f"{flag(key)} {_value(a.args, key)!r} ({a.path}) vs {_value(b.args, key)!r} ({b.path})"


def _by_seed(runs: list[Run], what: str) -> dict[Any, Run]:
    by_seed: dict[Any, Run] = {}
    for run in runs:
        if run.seed in by_seed:
            raise UsageError(f"{by_seed[run.seed].path} and {run.path} are the same {what} with the same "
                             f"{flag(SEED)} {run.seed!r}: pass one of them")
        by_seed[run.seed] = run
    return by_seed


def _format(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def arm_label(differs: dict[str, tuple[Any, Any]]) -> str:
    """What an arm changes from the baseline: switches first, then ``key=value`` for every other setting.

    Example: arm_label({"anm": (False, True), "anm_lambda": (10.0, 5.0)}) == "anm (anm_lambda=5)"
    """
    switches = [key if now else f"no-{key}" for key, (_, now) in differs.items() if isinstance(now, bool)]
    params = [f"{key}={_format(now)}" for key, (_, now) in differs.items() if not isinstance(now, bool)]
    if not switches:
        return ", ".join(params)
    return " ".join(switches) + (f" ({', '.join(params)})" if params else "")


def group_arms(runs: list[Run], baseline_runs: list[Run], metric: str, force: bool = False) -> Grouping:
    """The baseline runs as one arm and ``runs`` grouped into arms by their arm-defining settings.

    Raises UsageError when a comparable setting differs between any two runs (unless ``force``: then it is
    recorded in ``Grouping.forced``), when the baseline runs are not one setting, when an arm holds one seed
    twice, or when a run is the baseline's setting."""
    everything = baseline_runs + runs
    paths = [os.path.realpath(run.path) for run in everything]
    if len(set(paths)) < len(paths):
        twice = next(run.path for run, path in zip(everything, paths, strict=True) if paths.count(path) > 1)
        raise UsageError(f"{twice} is given twice: pass each run folder once")
    comparable, defining = _classes(everything, metric)
    forced = []
    for key in comparable:
        pair = _first_difference(everything, key)
        if pair is None:
            continue
        if not force:
            raise UsageError(f"the runs are not comparable: {_describe(key, pair)}; compare runs with the same "
                             f"{flag(key)}, or pass --force to compare them anyway")
        forced.append(dict(flag=flag(key), values={run.path: _value(run.args, key) for run in everything}))
    for key in defining:
        pair = _first_difference(baseline_runs, key)
        if pair is not None:
            raise UsageError(f"the --baseline runs are not one setting: {_describe(key, pair)}; baseline runs may "
                             f"differ only in {flag(SEED)} and operational flags")
    base_settings = {key: _value(baseline_runs[0].args, key) for key in defining}
    baseline = Arm("baseline", _by_seed(baseline_runs, "baseline setting"), base_settings)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps([_value(run.args, key) for key in defining], default=str), []).append(run)
    arms = []
    for members in groups.values():
        settings = {key: _value(members[0].args, key) for key in defining}
        differs = {key: (base_settings[key], value) for key, value in settings.items() if value != base_settings[key]}
        if not differs:
            raise UsageError(f"{members[0].path} differs from the baseline only in {flag(SEED)} or operational "
                             "flags: pass it with --baseline")
        arms.append(Arm(arm_label(differs), _by_seed(members, "setting"), settings, differs))
    return Grouping(baseline, arms, forced)


def _load_sample_metric_run(path: str, args: dict[str, Any], metric: str, fid_settings: str | None) -> Run:
    """load_run for a sample metric: log.csv's points (a run trained with --fid-every) and eval_log.csv's
    (evaluate_run.py) share a curve only when measured alike; a chosen eval_log.csv group (--fid-settings)
    measured otherwise stands alone."""
    trained = args.get("fid_settings")
    trained_with = comparable_settings(trained) if isinstance(trained, dict) else None
    steps, values, settings = eval_log_points(path, metric, fid_settings, trained_with)
    if settings is None or settings == trained_with:  # log.csv's --fid-every points, measured alike
        logged = _read_column(path, metric)
        steps, values = [*logged.steps.tolist(), *steps], [*logged.values.tolist(), *values]
        settings = settings or trained_with
    run = Run(path, {**args, SAMPLE_SETTINGS: settings or ABSENT}, clean_curve(steps, values))
    if len(run.curve) < MIN_VALUES:
        raise UsageError(f"{path} has {len(run.curve)} value(s) of {metric} at steps > 0 in log.csv and "
                         f"{EVAL_LOG}; a speed-up needs at least {MIN_VALUES}: train with --fid-every K, or run "
                         "evaluate_run.py on the run's checkpoints")
    return run
