"""Interpolant transport for SiT: paths, training loss, and the model-output -> velocity/score conversions.

TIME CONVENTION (as in the reference SiT code): t=0 is pure noise, t=1 is data,

    x_t = alpha_t * x1 + sigma_t * x0,    x0 ~ N(0, I),  x1 = data,

and the flow-matching target is the path velocity u_t = alpha'_t * x1 + sigma'_t * x0 (Linear: x1 - x0).
Samplers (modeling/samplers.py) integrate from t=0 to t=1. REPA and the SiT paper's text use the reversed direction.

Velocity and score are tied by  v = (alpha'/alpha) x + w_t s,  w_t = (alpha'/alpha) sigma^2 - sigma sigma'
(w_t is also the "SBDM" diffusion coefficient), so a model trained for one of velocity / score / noise
(noise = -sigma * score) gives all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor
ModelFn = Callable[..., Tensor]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one.

    Example: mean_flat(torch.ones(2, 3, 4))  # tensor([1., 1.])
    """
    return x.mean(dim=tuple(range(1, x.ndim)))


def expand_t_like_x(t: Tensor, x: Tensor) -> Tensor:
    """(N,) times -> (N, 1, ..., 1) so that they broadcast against x.

    Example: expand_t_like_x(torch.rand(2), torch.zeros(2, 4, 8, 8)).shape  # (2, 1, 1, 1)
    """
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


#################################################################################
#                                    Paths                                      #
#################################################################################


class LinearPath:
    """Linear interpolant (rectified flow): alpha_t = t, sigma_t = 1 - t."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, d alpha_t / dt)."""
        return t, torch.ones_like(t)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma_t, d sigma_t / dt)."""
        return 1 - t, -torch.ones_like(t)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'_t / alpha_t, written per path to stay finite where possible."""
        return 1 / t

    def alpha_over_d_alpha(self, t: Tensor) -> Tensor:
        """alpha_t / alpha'_t (finite at t=0, where the score conversion needs it)."""
        return t

    def sbdm_diffusion(self, t: Tensor) -> Tensor:
        """w_t = (alpha'/alpha) sigma^2 - sigma sigma': the coefficient in v = (alpha'/alpha) x + w s."""
        sigma_t, d_sigma_t = self.sigma(t)
        return self.d_log_alpha(t) * sigma_t**2 - sigma_t * d_sigma_t


class GVPPath(LinearPath):
    """Generalized variance-preserving path: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return math.pi / (2 * torch.tan(t * math.pi / 2))

    def alpha_over_d_alpha(self, t: Tensor) -> Tensor:
        return 2 * torch.tan(t * math.pi / 2) / math.pi


class VPPath(LinearPath):
    """Variance-preserving (DDPM-like) path: alpha = e^m, sigma = sqrt(1 - e^2m), linear beta in 1 - t."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = beta_min
        self.beta_max = beta_max

    def log_alpha(self, t: Tensor) -> Tensor:
        """m(t) = -1/4 (1-t)^2 (beta_max - beta_min) - 1/2 (1-t) beta_min."""
        return -0.25 * (1 - t) ** 2 * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def d_log_alpha(self, t: Tensor) -> Tensor:
        # m'(t) = beta(t) / 2 with beta(t) = beta_min + (1 - t)(beta_max - beta_min).
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_t = torch.exp(self.log_alpha(t))
        return alpha_t, alpha_t * self.d_log_alpha(t)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_sq = torch.exp(2 * self.log_alpha(t))
        sigma_t = torch.sqrt(1 - alpha_sq)
        return sigma_t, -alpha_sq * self.d_log_alpha(t) / sigma_t

    def alpha_over_d_alpha(self, t: Tensor) -> Tensor:
        return 1 / self.d_log_alpha(t)

    def sbdm_diffusion(self, t: Tensor) -> Tensor:
        # The generic expression simplifies to m'(t) = beta(t) / 2: exact even where sigma -> 0.
        return self.d_log_alpha(t)


PATHS: dict[str, type[LinearPath]] = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")


#################################################################################
#                                  Transport                                    #
#################################################################################


