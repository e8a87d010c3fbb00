"""Speed-up in training steps between two metric curves (pure numpy): at which step one run first reaches a
value the other run had at one of its logged steps, and the ratio of the two steps.

Two directions, both giving ``factor = baseline step / arm step`` (> 1: the arm is faster):

- ``arm_reaches_baseline``: for every logged step S of the baseline, the step s at which the arm first
  reaches the baseline's value at S; factor = S / s. When the arm never gets there within its logged steps
  (the last one is s_last), it would need more than s_last steps if it ever does, so the factor is only
  bounded from above: **factor < S / s_last**.
- ``baseline_reaches_arm``: for every logged step s of the arm, the step S at which the baseline first
  reaches the arm's value at s; factor = S / s. Not reached within the baseline's logged steps (last one
  S_last): the baseline would need more than S_last, so **factor > S_last / s** (a lower bound).

Nothing is extrapolated. "First reaches" is the first crossing: the first logged point at or past the
target (value <= target, or >= with ``higher_is_better``), interpolated with the logged point before it,
linearly in the value and in log(step), so a curve that falls like a − b·log(step) is interpolated exactly.
A target already met at the curve's first usable point gives that step; the crossing may have come earlier,
which the entry's bound says (for ``arm_reaches_baseline`` factor >= S / s_first, for
``baseline_reaches_arm`` factor <= S_first / s).

Rows at step 0 (or below) are not used: log(0) places them at minus infinity, so no crossing can be
interpolated from them. Missing and non-finite values are skipped; a step logged twice keeps its last value
(the one written last to the log).

    >>> base = clean_curve([100, 200, 400], [3.0, 2.0, 1.0])
    >>> arm = clean_curve([100, 200, 400], [2.0, 1.0, 0.5])       # base shifted by ×2 in steps
    >>> [round(c.factor, 6) for c in baseline_reaches_arm(base, arm)[:2]]
    [2.0, 2.0]
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Curve", "Bound", "Crossing", "clean_curve", "first_reach", "arm_reaches_baseline",
           "baseline_reaches_arm", "mean_curve", "seed_stats", "DIRECTIONS"]

# The two directions, in the order reports show them.
DIRECTIONS = ("arm_reaches_baseline", "baseline_reaches_arm")


@dataclass(frozen=True)
class Curve:
    """A metric against training steps: strictly increasing steps > 0, finite values."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class Bound:
    """What an entry implies when its crossing is not known exactly: ``factor <relation> value``."""

    relation: str  # "<", ">", "<=" or ">="
    factor: float

    def __str__(self) -> str:
        return f"factor {self.relation} {self.factor:.3g}"


@dataclass(frozen=True)
class Crossing:
    """One logged point of one curve and where the other curve first reaches its value.

    ``reached_at`` and ``factor`` are None when the other curve never reaches ``value``; ``bound`` then
    holds the inequality that implies (and, for a value met at the other curve's first usable point, the
    side on which the true crossing lies)."""

    step: int
    value: float
    reached_at: float | None
    factor: float | None
    bound: Bound | None

    def as_dict(self) -> dict:
        return asdict(self)


def clean_curve(steps: Iterable[float], values: Iterable[float | None]) -> Curve:
    """The usable points of a logged curve: steps > 0, finite values, the last value of a repeated step.

    Example: clean_curve([0, 10, 10, 20], [1.0, 0.9, 0.8, None]) keeps only (10, 0.8).
    """
    last: dict[int, float] = {}
    for step, value in zip(steps, values, strict=True):
        if value is None or not math.isfinite(float(value)) or int(step) <= 0:
            continue
        last[int(step)] = float(value)  # a later row of the same step replaces the earlier one
    ordered = sorted(last)
    return Curve(np.array(ordered, dtype=np.int64), np.array([last[s] for s in ordered], dtype=np.float64))


