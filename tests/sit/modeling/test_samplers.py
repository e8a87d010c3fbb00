"""Tests for examples/sit/modeling/samplers.py on the analytic Gaussian case (see test_transport.py for the fields).

With the exact field for data N(mu, diag(s^2)), every sampler must carry N(0, I) noise to the data
distribution: the final sample mean and std are compared with mu and s (10k samples in 4 dimensions).
"""

import pytest
import torch
from modeling.samplers import Sampler, diffusion_coefficient, nfe_to_steps, steps_to_nfe
from modeling.transport import PATHS, PREDICTIONS, create_transport
from test_transport import MU, STD, gaussian_model

N_SAMPLES = 10_000
SDE_FORMS = ["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"]


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(N_SAMPLES, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_matches_data(x: torch.Tensor, tol: float = 0.05) -> None:
    # Standard error of the mean is s/100 and of the std about s/140 at 10k samples; tol adds discretization.
    assert torch.isfinite(x).all()
    mean_err = ((x.mean(0) - MU) / STD).abs().max().item()
    std_err = (x.std(0) / STD - 1).abs().max().item()
    assert mean_err < tol and std_err < tol, f"mean err {mean_err:.4f}, std rel err {std_err:.4f}"


# ----------------------------------------------------------------------------- NFE bookkeeping


def test_nfe_helpers():
    assert steps_to_nfe(125, "heun") == 250 and nfe_to_steps(250, "heun") == 125
    assert steps_to_nfe(250, "euler") == 250 and nfe_to_steps(250, "euler") == 250
    assert steps_to_nfe(250, "euler", sde=True) == 250 and nfe_to_steps(250, "euler", sde=True) == 250
    assert steps_to_nfe(250, "euler", sde=True, last_step=None) == 249
    assert steps_to_nfe(126, "heun", sde=True) == 251
    for method in ("euler", "heun"):
        for sde in (False, True):
            for nfe in (11, 51, 250, 251):
                try:
                    steps = nfe_to_steps(nfe, method, sde=sde)
                except ValueError:
                    continue
                assert steps_to_nfe(steps, method, sde=sde) == nfe
    with pytest.raises(ValueError, match="251"):
        nfe_to_steps(251, "heun")
    with pytest.raises(ValueError, match="method"):
        steps_to_nfe(10, "rk4")


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reported_nfe_matches_helpers(method):
    sampler = Sampler(create_transport())
    model = gaussian_model(sampler.transport)
    sampler.sample_ode(num_steps=7, method=method)(noise()[:8], model)
    assert sampler.last_nfe == steps_to_nfe(7, method)
    for last_step in ("Mean", None):
        sampler.sample_sde(num_steps=7, method=method, last_step=last_step)(noise()[:8], model)
        assert sampler.last_nfe == steps_to_nfe(7, method, sde=True, last_step=last_step)


def test_ode_time_grid_runs_noise_to_data():
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.ones_like(x)

    x = Sampler(create_transport()).sample_ode(num_steps=4, method="heun")(torch.zeros(2, 3), model)
    assert seen == pytest.approx([0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0])
    torch.testing.assert_close(x, torch.ones(2, 3))  # constant velocity 1 for unit time


def test_sde_time_grid_and_last_step():
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    Sampler(create_transport()).sample_sde(num_steps=5)(torch.zeros(2, 3), model)
    assert seen == pytest.approx([0.0, 0.24, 0.48, 0.72, 0.96])  # linspace(0, 0.96, 5); last step at 0.96


def test_model_kwargs_pass_through_and_sit_smoke():
    from modeling.models import SiT

    model = SiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3).eval()
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([0, 3])  # [label; null]
    sampler = Sampler(create_transport())
    x = sampler.sample_ode(num_steps=2)(
        torch.cat([z, z]), model.forward_with_cfg, y=y.repeat(2), cfg_scale=1.5
    )
    assert x.shape == (4, 4, 8, 8)
    x = sampler.sample_sde(num_steps=3)(z, model, generator=torch.Generator().manual_seed(0), y=y)
    assert x.shape == z.shape and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- diffusion forms


def test_diffusion_forms_values():
    tr = create_transport()
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    forms = {
        "constant": torch.tensor([2.0, 2.0]),
        "SBDM": 2 * (1 - t) / t,  # Linear: (1/t)(1-t)^2 + (1-t)
        "sigma": 2 * (1 - t),
        "linear": 2 * (1 - t),
        "decreasing": 0.25 * (2 * torch.cos(torch.pi * t) + 1) ** 2,
        "increasing-decreasing": 2 * torch.sin(torch.pi * t) ** 2,
    }
    for form, want in forms.items():
        torch.testing.assert_close(diffusion_coefficient(tr, t, form, norm=2.0), want.to(torch.float64))
    with pytest.raises(ValueError, match="diffusion_form"):
        Sampler(tr).sample_sde(diffusion_form="cosine")


