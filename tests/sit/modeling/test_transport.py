"""Tests for examples/sit/modeling/transport.py: paths, time ranges, training loss, velocity/score/noise conversions.

The analytic case used here and in test_samplers.py: data x1 ~ N(mu, diag(s^2)), noise x0 ~ N(0, I),
x_t = a x1 + b x0 (a = alpha_t, b = sigma_t) is Gaussian with mean a mu and variance V = a^2 s^2 + b^2, and
    E[x1 | x_t] = mu + a s^2 (x_t - a mu) / V,   E[x0 | x_t] = b (x_t - a mu) / V,
so the exact velocity E[a' x1 + b' x0 | x_t] = a' mu + (a' a s^2 + b' b) (x_t - a mu) / V,
the score is -(x_t - a mu) / V and the noise prediction E[x0 | x_t] = -b * score.
"""

import math

import pytest
import torch
from modeling.transport import PATHS, PREDICTIONS, Transport, create_transport, expand_t_like_x

MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
STD = torch.tensor([0.6, 1.0, 1.5, 0.8], dtype=torch.float64)


def gaussian_fields(transport: Transport, x: torch.Tensor, t: torch.Tensor, mu=MU, std=STD):
    """Exact (velocity, score, noise) of the Gaussian data case at (x, t); x is (N, D)."""
    te = expand_t_like_x(t, x).to(x.dtype)
    a, da = transport.path.alpha(te)
    b, db = transport.path.sigma(te)
    var = a**2 * std**2 + b**2
    r = x - a * mu
    velocity = da * mu + (da * a * std**2 + db * b) / var * r
    score = -r / var
    return velocity, score, -b * score


def gaussian_model(transport: Transport, mu=MU, std=STD):
    """A "perfectly trained" model for the transport's prediction type: model(x, t) -> exact output."""
    index = PREDICTIONS.index(transport.prediction)

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return gaussian_fields(transport, x, t, mu, std)[index]

    return model


def all_transports():
    return [create_transport(p, q) for p in PATHS for q in PREDICTIONS]


# ----------------------------------------------------------------------------- construction


def test_default_eps():
    for path in ("Linear", "GVP"):
        tr = create_transport(path, "velocity")
        assert (tr.train_eps, tr.sample_eps) == (0.0, 0.0)
        assert tr.interval() == (0.0, 1.0) and tr.interval(sample=True) == (0.0, 1.0)
        for pred in ("score", "noise"):
            tr = create_transport(path, pred)
            assert (tr.train_eps, tr.sample_eps) == (1e-3, 1e-3)
            assert tr.interval() == (1e-3, 1 - 1e-3)
    tr = create_transport("VP")
    assert (tr.train_eps, tr.sample_eps) == (1e-5, 1e-3)  # the reference's create_transport defaults
    assert tr.interval() == (0.0, 1 - 1e-5) and tr.interval(sample=True) == (0.0, 1 - 1e-3)
    # Explicit values are kept, independently of each other.
    tr = create_transport("Linear", "score", train_eps=1e-2, sample_eps=1e-4)
    assert tr.interval() == (1e-2, 1 - 1e-2) and tr.interval(sample=True) == (1e-4, 1 - 1e-4)


def test_sde_intervals():
    tr = create_transport()
    assert tr.interval(sample=True, sde=True, last_step_size=0.04) == (0.0, 0.96)
    assert tr.interval(sample=True, sde=True, last_step_size=0.0) == (0.0, 1.0)
    # SBDM's w_t ~ 1/t: guarded start instead of the reference's t=0 (NaN).
    t0, t1 = tr.interval(sample=True, sde=True, diffusion_form="SBDM", last_step_size=0.04)
    assert 0 < t0 <= 1e-3 and t1 == 0.96
    assert create_transport("VP").interval(sample=True, sde=True, last_step_size=0.04) == (0.0, 0.96)