def first_reach(curve: Curve, target: float, higher_is_better: bool = False) -> tuple[float | None, bool]:
    """(step at which ``curve`` first reaches ``target``, whether that is its first usable point).

    The step is interpolated linearly in log(step) between the last point short of the target and the first
    one at or past it; None when no logged point gets there.

    Example: first_reach(clean_curve([10, 100], [1.0, 0.0]), 0.5) == (31.62..., False)  # sqrt(10 * 100)
    """
    sign = -1.0 if higher_is_better else 1.0  # compare as lower-is-better
    values, goal = sign * curve.values, sign * target
    reached = np.flatnonzero(values <= goal)
    if len(reached) == 0:
        return None, False
    k = int(reached[0])
    if k == 0:
        return float(curve.steps[0]), True
    before, after = values[k - 1], values[k]
    if after == goal:  # met exactly at a logged point: that step, without exp(log()) rounding
        return float(curve.steps[k]), False
    fraction = (before - goal) / (before - after)  # before > goal >= after, so in (0, 1]
    log_a, log_b = math.log(curve.steps[k - 1]), math.log(curve.steps[k])
    return math.exp(log_a + fraction * (log_b - log_a)), False


def _crossings(source: Curve, other: Curve, source_is_baseline: bool, higher_is_better: bool) -> list[Crossing]:
    """For each point of ``source``, where ``other`` first reaches its value, as baseline step / arm step."""
    entries = []
    last_other = float(other.steps[-1]) if len(other) else math.nan
    for step, value in zip(source.steps.tolist(), source.values.tolist(), strict=True):
        reached_at, at_first = first_reach(other, value, higher_is_better) if len(other) else (None, False)
        if source_is_baseline:  # arm_reaches_baseline: factor = S / s
            factor = None if reached_at is None else step / reached_at
            # Not reached: s > s_last, so S / s < S / s_last. Met at the arm's first point: s <= s_first.
            bound = (Bound("<", step / last_other) if reached_at is None
                     else Bound(">=", factor) if at_first else None)
        else:  # baseline_reaches_arm: factor = S / s
            factor = None if reached_at is None else reached_at / step
            # Not reached: S > S_last, so S / s > S_last / s. Met at the baseline's first point: S <= S_first.
            bound = (Bound(">", last_other / step) if reached_at is None
                     else Bound("<=", factor) if at_first else None)
        entries.append(Crossing(int(step), float(value), reached_at, factor, bound))
    return entries


def arm_reaches_baseline(baseline: Curve, arm: Curve, higher_is_better: bool = False) -> list[Crossing]:
    """For every logged step S of the baseline: the step s at which the arm first reaches the baseline's value
    at S, and factor = S / s (None, with ``factor < S / s_last``, when the arm never gets there)."""
    return _crossings(baseline, arm, True, higher_is_better)


def baseline_reaches_arm(baseline: Curve, arm: Curve, higher_is_better: bool = False) -> list[Crossing]:
    """For every logged step s of the arm: the step S at which the baseline first reaches the arm's value at s,
    and factor = S / s (None, with ``factor > S_last / s``, when the baseline never gets there)."""
    return _crossings(arm, baseline, False, higher_is_better)


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """The mean over seeds at the steps every curve logged (a step one seed lacks would mix seeds).

    Example: mean_curve([clean_curve([1, 2], [1.0, 3.0]), clean_curve([2, 3], [5.0, 1.0])]) is (2, 4.0).
    """
    common = set(curves[0].steps.tolist()).intersection(*(c.steps.tolist() for c in curves[1:]))
    steps = np.array(sorted(common), dtype=np.int64)
    values = [np.mean([c.values[np.searchsorted(c.steps, s)] for c in curves]) for s in steps]
    return Curve(steps, np.array(values, dtype=np.float64))


def seed_stats(by_seed: Mapping[int, Crossing]) -> dict:
    """Over seed pairs: how many reached, the mean, min and max of their factors, and each other seed's bound.

    Example: seed_stats({0: reached_at_x1, 1: reached_at_x2, 2: not_reached}) == {"reached": 2, "pairs": 3,
    "mean": 1.5, "min": 1.0, "max": 2.0, "not_reached": [{"seed": 2, "bound": {"relation": "<", "factor": 0.8}}]}
    """
    factors = [e.factor for e in by_seed.values() if e.factor is not None]
    return dict(reached=len(factors), pairs=len(by_seed),
                mean=float(np.mean(factors)) if factors else None,
                min=float(np.min(factors)) if factors else None,
                max=float(np.max(factors)) if factors else None,
                not_reached=[dict(seed=seed, bound=asdict(e.bound)) for seed, e in by_seed.items()
                             if e.factor is None])
