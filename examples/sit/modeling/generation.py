"""Generating samples: a sampler from the flags, classifier-free guidance, noise -> sample."""
from __future__ import annotations

from collections.abc import Callable

import torch

from modeling.models import REFERENCE_CFG_CHANNELS, SiT, default_cfg_channels
from modeling.samplers import Sampler

FIXED_STEP_METHODS = ("euler", "heun")  # modeling/samplers.py's own integrators (ODE and SDE)
# torchdiffeq's adaptive solvers (the reference SiT's ODE default is dopri5); they choose their own steps.
ADAPTIVE_ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)
CFG_CHANNEL_RULES = ("auto", "reference", "all")  # --cfg-channels' names; a number is taken as it is


def make_sample_fn(transport, mode: str, method: str, num_steps: int | None, last_step: str | None = "Mean", *,
                   atol: float = 1e-6, rtol: float = 1e-3, diffusion_form: str = "sigma",
                   diffusion_norm: float = 1.0, last_step_size: float = 0.04) -> Callable:
    """fn(z, model_fn, generator=None, **model_kwargs) -> samples at t=1 (see modeling/samplers.py).

    mode "ode": method euler / heun (num_steps fixed steps) or an adaptive torchdiffeq solver (dopri5, ...:
    atol / rtol, num_steps unused); mode "sde": method euler / heun with the diffusion form and norm and the
    last step of the reference sampler. Defaults are the reference's (willisma/SiT train_utils.py)."""
    sampler = Sampler(transport)
    method = method.lower()
    if mode == "ode":
        if method in ADAPTIVE_ODE_METHODS:
            return sampler.sample_ode_adaptive(method=method, atol=atol, rtol=rtol)
        return sampler.sample_ode(num_steps=num_steps, method=method)
    return sampler.sample_sde(num_steps=num_steps, method=method, diffusion_form=diffusion_form,
                              diffusion_norm=diffusion_norm, last_step=last_step, last_step_size=last_step_size)


def resolve_cfg_channels(rule: str | int | None, in_channels: int) -> int:
    """The number of channels guidance acts on: --cfg-channels auto (or None) = models.default_cfg_channels
    (the reference's 3 for 4-channel latents, all otherwise), reference = the first 3 whatever the model,
    all = every channel, or a number.

    >>> resolve_cfg_channels(None, 16), resolve_cfg_channels("reference", 16), resolve_cfg_channels("all", 4)
    (16, 3, 4)
    """
    if rule in (None, "auto"):
        return default_cfg_channels(in_channels)
    if rule == "reference":
        return min(REFERENCE_CFG_CHANNELS, in_channels)
    if rule == "all":
        return in_channels
    return int(rule)


def describe_cfg_channels(channels: int, in_channels: int) -> str:
    """'channels 0-2 of 4 (the reference SiT's convention ...)' and the like, for the scripts' output.

    >>> describe_cfg_channels(16, 16)
    'all 16 channels'
    """
    if channels >= in_channels:
        return f"all {in_channels} channels"
    text = f"channels 0-{channels - 1} of {in_channels}"
    if channels == REFERENCE_CFG_CHANNELS and in_channels == 4:
        text += " (the reference SiT's convention for SD-VAE latents; --cfg-channels all guides every channel)"
    return text


def guided_call(model: SiT, cfg_scale: float, cfg_channels: int | None = None,
                guidance_interval: tuple[float, float] | None = None) -> tuple[Callable, Callable]:
    """(prepare, model_fn): prepare(z, y) -> (z', kwargs) doubles the batch for CFG when cfg_scale > 1;
    model_fn is what the sampler calls. Take the first half of the result when guided. cfg_channels None: the
    model's default (models.default_cfg_channels). guidance_interval (t_lo, t_hi) guides only there
    (models.SiT.forward_with_cfg)."""
    if cfg_scale <= 1.0:
        return (lambda z, y: (z, dict(y=y))), model.forward

    def prepare(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        null = torch.full_like(y, model.num_classes)
        kwargs = dict(y=torch.cat([y, null]), cfg_scale=cfg_scale, cfg_channels=cfg_channels)
        if guidance_interval is not None:
            kwargs["guidance_interval"] = tuple(guidance_interval)
        return torch.cat([z, z]), kwargs

    return prepare, model.forward_with_cfg


@torch.no_grad()
def generate(model: SiT, z: torch.Tensor, y: torch.Tensor, sample_fn: Callable, cfg_scale: float = 1.0,
             cfg_channels: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
             guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Run the sampler from noise z with labels y (classifier-free guidance when cfg_scale > 1)."""
    prepare, model_fn = guided_call(model, cfg_scale, cfg_channels, guidance_interval)
    z_in, kwargs = prepare(z, y)
    x = sample_fn(z_in, model_fn, generator=generator, **kwargs)
    return x[: len(z)]


def has_null_class(model: SiT) -> bool:
    """Whether the label table has the null row that classifier-free guidance needs (label dropout > 0)."""
    return model.y_embedder.embedding_table.num_embeddings > model.num_classes