def test_bad_arguments():
    with pytest.raises(ValueError, match="path_type"):
        create_transport("Cosine")
    with pytest.raises(ValueError, match="prediction"):
        create_transport("Linear", "x0")
    with pytest.raises(ValueError, match="loss_weight"):
        create_transport("Linear", "noise", loss_weight="snr")


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("path_type", list(PATHS))
def test_path_coefficients(path_type):
    path = create_transport(path_type).path
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    a, da = path.alpha(t)
    b, db = path.sigma(t)
    h = 1e-6
    torch.testing.assert_close(
        da, (path.alpha(t + h)[0] - path.alpha(t - h)[0]) / (2 * h), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        db, (path.sigma(t + h)[0] - path.sigma(t - h)[0]) / (2 * h), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(path.d_log_alpha(t), da / a)
    torch.testing.assert_close(path.alpha_over_d_alpha(t), a / da)
    torch.testing.assert_close(path.sbdm_diffusion(t), (da / a) * b**2 - b * db)
    # Time convention: t=1 is data (alpha 1, sigma 0); t=0 is noise (sigma ~ 1).
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(path.alpha(one)[0], one)
    torch.testing.assert_close(path.sigma(one)[0], zero)
    assert path.sigma(zero)[0].item() == pytest.approx(1.0, abs=1e-4)
    assert path.alpha(zero)[0].item() == pytest.approx(0.0, abs=1e-2)


def test_linear_and_gvp_formulas():
    t = torch.tensor([0.25], dtype=torch.float64)
    lin, gvp = create_transport("Linear").path, create_transport("GVP").path
    assert (lin.alpha(t)[0].item(), lin.sigma(t)[0].item()) == (0.25, 0.75)
    assert gvp.alpha(t)[0].item() == pytest.approx(math.sin(math.pi / 8))
    assert gvp.sigma(t)[0].item() == pytest.approx(math.cos(math.pi / 8))
    vp = create_transport("VP").path
    m = -0.25 * 0.75**2 * 19.9 - 0.5 * 0.75 * 0.1
    assert vp.alpha(t)[0].item() == pytest.approx(math.exp(m))
    assert vp.sigma(t)[0].item() == pytest.approx(math.sqrt(1 - math.exp(2 * m)))


# ----------------------------------------------------------------------------- training loss


def test_linear_velocity_loss_by_hand():
    tr = create_transport()
    x1, x0 = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 0.3, 1.0])
    seen = {}

    def model(x, t_in, y):
        seen.update(x=x, t=t_in, y=y)
        return torch.ones_like(x)

    out = tr.training_losses(model, x1, dict(y=torch.tensor([1, 2, 3])), t=t, noise=x0)
    te = t.view(3, 1, 1, 1)
    torch.testing.assert_close(out["xt"], te * x1 + (1 - te) * x0)
    torch.testing.assert_close(seen["x"], out["xt"])
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(out["ut"], x1 - x0)
    torch.testing.assert_close(out["target"], x1 - x0)
    assert out["loss"].shape == (3,)
    torch.testing.assert_close(out["loss"], ((1 - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)))


def test_fixed_t_and_noise_use_no_rng():
    tr = create_transport()
    x1 = torch.randn(4, 2, 4, 4)
    state = torch.get_rng_state()
    tr.training_losses(lambda x, t: x, x1, t=torch.rand(4), noise=torch.randn_like(x1))
    after = torch.get_rng_state()
    tr.training_losses(lambda x, t: x, x1, t=torch.full((4,), 0.5), noise=torch.zeros_like(x1))
    assert torch.equal(after, torch.get_rng_state())
    assert not torch.equal(state, after)  # (the rand/randn in the call itself did move it)


def test_generator_reproducible_and_t_in_range():
    tr = create_transport("Linear", "noise")
    x1 = torch.randn(256, 2, 4, 4)
    a = tr.training_losses(lambda x, t: x, x1, generator=torch.Generator().manual_seed(7))
    b = tr.training_losses(lambda x, t: x, x1, generator=torch.Generator().manual_seed(7))
    c = tr.training_losses(lambda x, t: x, x1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["loss"], c["loss"])
    assert a["t"].min() >= 1e-3 and a["t"].max() <= 1 - 1e-3
    t = create_transport().sample_time(10_000, "cpu", torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.02


def test_model_output_shape_checked():
    with pytest.raises(ValueError, match="shape"):
        create_transport().training_losses(lambda x, t: x[:, :1], torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("weight", [None, "velocity", "likelihood"])
@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_weighted_losses_by_hand(prediction, weight):
    tr = create_transport("GVP", prediction, loss_weight=weight)
    x1, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.2, 0.5, 0.8])
    pred = torch.randn(3, 2, 4, 4)
    out = tr.training_losses(lambda x, t_in: pred, x1, t=t, noise=x0)
    te = t.view(3, 1, 1, 1)
    b = torch.cos(te * math.pi / 2)
    w_sbdm = tr.path.sbdm_diffusion(te)
    w = {None: torch.ones_like(te), "velocity": (w_sbdm / b) ** 2, "likelihood": w_sbdm / b**2}[weight]
    err = (pred - x0) ** 2 if prediction == "noise" else (pred * b + x0) ** 2
    torch.testing.assert_close(out["loss"], (w * err).mean(dim=(1, 2, 3)))


