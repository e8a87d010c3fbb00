import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import anm
from anm import warmup_weight

steps = st.integers(min_value=0, max_value=10**7)
warmups = st.integers(min_value=1, max_value=10**6)
kinds = st.sampled_from(["linear", "cosine"])


@given(steps, warmups, kinds)
def test_bounded_and_reaches_one(step, warmup, kind):
    w = warmup_weight(step, warmup, kind)
    assert 0.0 <= w <= 1.0
    if step >= warmup:
        assert w == 1.0


@given(steps, steps, warmups, kinds)
def test_monotone(a, b, warmup, kind):
    lo, hi = sorted((a, b))
    assert warmup_weight(lo, warmup, kind) <= warmup_weight(hi, warmup, kind)


@given(warmups, kinds)
def test_starts_at_zero(warmup, kind):
    assert warmup_weight(0, warmup, kind) == 0.0


@given(steps)
def test_no_warmup_is_constant(step):
    assert warmup_weight(step, 0) == 1.0


def test_known_values():
    assert warmup_weight(500, 2000) == 0.25
    assert math.isclose(warmup_weight(1000, 2000, "cosine"), 0.5)
    # Off the midpoint the two ramps differ: cosine starts slower (0.146 vs 0.25 a quarter in).
    assert math.isclose(warmup_weight(500, 2000, "cosine"), (1 - math.cos(math.pi / 4)) / 2)
    assert math.isclose(warmup_weight(1500, 2000, "cosine"), (1 - math.cos(3 * math.pi / 4)) / 2)


@pytest.mark.parametrize(
    "args, match",
    [((-1, 10), "step must be >= 0"), ((1, -5), "warmup must be"), ((1, 10, "step"), "unknown warm-up kind"),
     ((1.5, 10), "whole number"), ((1, 2.5), "warmup must be")],
)
def test_invalid(args, match):
    with pytest.raises(anm.ANMError, match=match):
        warmup_weight(*args)


def test_step_counters_of_trainers_are_accepted():
    import numpy as np
    import torch

    from anm.schedule import validate_step

    assert [validate_step(s) for s in (np.int64(5), torch.tensor(3), 4.0, 7)] == [5, 3, 4, 7]
    for bad in (True, -1, 1.5, "3", torch.tensor([1, 2]), None, torch.tensor(2.5)):
        with pytest.raises(anm.ANMError, match="step must be"):
            validate_step(bad)
