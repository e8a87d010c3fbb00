import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anm
from anm import ANMLoss, anm_loss

norm_lists = st.lists(st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=1, max_size=40)
alphas = st.floats(min_value=1e-3, max_value=1e3)
lams = st.floats(min_value=0.0, max_value=100.0)


@given(norm_lists, alphas, lams, st.sampled_from(["hinge", "exp"]))
def test_bounded_by_lambda(values, alpha, lam, objective):
    loss = anm_loss(torch.tensor(values), alpha, lam, objective).item()
    assert -1e-6 <= loss <= lam * (1 + 1e-5)


@given(norm_lists, alphas)
def test_hinge_is_zero_when_every_norm_reaches_alpha(values, alpha):
    norms = torch.tensor(values).clamp_min(alpha)
    assert anm_loss(norms, alpha, 10.0).item() == 0.0


@given(norm_lists, alphas, st.floats(min_value=0.0, max_value=100.0), st.sampled_from(["hinge", "exp"]))
def test_monotone_non_increasing_in_norms(values, alpha, bump, objective):
    norms = torch.tensor(values, dtype=torch.float64)
    assert anm_loss(norms + bump, alpha, 1.0, objective) <= anm_loss(norms, alpha, 1.0, objective) + 1e-12


@given(norm_lists, alphas, lams, st.floats(min_value=0.0, max_value=1.0))
def test_linear_in_lambda_and_weight(values, alpha, lam, weight):
    norms = torch.tensor(values, dtype=torch.float64)
    unit = anm_loss(norms, alpha, 1.0).item()
    assert math.isclose(anm_loss(norms, alpha, lam, weight=weight).item(), lam * weight * unit, rel_tol=1e-9,
                        abs_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0.5, max_value=200.0), min_size=2, max_size=12), alphas,
       st.sampled_from(["hinge", "exp"]), st.sampled_from(["token", "sample", "batch"]))
def test_gradient_matches_finite_differences(values, alpha, objective, granularity):
    norms = torch.tensor(values, dtype=torch.float64).reshape(1, -1).repeat(2, 1)
    norms = norms + torch.arange(2, dtype=torch.float64)[:, None]
    # The hinge has a kink at alpha: keep every point away from it.
    if objective == "hinge":
        norms = torch.where((norms - alpha).abs() < 1e-2, norms + 0.05, norms)
    norms.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda n: anm_loss(n, alpha, 3.0, objective, granularity=granularity),
                                    (norms,), eps=1e-6, atol=1e-6)


def test_known_values_and_layers_concatenate():
    n = torch.tensor([[35.0, 70.0, 140.0]])
    assert anm_loss(n, 70.0, 10.0).item() == pytest.approx(10 * 0.5 / 3)
    a, b = torch.full((2, 3), 35.0), torch.full((2, 5), 0.0)
    # mean over every (layer, sample, token): 6 tokens at 0.5 and 10 at 1.0
    assert anm_loss([a, b], 70.0, 1.0).item() == pytest.approx((6 * 0.5 + 10 * 1.0) / 16)
    assert anm_loss(n, 70.0, 1.0, "exp").item() == pytest.approx(
        (math.exp(-0.5) + math.exp(-1) + math.exp(-2)) / 3)


def test_granularity():
    n = torch.tensor([[0.0, 140.0], [70.0, 70.0]])  # sample means 70 and 70
    assert anm_loss(n, 70.0, 1.0).item() == pytest.approx(1.0 / 4)
    assert anm_loss(n, 70.0, 1.0, granularity="sample").item() == 0.0
    assert anm_loss(n, 100.0, 1.0, granularity="batch").item() == pytest.approx(0.3)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": 0.0}, "alpha must be"), ({"alpha": -3.0}, "alpha must be"), ({"alpha": float("nan")}, "alpha"),
     ({"lam": -1.0}, "lam must be"), ({"objective": "l1"}, "unknown objective"),
     ({"granularity": "layer"}, "unknown granularity"), ({"weight": -0.5}, "weight must be")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(anm.ANMError, match=match):
        anm_loss(torch.ones(2, 3), **kwargs)
    with pytest.raises(ValueError):
        anm_loss(torch.ones(2, 3), **kwargs)


def test_module_form_applies_warmup():
    crit = ANMLoss(alpha=10.0, lam=2.0, warmup=4)
    n = torch.zeros(3, 3)
    assert [crit(n, step=s).item() for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert crit(n).item() == 2.0
    with pytest.raises(anm.ANMError):
        ANMLoss(alpha=-1)