class Transport:
    """A path plus what the model predicts: samples (t, x_t, target), computes losses and converts outputs."""

    def __init__(
        self, path_type: str, prediction: str, loss_weight: str | None, train_eps: float, sample_eps: float
    ):
        if path_type not in PATHS:
            raise ValueError(f"unknown path_type {path_type!r}; choose one of {list(PATHS)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss_weight {loss_weight!r}; choose one of {LOSS_WEIGHTS}")
        self.path_type = path_type
        self.path = PATHS[path_type]()
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.train_eps = train_eps
        self.sample_eps = sample_eps

    def __repr__(self) -> str:
        return (
            f"Transport(path_type={self.path_type!r}, prediction={self.prediction!r}, "
            f"loss_weight={self.loss_weight!r}, "
            f"train_eps={self.train_eps}, sample_eps={self.sample_eps})"
        )

    # ----------------------------------------------------------------- time ranges
    def interval(
        self,
        *,
        sample: bool = False,
        sde: bool = False,
        diffusion_form: str = "sigma",
        last_step_size: float = 0.0,
    ) -> tuple[float, float]:
        """Time range (t0, t1) for training (sample=False) or for an ODE / SDE sampler (sample=True).

        Follows the reference: Linear/GVP + velocity use [0, 1] (stable everywhere); score/noise models keep
        eps away from both ends; VP stops at 1 - eps; an SDE with a last step stops at 1 - last_step_size.

        Example: create_transport().interval() == (0.0, 1.0)
        """
        eps = self.sample_eps if sample else self.train_eps
        t0, t1 = 0.0, 1.0
        end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path_type == "VP":
            t1 = end
        elif self.prediction != "velocity" or sde:
            sbdm = sde and diffusion_form.lower() == "sbdm"
            t0 = eps if (sbdm or self.prediction != "velocity") else 0.0
            t1 = end
            if sbdm and t0 == 0:
                # w_t ~ 1/t is singular at t=0 on these paths (the reference gets NaNs): start later.
                t0 = SBDM_T0
        return float(t0), float(t1)

    def sample_time(
        self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        """t ~ U[t0, t1] of the training interval, shape (batch,), float32 on device.

        Example: t = create_transport().sample_time(8, "cpu", torch.Generator().manual_seed(0))
        """
        t0, t1 = self.interval()
        gen_device = generator.device if generator is not None else device
        t = torch.rand(batch, generator=generator, device=gen_device)
        return (t * (t1 - t0) + t0).to(device)

    # ----------------------------------------------------------------- training
    def plan(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t): the interpolant and its time derivative for noise x0, data x1 at times t (N,)."""
        te = expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = self.path.alpha(te)
        sigma_t, d_sigma_t = self.path.sigma(te)
        return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0

    def training_losses(
        self,
        model: ModelFn,
        x1: Tensor,
        model_kwargs: dict | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample flow-matching loss of model(x_t, t, **model_kwargs) on data x1.

        Returns {"loss": (N,) mean over C, H, W, "t", "xt", "ut" (path velocity), "target" (what the model
        regresses: ut, noise x0, or score -x0/sigma), "pred"}. When both t and noise are given no random
        number is drawn (held-out loss on a fixed grid); otherwise they come from generator (or torch's RNG).

        Example:
            transport = create_transport()
            loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        # The reference's draws: noise first (on x1's device), then t on the CPU, from the same interval
        # (create_transport's defaults are the reference's). So with generator=None a seed gives the same
        # (noise, t) as the reference's Transport.sample; a generator draws both from its own stream instead.
        if noise is None:
            gen_device = generator.device if generator is not None else x1.device
            noise = torch.randn(x1.shape, generator=generator, device=gen_device, dtype=x1.dtype)
            noise = noise.to(x1.device)
        if t is None:
            t = self.sample_time(x1.shape[0], x1.device if generator is not None else "cpu", generator)
        t = t.to(device=x1.device, dtype=torch.promote_types(x1.dtype, torch.float32))
        x0 = noise
        xt, ut = self.plan(t, x0, x1)
        xt, ut = xt.to(x1.dtype), ut.to(x1.dtype)
        pred = model(xt, t, **model_kwargs)
        if pred.shape != xt.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != input shape {tuple(xt.shape)}")

        terms = {"t": t, "xt": xt, "ut": ut, "pred": pred}
        if self.prediction == "velocity":
            # The reference ignores loss_weight for velocity models: plain ||v - u||^2.
            terms["target"] = ut
            terms["loss"] = mean_flat((pred - ut) ** 2)
            return terms

        te = expand_t_like_x(t, xt)
        sigma_t, _ = self.path.sigma(te)
        drift_var = self.path.sbdm_diffusion(te)
        if self.loss_weight == "velocity":
            weight = (drift_var / sigma_t) ** 2  # makes the loss the velocity error of the converted model
        elif self.loss_weight == "likelihood":
            weight = drift_var / sigma_t**2  # score matching weighted as in the likelihood bound
        else:
            weight = torch.ones_like(sigma_t)
        if self.prediction == "noise":
            terms["target"] = x0
            terms["loss"] = mean_flat(weight * (pred - x0) ** 2)
        else:  # score: sigma * s + x0 = 0 at the optimum; the sigma factor keeps the scale bounded
            terms["target"] = -x0 / sigma_t
            terms["loss"] = mean_flat(weight * (pred * sigma_t + x0) ** 2)
        return terms

    # ----------------------------------------------------------------- conversions
    def score_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """s = ((alpha/alpha') v - x) / (sigma^2 - (alpha/alpha') sigma sigma'); Linear: (t v - x) / (1 - t).

        Example: s = transport.score_from_velocity(v, x, t)
        """
        te = expand_t_like_x(t, x)
        sigma_t, d_sigma_t = self.path.sigma(te)
        ratio = self.path.alpha_over_d_alpha(te)
        return (ratio * v - x) / (sigma_t**2 - ratio * d_sigma_t * sigma_t)

    def velocity_from_score(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v = (alpha'/alpha) x + w_t s with w_t the SBDM coefficient."""
        te = expand_t_like_x(t, x)
        return self.path.d_log_alpha(te) * x + self.path.sbdm_diffusion(te) * s

    def velocity_and_score(self, model_output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(velocity, score) at (x, t) from one model output, whatever the model predicts.

        Example: v, s = transport.velocity_and_score(model(x, t, y), x, t)
        """
        if self.prediction == "velocity":
            return model_output, self.score_from_velocity(model_output, x, t)
        if self.prediction == "score":
            score = model_output
        else:  # noise = E[x0 | x_t] = -sigma_t * score
            sigma_t, _ = self.path.sigma(expand_t_like_x(t, x))
            score = -model_output / sigma_t
        return self.velocity_from_score(score, x, t), score

    def velocity(self, model_output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The probability-flow ODE drift from a model output (no score computed for velocity models)."""
        if self.prediction == "velocity":
            return model_output
        return self.velocity_and_score(model_output, x, t)[0]

    def score(self, model_output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The score grad log p_t(x) from a model output."""
        return self.velocity_and_score(model_output, x, t)[1]


# Start of SBDM SDE sampling on Linear/GVP paths when sample_eps is 0 (reference's eps for score models).
SBDM_T0 = 1e-3


def create_transport(
    path_type: str = "Linear",
    prediction: str = "velocity",
    loss_weight: str | None = None,
    train_eps: float | None = None,
    sample_eps: float | None = None,
) -> Transport:
    """Builds a Transport with the reference's default eps: 0 for Linear/GVP + velocity (stable on [0, 1]);
    1e-3 for Linear/GVP score/noise models; VP trains on [0, 1 - 1e-5] and samples up to 1 - 1e-3.

    path_type: "Linear" | "GVP" | "VP"; prediction: "velocity" | "score" | "noise";
    loss_weight (score/noise models only): None | "velocity" | "likelihood".

    Example:
        transport = create_transport()  # SiT baseline: Linear path, velocity prediction, t ~ U[0, 1]
    """
    stable = path_type in ("Linear", "GVP") and prediction == "velocity"
    default_sample_eps = 0.0 if stable else 1e-3
    default_train_eps = 1e-5 if path_type == "VP" else default_sample_eps
    train_eps = default_train_eps if train_eps is None else train_eps
    sample_eps = default_sample_eps if sample_eps is None else sample_eps
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)