def test_velocity_loss_ignores_weight():
    x1, x0, t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.rand(2)
    plain = create_transport().training_losses(lambda x, t_in: x, x1, t=t, noise=x0)["loss"]
    weighted = create_transport(loss_weight="velocity").training_losses(lambda x, t_in: x, x1, t=t, noise=x0)
    torch.testing.assert_close(weighted["loss"], plain)


@pytest.mark.parametrize("transport", all_transports(), ids=repr)
def test_exact_field_is_the_regression_optimum(transport):
    # The exact conditional expectation leaves a residual orthogonal to every function of (x_t, t):
    # check against 1 and x_t inside a few t bins, for each path and prediction target.
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x1 = MU + STD * torch.randn(n, 4, dtype=torch.float64, generator=gen)
    t = torch.rand(n, dtype=torch.float64, generator=gen) * 0.8 + 0.1
    out = transport.training_losses(gaussian_model(transport), x1, generator=gen, t=t)
    resid = out["pred"] - out["target"]
    scale = out["target"].std()
    for lo in (0.1, 0.5):
        m = (t >= lo) & (t < lo + 0.4)
        r, x = resid[m], out["xt"][m]
        assert r.mean(0).abs().max() < 0.02 * scale
        assert (r * (x - x.mean(0))).mean(0).abs().max() < 0.02 * scale
    # ... and a wrong field fails the same check.
    m = t < 0.5
    x = out["xt"][m] - out["xt"][m].mean(0)
    r = resid[m] + 0.2 * scale * x
    assert (r * x).mean(0).abs().max() > 0.05 * scale


# ----------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("transport", all_transports(), ids=repr)
def test_conversions_match_exact_fields(transport):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, dtype=torch.float64, generator=gen) * 2
    t = torch.rand(500, dtype=torch.float64, generator=gen) * 0.98 + 0.01
    velocity, score, noise = gaussian_fields(transport, x, t)
    output = {"velocity": velocity, "score": score, "noise": noise}[transport.prediction]
    v, s = transport.velocity_and_score(output, x, t)
    torch.testing.assert_close(v, velocity)
    torch.testing.assert_close(s, score)
    torch.testing.assert_close(transport.velocity(output, x, t), velocity)
    torch.testing.assert_close(transport.score(output, x, t), score)


def test_linear_score_formula_and_t0():
    tr = create_transport()
    x, v = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9])
    te = t[:, None]
    torch.testing.assert_close(tr.score_from_velocity(v, x, t), (te * v - x) / (1 - te))
    assert torch.isfinite(tr.score_from_velocity(v, x, torch.zeros(5))).all()


# The reference's training interval (transport/__init__.py create_transport + Transport.check_interval of
# willisma/SiT), written out from its text: VP [0, 1 - 1e-5]; Linear/GVP velocity [0, 1]; score/noise
# [1e-3, 1 - 1e-3].
REFERENCE_TRAIN_INTERVAL = {
    ("VP", prediction): (0.0, 1 - 1e-5) for prediction in PREDICTIONS
} | {
    (path, "velocity"): (0.0, 1.0) for path in ("Linear", "GVP")
} | {
    (path, prediction): (1e-3, 1 - 1e-3) for path in ("Linear", "GVP") for prediction in ("score", "noise")
}


@pytest.mark.parametrize("path_type,prediction", sorted(REFERENCE_TRAIN_INTERVAL))
def test_seeded_batch_equals_the_reference_draws(path_type, prediction):
    """With the global RNG, a seed gives the reference's (x0, t): x0 = randn_like(x1), then t = rand(B) on
    the CPU scaled to the reference's interval, and x_t = alpha_t x1 + sigma_t x0."""
    tr = create_transport(path_type, prediction)
    x1 = torch.randn(64, 2, 3, 3)
    seen = {}

    def model(x, t):
        seen["x"] = x
        return torch.zeros_like(x)

    torch.manual_seed(123)
    out = tr.training_losses(model, x1)
    torch.manual_seed(123)
    x0 = torch.randn_like(x1)
    t0, t1 = REFERENCE_TRAIN_INTERVAL[(path_type, prediction)]
    t = torch.rand((x1.shape[0],)) * (t1 - t0) + t0
    assert torch.equal(out["t"], t)
    te = expand_t_like_x(t, x1)
    torch.testing.assert_close(seen["x"], tr.path.alpha(te)[0] * x1 + tr.path.sigma(te)[0] * x0)
