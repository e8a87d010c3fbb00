"""Tests for examples/sit/evaluation/sinusoid_metric.py: parameter recovery and the set-level metric."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data.datasets import make_sinusoids, render_sinusoids
from data.npz import to_uint8_nhwc
from evaluation.sinusoid_metric import (
    SinusoidMetric,
    canonicalize_params,
    compare_fits,
    fit_sinusoid_params,
    sinusoid_frechet,
)

N = 200


def angle_error(a, b, period):
    return (torch.remainder(a - b + period / 2, period) - period / 2).abs()


@pytest.fixture(scope="module")
def real_sets():
    gen = torch.Generator().manual_seed(100)
    images, params = make_sinusoids(N, 32, gen)
    reference, _ = make_sinusoids(N, 32, gen)
    other, _ = make_sinusoids(N, 32, gen)
    return dict(
        images=images,
        params=params,
        ref_fit=fit_sinusoid_params(reference),
        other_fit=fit_sinusoid_params(other),
    )


@pytest.mark.parametrize("size", [32, 64])
def test_recovers_parameters_of_clean_images(size):
    images, params = make_sinusoids(64, size, torch.Generator().manual_seed(size))
    fit, true = fit_sinusoid_params(images), canonicalize_params(params)
    assert torch.equal(fit["f"].round(), true["f"])
    assert (fit["f"] - true["f"]).abs().max() < 1e-2
    assert angle_error(fit["theta"], true["theta"], math.pi).max() < 1e-2
    assert angle_error(fit["phi"], true["phi"], 2 * math.pi).max() < 1e-2
    assert (fit["c0"] - true["c0"]).abs().max() < 1e-2 and (fit["c1"] - true["c1"]).abs().max() < 1e-2
    assert fit["rho"].max() < 1e-4


def test_recovers_parameters_from_uint8_nhwc():
    images, params = make_sinusoids(32, 32, torch.Generator().manual_seed(5))
    fit, true = fit_sinusoid_params(to_uint8_nhwc(images)), canonicalize_params(params)
    assert torch.equal(fit["f"].round(), true["f"])
    assert angle_error(fit["theta"], true["theta"], math.pi).max() < 0.02
    # Colours where the wave is faint (c0 ~ c1) are ill-posed after 8-bit quantisation: loose bound.
    assert (fit["c0"] - true["c0"]).abs().median() < 0.01
    assert (fit["rho"] < 0.05).all()


def test_symmetry_representative():
    params = dict(
        f=torch.tensor([[3.0]]),
        theta=torch.tensor([[0.7]]),
        phi=torch.tensor([[0.4]]),
        c0=torch.tensor([[[0.9, 0.8, 0.7]]]),
        c1=torch.tensor([[[0.1, 0.2, 0.3]]]),
    )
    fit = fit_sinusoid_params(render_sinusoids(params, 32) * 2 - 1)
    # (phi, c0, c1) and (phi + pi, c1, c0) draw the same image: the fit returns sum(c1 - c0) >= 0.
    assert torch.allclose(fit["c0"], torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64), atol=1e-3)
    assert angle_error(fit["phi"], torch.tensor([0.4 + math.pi], dtype=torch.float64), 2 * math.pi) < 1e-3


def test_flat_and_noise_images_stay_finite():
    images = torch.cat(
        [torch.zeros(2, 3, 32, 32), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    )
    images[1] += 1e-4 * torch.linspace(0, 1, 32)  # almost flat: ill-conditioned near DC
    fit = fit_sinusoid_params(images)
    for value in fit.values():
        assert torch.isfinite(value).all()
    assert fit["c0"].abs().max() < 10 and (fit["rho"][2:] > 0.5).all()


def blur(x, sigma):
    r = torch.arange(-6, 7, dtype=x.dtype)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1)
    x = F.conv2d(F.pad(x, (6, 6, 0, 0), mode="reflect"), k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 6, 6), mode="reflect"), k.view(3, 1, -1, 1), groups=3)


def noise(x, sigma):
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def jitter(params, amount):
    shifted = dict(params)
    offsets = (
        2 * torch.rand(params["f"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 1
    )
    shifted["f"] = params["f"] + amount * offsets
    return render_sinusoids(shifted, 32) * 2 - 1


@pytest.mark.parametrize(
    "corruption, levels",
    [("blur", [0.5, 1.0, 2.0]), ("noise", [0.05, 0.1, 0.3]), ("jitter", [0.1, 0.25, 0.5])],
)
def test_metric_rises_monotonically_under_corruption(real_sets, corruption, levels):
    images, params, ref = real_sets["images"], real_sets["params"], real_sets["ref_fit"]
    floor = compare_fits(real_sets["other_fit"], ref)
    corrupt = {
        "blur": lambda s: blur(images, s),
        "noise": lambda s: noise(images, s),
        "jitter": lambda s: jitter(params, s),
    }[corruption]
    clean = compare_fits(fit_sinusoid_params(images), ref)
    scores = [clean] + [compare_fits(fit_sinusoid_params(corrupt(level)), ref) for level in levels]
    for key in ("frechet", "mmd2"):
        values = [s[key] for s in scores]
        assert all(a < b for a, b in zip(values, values[1:], strict=False)), (key, values)
    assert scores[-1]["frechet"] > 5 * floor["frechet"]


def test_real_vs_real_is_near_floor(real_sets):
    floor = compare_fits(real_sets["other_fit"], real_sets["ref_fit"])
    real = compare_fits(fit_sinusoid_params(real_sets["images"]), real_sets["ref_fit"])
    assert real["frechet"] < 3 * floor["frechet"] and real["mmd2"] < 0.05
    assert real["validity"] == 1.0
    assert compare_fits(real_sets["ref_fit"], real_sets["ref_fit"])["frechet"] < 1e-6


def test_sinusoid_metric_reports_floor_and_is_deterministic(real_sets):
    metric = SinusoidMetric(image_size=32, seed=9)
    result = metric(real_sets["images"][:64])
    for key in ("frechet", "mmd2", "w1_f", "w1_theta", "w1_phi", "w1_c0", "w1_c1"):
        assert np.isfinite(result[key]) and np.isfinite(result[f"{key}_floor"])
    assert result["num_samples"] == 64 and result["validity"] == 1.0 and result["validity_real"] == 1.0
    assert metric(real_sets["images"][:64]) == result
    assert sinusoid_frechet(real_sets["images"], real_sets["images"]) < 1e-6