def test_sde_heun_refuses_singular_end():
    with pytest.raises(ValueError, match="score"):
        Sampler(create_transport()).sample_sde(method="heun", diffusion_form="constant", last_step=None)
    with pytest.raises(ValueError, match="last_step"):
        Sampler(create_transport()).sample_sde(last_step="Median")


def test_sde_generator_reproducible():
    sampler = Sampler(create_transport())
    fn = sampler.sample_sde(num_steps=10)
    model = gaussian_model(sampler.transport)
    a = fn(noise()[:64], model, generator=torch.Generator().manual_seed(3))
    b = fn(noise()[:64], model, generator=torch.Generator().manual_seed(3))
    c = fn(noise()[:64], model, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- analytic transport


@pytest.mark.parametrize("method,num_steps", [("euler", 100), ("heun", 50)])
def test_ode_transports_gaussian(method, num_steps):
    sampler = Sampler(create_transport())
    x = sampler.sample_ode(num_steps=num_steps, method=method)(noise(), gaussian_model(sampler.transport))
    assert_matches_data(x)


def test_heun_is_more_accurate_than_euler():
    sampler = Sampler(create_transport())
    model = gaussian_model(sampler.transport)
    z = noise()
    reference = sampler.sample_ode(num_steps=400, method="heun")(z, model)
    euler = sampler.sample_ode(num_steps=20, method="euler")(z, model)
    heun = sampler.sample_ode(num_steps=10, method="heun")(z, model)  # same 20 NFE
    assert (heun - reference).abs().max() < 0.2 * (euler - reference).abs().max()


def test_wrong_field_fails_the_check():
    # The check has teeth: a velocity with the wrong data std must not pass.
    sampler = Sampler(create_transport())
    model = gaussian_model(sampler.transport, std=STD * 1.2)
    with pytest.raises(AssertionError):
        assert_matches_data(sampler.sample_ode(num_steps=50)(noise(), model))


@pytest.mark.parametrize("form", SDE_FORMS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sde_transports_gaussian(method, form):
    sampler = Sampler(create_transport())
    # The "Mean" last step adds the score term without its noise, which is only consistent when w(t) is
    # small near t=1; the constant form keeps w = 1 there, so finish it with a plain ODE step instead.
    last_step = "Euler" if form == "constant" else "Mean"
    fn = sampler.sample_sde(num_steps=100, method=method, diffusion_form=form, last_step=last_step)
    x = fn(noise(), gaussian_model(sampler.transport), generator=torch.Generator().manual_seed(1))
    assert_matches_data(x)


@pytest.mark.parametrize("last_step", ["Mean", "Tweedie", "Euler", None])
def test_sde_last_steps(last_step):
    sampler = Sampler(create_transport())
    fn = sampler.sample_sde(num_steps=100, last_step=last_step)
    x = fn(noise(), gaussian_model(sampler.transport), generator=torch.Generator().manual_seed(2))
    assert_matches_data(x)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("path_type", list(PATHS))
def test_paths_and_predictions_transport_gaussian(path_type, prediction):
    sampler = Sampler(create_transport(path_type, prediction))
    model = gaussian_model(sampler.transport)
    assert_matches_data(sampler.sample_ode(num_steps=50, method="heun")(noise(), model))
    # VP still has sigma = 0.14 at t = 0.96, too much for one 0.04 "Mean" jump: integrate the SDE to the end.
    last_step = None if path_type == "VP" else "Mean"
    fn = sampler.sample_sde(num_steps=100, last_step=last_step)
    assert_matches_data(fn(noise(), model, generator=torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------- adaptive ODE


def test_adaptive_ode_without_torchdiffeq(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchdiffeq(name, *args, **kwargs):
        if name.startswith("torchdiffeq"):
            raise ImportError("No module named 'torchdiffeq'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchdiffeq)
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        Sampler(create_transport()).sample_ode_adaptive()


def test_adaptive_ode_transports_gaussian():
    pytest.importorskip("torchdiffeq")
    sampler = Sampler(create_transport())
    x = sampler.sample_ode_adaptive(atol=1e-6, rtol=1e-5)(noise(), gaussian_model(sampler.transport))
    assert_matches_data(x, tol=0.03)
    assert sampler.last_nfe > 0
