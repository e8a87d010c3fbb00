"""evaluation/speedup.py: known answers for the speed-up in steps between two curves."""
from __future__ import annotations

import math

import numpy as np
import pytest
from evaluation.speedup import (
    Bound,
    arm_reaches_baseline,
    baseline_reaches_arm,
    clean_curve,
    first_reach,
    mean_curve,
    seed_stats,
)

STEPS = list(range(100, 1001, 100))  # linearly spaced, as train.py logs


def log_linear(steps: list[int], shift: float = 1.0, a: float = 3.0, b: float = 0.25) -> list[float]:
    """v = a − b·log(shift·step): the same curve as shift = 1, ``shift`` times fewer steps to each value."""
    return [a - b * math.log(shift * s) for s in steps]


def test_a_curve_shifted_by_two_in_steps_is_a_factor_two_in_both_directions() -> None:
    base, arm = clean_curve(STEPS, log_linear(STEPS)), clean_curve(STEPS, log_linear(STEPS, shift=2.0))
    forward = arm_reaches_baseline(base, arm)
    # The arm reaches the baseline's value at S at S / 2: exact for S >= 300 (the arm's points bracket it),
    # met at the arm's first point (100) for S = 100 and 200, where only a bound on the factor is known.
    for entry in forward[2:]:
        assert entry.reached_at == pytest.approx(entry.step / 2, rel=1e-12)
        assert entry.factor == pytest.approx(2.0, rel=1e-12) and entry.bound is None
    assert forward[1].factor == pytest.approx(2.0) and forward[1].bound == Bound(">=", pytest.approx(2.0))
    assert forward[0].reached_at == 100 and forward[0].bound == Bound(">=", 1.0)
    backward = baseline_reaches_arm(base, arm)
    for entry in backward[:5]:  # the arm's values at s <= 500 are the baseline's at 2s <= 1000
        assert entry.reached_at == pytest.approx(2 * entry.step, rel=1e-12)
        assert entry.factor == pytest.approx(2.0, rel=1e-12) and entry.bound is None
    for entry in backward[5:]:  # beyond the baseline's 1000 logged steps: never reached, factor > 1000 / s
        assert entry.reached_at is None and entry.factor is None
        assert entry.bound == Bound(">", pytest.approx(1000 / entry.step))


def test_a_value_never_reached_gives_none_and_the_bound_it_implies() -> None:
    base = clean_curve(STEPS, log_linear(STEPS))
    flat = clean_curve(STEPS, [5.0] * len(STEPS))  # worse than the baseline everywhere
    forward = arm_reaches_baseline(base, flat)
    assert all(e.reached_at is None and e.factor is None for e in forward)
    # The arm would need more than its 1000 steps to reach the value the baseline had at S: factor < S / 1000.
    assert [e.bound for e in forward] == [Bound("<", pytest.approx(s / 1000)) for s in STEPS]
    backward = baseline_reaches_arm(base, flat)  # the baseline is at or below 5 from its first point on
    assert all(e.reached_at == 100 and e.bound == Bound("<=", pytest.approx(100 / e.step)) for e in backward)


def test_the_first_crossing_counts_on_a_non_monotone_curve() -> None:
    curve = clean_curve([10, 20, 40, 80], [1.0, 0.4, 0.9, 0.3])
    step, at_first = first_reach(curve, 0.5)
    assert step == pytest.approx(10 * 2 ** (5 / 6)) and not at_first  # between 10 and 20, not 40 and 80
    assert first_reach(curve, 0.35) == (pytest.approx(40 * 2 ** (0.55 / 0.6)), False)
    assert first_reach(curve, 0.4) == (20.0, False)  # met exactly at a logged point: that step
    assert first_reach(curve, 1.5) == (10.0, True)
    assert first_reach(curve, 0.2) == (None, False)


def test_higher_is_better_mirrors_lower_is_better() -> None:
    base = clean_curve(STEPS, [-v for v in log_linear(STEPS)])
    arm = clean_curve(STEPS, [-v for v in log_linear(STEPS, shift=2.0)])
    up = baseline_reaches_arm(base, arm, higher_is_better=True)
    assert [e.factor for e in up[:5]] == pytest.approx([2.0] * 5, rel=1e-12)
    assert [e.bound for e in up[5:]] == [Bound(">", pytest.approx(1000 / s)) for s in STEPS[5:]]
    # Read as lower-is-better the same curves say the opposite: the arm is ahead of every baseline value.
    down = baseline_reaches_arm(base, arm)
    assert all(e.reached_at == 100 for e in down)


def test_clean_curve_skips_missing_values_and_step_zero_and_keeps_the_last_repeat() -> None:
    curve = clean_curve([0, 30, 10, 20, 20, 40, 50], [0.1, 0.3, 1.0, 0.9, 0.5, None, float("nan")])
    assert curve.steps.tolist() == [10, 20, 30] and curve.values.tolist() == [1.0, 0.5, 0.3]
    assert len(clean_curve([0, 10], [1.0, float("inf")])) == 0


def test_mean_curve_uses_the_steps_every_seed_logged() -> None:
    mean = mean_curve([clean_curve([10, 20, 30], [1.0, 2.0, 3.0]), clean_curve([20, 30, 40], [4.0, 6.0, 8.0])])
    assert mean.steps.tolist() == [20, 30] and mean.values.tolist() == [3.0, 4.5]
    one = clean_curve([10, 20], [1.0, 2.0])
    assert np.array_equal(mean_curve([one]).values, one.values)


def test_seed_stats_summarise_reached_pairs_and_list_the_others_bounds() -> None:
    base = clean_curve(STEPS, log_linear(STEPS))
    by_seed = {seed: arm_reaches_baseline(base, clean_curve(STEPS, log_linear(STEPS, shift)))[-1]
               for seed, shift in ((0, 2.0), (1, 4.0), (2, 0.5))}
    stats = seed_stats(by_seed)
    assert (stats["reached"], stats["pairs"]) == (2, 3)
    assert (stats["mean"], stats["min"], stats["max"]) == pytest.approx((3.0, 2.0, 4.0))
    assert stats["not_reached"] == [dict(seed=2, bound=dict(relation="<", factor=1.0))]
    assert seed_stats({})["mean"] is None
