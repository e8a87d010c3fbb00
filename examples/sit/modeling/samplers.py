"""ODE and SDE samplers for SiT transports: noise z at t=0 -> sample at t=1 (time convention: modeling/transport.py).

Every sample_* method returns a function  fn(z, model_fn, generator=None, **model_kwargs) -> x  that calls
model_fn(x, t, **model_kwargs) with t of shape (N,) and returns the final sample only. generator seeds the
SDE noise (ODE samplers are deterministic and ignore it); SDE samplers also take a list of generators, one
per sample, so that a sample's noise does not depend on the batch it is drawn in.

Cost in network function evaluations (NFE), the number that sampling time and paper tables refer to:
    ODE euler: num_steps             ODE heun: 2 * num_steps   (the paper's "250 NFE" = 125 Heun steps)
    SDE euler: num_steps - 1 (+1)    SDE heun: 2 * (num_steps - 1) (+1)
SDE num_steps counts grid points on [t0, 1 - last_step_size] as in the reference (so 250 Euler steps with the
"Mean" last step cost exactly 250 NFE); "(+1)" is the last step, absent when last_step=None.
Use nfe_to_steps / steps_to_nfe instead of doing this arithmetic by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from modeling.transport import ModelFn, Tensor, Transport, expand_t_like_x

# SDE noise: one generator for the batch, one per sample (batch-size independent), or None (global RNG).
Generators = torch.Generator | list[torch.Generator] | None

SampleFn = Callable[..., Tensor]


#################################################################################
#                               NFE bookkeeping                                 #
#################################################################################


def _evals_per_step(method: str) -> int:
    method = method.lower()
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown fixed-step method {method!r}; choose 'euler' or 'heun'")
    return 1 if method == "euler" else 2


def steps_to_nfe(
    num_steps: int, method: str = "heun", sde: bool = False, last_step: str | None = "Mean"
) -> int:
    """Network evaluations of sample_ode(num_steps, method) or, with sde=True, of sample_sde(...).

    Example: steps_to_nfe(125, "heun") == 250; steps_to_nfe(250, "euler", sde=True) == 250
    """
    per_step = _evals_per_step(method)
    if not sde:
        return per_step * num_steps
    return per_step * (num_steps - 1) + (last_step is not None)


def nfe_to_steps(nfe: int, method: str = "heun", sde: bool = False, last_step: str | None = "Mean") -> int:
    """The num_steps that spends exactly nfe evaluations (inverse of steps_to_nfe); raises if impossible.

    Example: sampler.sample_ode(num_steps=nfe_to_steps(250, "heun"))  # 125 Heun steps = 250 NFE
    """
    per_step = _evals_per_step(method)
    rest = nfe - (last_step is not None) if sde else nfe
    if rest <= 0 or rest % per_step:
        raise ValueError(f"{nfe} NFE cannot be spent exactly by {method} ({'SDE' if sde else 'ODE'}) steps")
    return rest // per_step + (1 if sde else 0)


#################################################################################
#                              SDE diffusion forms                              #
#################################################################################


def diffusion_coefficient(transport: Transport, t: Tensor, form: str = "sigma", norm: float = 1.0) -> Tensor:
    """w(t) in  dx = [v + w s] dt + sqrt(2 w) dW  (any w >= 0 keeps the marginals of the ODE).

    Forms: "constant" norm; "SBDM" norm * ((alpha'/alpha) sigma^2 - sigma sigma') (the diffusion-model
    reverse SDE, singular at t=0 on Linear/GVP); "sigma" norm * sigma_t; "linear" norm * (1 - t);
    "decreasing" (norm cos(pi t) + 1)^2 / 4; "increasing-decreasing" norm * sin(pi t)^2.

    Example: diffusion_coefficient(create_transport(), torch.tensor([0.5]))  # tensor([0.5])
    """
    form = form.lower()
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "sbdm":
        return norm * transport.path.sbdm_diffusion(t)
    if form == "sigma":
        return norm * transport.path.sigma(t)[0]
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    if form in (
        "increasing-decreasing",
        "inccreasing-decreasing",
    ):  # second spelling: the reference's CLI value
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(
        f"unknown diffusion_form {form!r}; choose constant, SBDM, sigma, linear, decreasing, "
        "increasing-decreasing"
    )


#################################################################################
#                                   Sampler                                     #
#################################################################################


class Sampler:
    """Builds fixed-step ODE/SDE (and optional adaptive ODE) sampling functions for a Transport."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.last_nfe = 0  # network evaluations spent by the most recent sampling call

    def _model(self, model_fn: ModelFn, x: Tensor, t: float, model_kwargs: dict) -> Tensor:
        self.last_nfe += 1
        # float32 times unless sampling in float64 (tests): the time embedding wants full precision.
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=t_dtype)
        return model_fn(x, t_vec, **model_kwargs), t_vec

    def _velocity(self, model_fn: ModelFn, x: Tensor, t: float, model_kwargs: dict) -> Tensor:
        out, t_vec = self._model(model_fn, x, t, model_kwargs)
        return self.transport.velocity(out, x, t_vec)

    # ----------------------------------------------------------------- ODE
    def sample_ode(self, num_steps: int = 250, method: str = "heun") -> SampleFn:
        """Fixed-step probability-flow ODE dx/dt = v(x, t) from t0 to t1 (Linear+velocity: 0 -> 1).

        num_steps is the number of integration steps: "euler" costs num_steps NFE, "heun" (2nd order,
        trapezoidal corrector) 2 * num_steps; SiT's ODE numbers use Heun with 250 NFE = 125 steps.

        Example:
            sample = Sampler(create_transport()).sample_ode(num_steps=nfe_to_steps(250, "heun"))
            x = sample(torch.randn(4, 4, 32, 32), model.forward_with_cfg, y=y, cfg_scale=1.5)
        """
        per_step = _evals_per_step(method)
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        t0, t1 = self.transport.interval(sample=True)
        ts = torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64).tolist()

        @torch.no_grad()
        def sample(
            z: Tensor, model_fn: ModelFn, generator: torch.Generator | None = None, **model_kwargs
        ) -> Tensor:
            self.last_nfe = 0
            x = z
            for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
                dt = t_next - t_cur
                d_cur = self._velocity(model_fn, x, t_cur, model_kwargs)
                if per_step == 1:
                    x = x + dt * d_cur
                else:
                    x_pred = x + dt * d_cur
                    d_next = self._velocity(model_fn, x_pred, t_next, model_kwargs)
                    x = x + 0.5 * dt * (d_cur + d_next)
            return x

        return sample

    def sample_ode_adaptive(self, method: str = "dopri5", atol: float = 1e-6, rtol: float = 1e-3) -> SampleFn:
        """Adaptive ODE solve with torchdiffeq (the reference default); the NFE is chosen by the solver.

        Example: x = Sampler(create_transport()).sample_ode_adaptive()(z, model, y=y)
        """
        try:
            from torchdiffeq import odeint
        except ImportError as err:
            raise ImportError("sample_ode_adaptive needs torchdiffeq: pip install torchdiffeq") from err
        t0, t1 = self.transport.interval(sample=True)

        @torch.no_grad()
        def sample(
            z: Tensor, model_fn: ModelFn, generator: torch.Generator | None = None, **model_kwargs
        ) -> Tensor:
            self.last_nfe = 0

            def func(t: Tensor, x: Tensor) -> Tensor:
                return self._velocity(model_fn, x, float(t), model_kwargs)

            t_span = torch.tensor([t0, t1], device=z.device, dtype=z.dtype)
            return odeint(func, z, t_span, method=method, atol=atol, rtol=rtol)[-1]

        return sample

    # ----------------------------------------------------------------- SDE
    def sample_sde(
        self,
        num_steps: int = 250,
        method: str = "euler",
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
    ) -> SampleFn:
        """Fixed-step SDE dx = [v + w s] dt + sqrt(2 w) dW on linspace(t0, 1 - last_step_size, num_steps).

        method "euler" (Euler-Maruyama) or "heun" (noise first, then a Heun step on the drift); w(t) from
        diffusion_coefficient(diffusion_form, diffusion_norm). The final jump of last_step_size to t=1 is
        "Mean" (x + h (v + w s), no noise), "Tweedie" (E[x1 | x_t] = (x + sigma^2 s) / alpha), "Euler"
        (x + h v) or None (integrate the SDE all the way to 1 - sample_eps, no extra step).

        Example:
            sample = Sampler(create_transport()).sample_sde(num_steps=250)  # 250 NFE, SiT's SDE setting
            x = sample(torch.randn(4, 4, 32, 32), model, generator=torch.Generator().manual_seed(0), y=y)
        """
        per_step = _evals_per_step(method)
        if last_step not in (None, "Mean", "Tweedie", "Euler"):
            raise ValueError(f"unknown last_step {last_step!r}; choose 'Mean', 'Tweedie', 'Euler' or None")
        if num_steps < 2:
            raise ValueError("an SDE grid needs num_steps >= 2 points")
        if last_step is None:
            last_step_size = 0.0
        diffusion_coefficient(self.transport, torch.zeros(1), diffusion_form)  # fail early on a bad name
        transport = self.transport
        t0, t1 = transport.interval(
            sample=True, sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size
        )
        ts = torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()
        dt = (t1 - t0) / (num_steps - 1)

        t1_tensor = torch.tensor([t1], dtype=torch.float64)
        if (
            per_step == 2
            and float(transport.path.sigma(t1_tensor)[0]) == 0
            and float(diffusion_coefficient(transport, t1_tensor, diffusion_form, diffusion_norm)) != 0
        ):
            raise ValueError(
                f"SDE heun with diffusion_form={diffusion_form!r} evaluates the score at t={t1}, where it is "
                "infinite; use a last_step ('Mean') or a form that vanishes at t=1 ('sigma', 'linear')"
            )

        def diffusion(t_vec: Tensor, x: Tensor) -> Tensor:
            return diffusion_coefficient(transport, expand_t_like_x(t_vec, x), diffusion_form, diffusion_norm)

        def sde_drift(x: Tensor, t: float, model_fn: ModelFn, model_kwargs: dict) -> Tensor:
            out, t_vec = self._model(model_fn, x, t, model_kwargs)
            v, s = transport.velocity_and_score(out, x, t_vec)
            w = diffusion(t_vec, x)
            # Where w = 0 (e.g. sigma form at t=1) the score may be infinite; 0 * inf must not poison x.
            return v + torch.where(w == 0, torch.zeros_like(s), w * s)

        def noise_like(x: Tensor, generator: Generators) -> Tensor:
            if isinstance(generator, (list, tuple)):
                # One generator per sample: each sample's Brownian path is independent of the batch it
                # is in. A batch that repeats the samples (CFG's [z; z]) repeats their noise too.
                per_sample = torch.stack(
                    [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
                ).to(x.device)
                return per_sample.repeat(x.shape[0] // len(generator), *[1] * (x.dim() - 1))
            device = generator.device if generator is not None else x.device
            return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

        @torch.no_grad()
        def sample(z: Tensor, model_fn: ModelFn, generator: Generators = None, **model_kwargs) -> Tensor:
            if isinstance(generator, (list, tuple)) and z.shape[0] % len(generator):
                raise ValueError(
                    f"{len(generator)} generators for a batch of {z.shape[0]}: pass one per sample"
                )
            self.last_nfe = 0
            x = z
            for t_cur in ts[:-1]:
                t_vec = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float64)
                noise_scale = torch.sqrt(2 * diffusion(t_vec, x) * dt).to(x.dtype)
                dw_scaled = noise_scale * noise_like(x, generator)
                if per_step == 1:  # Euler-Maruyama
                    x = x + dt * sde_drift(x, t_cur, model_fn, model_kwargs) + dw_scaled
                else:  # stochastic Heun: add this step's noise, then a deterministic Heun step on the drift
                    x_hat = x + dw_scaled
                    k1 = sde_drift(x_hat, t_cur, model_fn, model_kwargs)
                    k2 = sde_drift(x_hat + dt * k1, t_cur + dt, model_fn, model_kwargs)
                    x = x_hat + 0.5 * dt * (k1 + k2)

            if last_step == "Mean":
                x = x + last_step_size * sde_drift(x, t1, model_fn, model_kwargs)
            elif last_step == "Euler":
                x = x + last_step_size * self._velocity(model_fn, x, t1, model_kwargs)
            elif last_step == "Tweedie":
                out, t_vec = self._model(model_fn, x, t1, model_kwargs)
                te = expand_t_like_x(t_vec, x)
                alpha_t, _ = transport.path.alpha(te)
                sigma_t, _ = transport.path.sigma(te)
                x = (x + sigma_t**2 * transport.score(out, x, t_vec)) / alpha_t
            return x

        return sample
