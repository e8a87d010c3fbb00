"""The flags and checks that sample.py and sample_ddp.py share."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
from modeling.generation import (
    ADAPTIVE_ODE_METHODS,
    CFG_CHANNEL_RULES,
    DIFFUSION_FORMS,
    FIXED_STEP_METHODS,
    LAST_STEPS,
    has_null_class,
)
from modeling.latent_scaling import LatentScaling, before_the_record, check_same, of_vae
from modeling.loading import OFFICIAL_DEFAULTS
from modeling.models import SiT, SiT_models
from modeling.vae import load_vae
from torch import nn

from runtime.cli import UsageError

# The reference's sampler defaults (willisma/SiT train_utils.py: parse_ode_args / parse_sde_args).
SAMPLER_DEFAULTS = dict(atol=1e-6, rtol=1e-3, diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                        last_step_size=0.04)
SDE_FLAGS = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load (shared with sample_ddp.py)."""
    parser.add_argument("--ckpt", type=str, required=True, help="train.py checkpoint or official .pt (required)")
    parser.add_argument("--model", type=str, default=None, choices=sorted(SiT_models), metavar="NAME",
                        help="official checkpoints only: their config, e.g. SiT-XL/2 (default: none)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"official checkpoints only: image pixels (default: {OFFICIAL_DEFAULTS['image_size']})")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help=f"official checkpoints only: classes (default: {OFFICIAL_DEFAULTS['num_classes']})")
    parser.add_argument("--vae", type=str, default=None,
                        help="latent models: VAE dir or hub id (default: the one the checkpoint was trained with)")
    parser.add_argument("--no-ema", action="store_true",
                        help="our checkpoints: raw weights instead of EMA (default: EMA)")


def cfg_channels_type(text: str) -> str | int:
    """argparse type of --cfg-channels: auto, reference, all or a number >= 1."""
    if text in CFG_CHANNEL_RULES:
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is none of {', '.join(CFG_CHANNEL_RULES)} or a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_guidance_args(parser: argparse.ArgumentParser, cfg_default_help: str, prefix: str = "") -> None:
    """Classifier-free guidance flags (shared with sample_ddp.py; train.py's --fid-* with prefix "fid-")."""
    scale = f"--{prefix}cfg-scale"
    parser.add_argument(scale, type=float, default=None, help=cfg_default_help)
    parser.add_argument(f"--{prefix}cfg-channels", type=cfg_channels_type, default=None, metavar="RULE",
                        help="channels guided: auto = the reference SiT's channels 0-2 for 4-channel (SD-VAE) "
                             "latents and every channel of any other model; reference = channels 0-2 whatever the "
                             f"VAE; all = every channel (REPA); or a number (default: auto; needs {scale} > 1)")
    parser.add_argument(f"--{prefix}guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only at LO <= t <= HI (t=0 noise, t=1 data; REPA's [lo, hi] is 1-hi 1-lo "
                             f"here; needs {scale} > 1) (default: every step)")


def add_sampler_args(parser: argparse.ArgumentParser, mode: str, method: str, steps_help: str,
                     prefix: str = "") -> None:
    """The sampler's flags (shared with sample_ddp.py): --mode / --method, and the reference SiT's names
    --sampling-method, --atol, --rtol, --diffusion-form, --diffusion-norm, --last-step, --last-step-size.
    With a prefix ("fid-": train.py's --fid-mode ...) the same flags under other names, and no
    default_method attribute (resolve_sampler then reads an unprefixed view that carries it)."""
    flag = lambda name: f"--{prefix}{name}"
    group = parser.add_argument_group("sampler (the reference SiT's flags and defaults, willisma/SiT)" if not prefix
                                      else f"sampler of the {flag('*')} evaluation (as sample_ddp.py's flags)")
    group.add_argument(flag("mode"), choices=["ode", "sde"], default=mode, help="sampler (default: %(default)s)")
    group.add_argument(flag("method"), choices=list(FIXED_STEP_METHODS), default=None,
                       help=f"fixed-step integrator, same as {flag('sampling-method')} euler|heun (default: {method})")
    group.add_argument(flag("sampling-method"), type=str, default=None, metavar="NAME",
                       help=f"ODE: {', '.join(FIXED_STEP_METHODS + ADAPTIVE_ODE_METHODS)} (the last ones adaptive, "
                            f"torchdiffeq; the reference's ODE default is dopri5); SDE: Euler or Heun "
                            f"(case-insensitive) (default: {method})")
    group.add_argument(flag("num-steps"), type=int, default=None, help=steps_help)
    group.add_argument(flag("atol"), type=float, default=None,
                       help=f"adaptive ODE solvers: absolute tolerance (default: {SAMPLER_DEFAULTS['atol']})")
    group.add_argument(flag("rtol"), type=float, default=None,
                       help=f"adaptive ODE solvers: relative tolerance (default: {SAMPLER_DEFAULTS['rtol']})")
    group.add_argument(flag("diffusion-form"), choices=list(DIFFUSION_FORMS), default=None,
                       help=f"SDE: diffusion coefficient w(t) (default: {SAMPLER_DEFAULTS['diffusion_form']})")
    group.add_argument(flag("diffusion-norm"), type=float, default=None,
                       help=f"SDE: scale of w(t) (default: {SAMPLER_DEFAULTS['diffusion_norm']})")
    group.add_argument(flag("last-step"), choices=[str(step) for step in LAST_STEPS], default=None,
                       help=f"SDE: the final jump to t=1; None = integrate to the end (default: "
                            f"{SAMPLER_DEFAULTS['last_step']})")
    group.add_argument(flag("last-step-size"), type=float, default=None,
                       help=f"SDE: length of the last step (default: {SAMPLER_DEFAULTS['last_step_size']})")
    if not prefix:
        parser.set_defaults(default_method=method)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None) is not None]


def resolve_sampler(args: argparse.Namespace, default_steps: dict[str, int]) -> dict[str, Any]:
    """The sampler settings the flags ask for, every one filled in (None where it does not apply), or
    cli.UsageError for a combination that would be ignored or cannot run. Sets args.method and
    args.num_steps to the values used."""
    method = (args.sampling_method or args.method or args.default_method).lower()
    if args.sampling_method and args.method and args.sampling_method.lower() != args.method:
        raise UsageError(f"--method {args.method} and --sampling-method {args.sampling_method} name the integrator "
                         "twice and disagree: give one of them")
    ode_methods = FIXED_STEP_METHODS + ADAPTIVE_ODE_METHODS
    if args.mode == "ode" and method not in ode_methods:
        raise UsageError(f"--sampling-method {method}: --mode ode takes one of {', '.join(ode_methods)}")
    if args.mode == "sde" and method not in FIXED_STEP_METHODS:
        kind = "an adaptive ODE solver" if method in ADAPTIVE_ODE_METHODS else "unknown"
        raise UsageError(f"--sampling-method {method} is {kind}: --mode sde integrates with Euler or Heun "
                         "(or use --mode ode)")
    adaptive = method in ADAPTIVE_ODE_METHODS
    settings: dict[str, Any] = dict(mode=args.mode, method=method, num_steps=None, atol=None, rtol=None,
                                    **{name: None for name in SDE_FLAGS})
    if args.mode == "ode" and _given(args, SDE_FLAGS):
        raise UsageError(f"{_given(args, SDE_FLAGS)[0]} only applies to --mode sde: drop it (or add --mode sde)")
    if not adaptive and _given(args, ("atol", "rtol")):
        raise UsageError(f"{_given(args, ('atol', 'rtol'))[0]} only applies to the adaptive ODE solvers "
                         f"(--mode ode --sampling-method {'|'.join(ADAPTIVE_ODE_METHODS)}), not {args.mode} "
                         f"{method}: drop it")
    if adaptive:
        if args.num_steps is not None:
            raise UsageError(f"--num-steps: {method} chooses its own steps (set --atol / --rtol instead): drop it")
        for name in ("atol", "rtol"):
            value = SAMPLER_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
            if not 0 < value < math.inf:
                raise UsageError(f"--{name} must be > 0 and finite, got {value}")
            settings[name] = value
    else:
        least = 1 if args.mode == "ode" else 2
        settings["num_steps"] = default_steps[args.mode] if args.num_steps is None else args.num_steps
        if settings["num_steps"] < least:
            raise UsageError(f"--num-steps must be >= {least} for --mode {args.mode}, got {settings['num_steps']}")
    if args.mode == "sde":
        settings.update({name: SAMPLER_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
                         for name in SDE_FLAGS})
        if settings["last_step"] == "None":
            if args.last_step_size is not None:
                raise UsageError("--last-step-size is ignored with --last-step None (no last step): drop one of them")
            settings["last_step"], settings["last_step_size"] = None, None
        elif not 0 < settings["last_step_size"] < 1:
            raise UsageError(f"--last-step-size must be in (0, 1), got {settings['last_step_size']}")
        if not 0 <= settings["diffusion_norm"] < math.inf:
            raise UsageError(f"--diffusion-norm must be >= 0 and finite, got {settings['diffusion_norm']}")
    args.method, args.num_steps = method, settings["num_steps"]
    return settings


def sampler_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """resolve_sampler's settings as keyword arguments of modeling.generation.make_sample_fn."""
    always = ("mode", "method", "num_steps", "last_step")  # None means something for these, or is checked there
    return {key: value for key, value in settings.items() if value is not None or key in always}


def describe_sampler(settings: dict[str, Any]) -> str:
    """'sde euler, 250 steps, sigma x1.0, last step Mean 0.04' and the like, for the scripts' messages."""
    if settings["num_steps"] is None:
        return f"ode {settings['method']}, atol {settings['atol']:g}, rtol {settings['rtol']:g}"
    text = f"{settings['mode']} {settings['method']}, {settings['num_steps']} steps"
    if settings["mode"] == "sde":
        text += f", {settings['diffusion_form']} x{settings['diffusion_norm']:g}, last step {settings['last_step']}"
        if settings["last_step"] is not None:
            text += f" {settings['last_step_size']:g}"
    return text


def load_checked_vae(args: argparse.Namespace, info: dict[str, Any], device: torch.device | str,
                     announce: bool = True) -> tuple[nn.Module | None, LatentScaling | None]:
    """The VAE of a latent model (--vae or the checkpoint's) and the factors of its latents; cli.UsageError
    when the VAE's latents are not the ones the checkpoint was trained on (channels, scaling, shift)."""
    if not info["latent"]:
        return None, None
    name = args.vae or info["vae"]
    vae = load_vae(name, device)
    expected: LatentScaling = info["latent_scaling"]
    actual = of_vae(vae)
    what = f"checkpoint {args.ckpt}"
    if info["official"]:
        what = f"official checkpoint {args.ckpt} (trained on SD-VAE latents)"
    elif info["latent_scaling_assumed"]:
        # Decode as the model was trained then; only the channels can be checked against the VAE.
        expected = before_the_record(info["trained_on"], actual, expected.latent_channels)
        actual = LatentScaling(expected.scaling_factor, expected.shift_factor, actual.latent_channels)
        what += " (saved before checkpoints recorded the VAE's factors)"
    check_same(expected, actual, what, f"--vae {name}", "pass the VAE the model was trained with")
    if info["latent_scaling_assumed"] and announce:
        print(f"note: {args.ckpt} predates the record of its VAE's factors: decoding with {expected.describe()} "
              f"(what train.py --data {info['trained_on'] or 'imagenet'} applied then)", file=sys.stderr)
    return vae, expected


def check_sampling_args(args: argparse.Namespace) -> None:
    """Flags that are wrong whatever the model (shared with sample_ddp.py); raises cli.UsageError."""
    if args.cfg_scale is not None and not 0 <= args.cfg_scale < math.inf:  # NaN fails too
        raise UsageError(f"--cfg-scale must be >= 0 and finite (1 = no guidance), got {args.cfg_scale}")
    seed_flag = "--seed" if hasattr(args, "seed") else "--global-seed"
    seed = getattr(args, seed_flag[2:].replace("-", "_"))
    if not 0 <= seed < 2**63:  # the range that torch and numpy seeding both accept
        raise UsageError(f"{seed_flag} must be in [0, 2**63), got {seed}")
    if isinstance(args.cfg_channels, int) and args.cfg_channels < 1:
        raise UsageError(f"--cfg-channels must be >= 1, got {args.cfg_channels}")
    if args.guidance_interval is not None:
        lo, hi = args.guidance_interval
        if not 0 <= lo < hi <= 1:
            raise UsageError(f"--guidance-interval needs 0 <= LO < HI <= 1 (t=0 noise, t=1 data), got {lo} {hi}")


def check_model_args(args: argparse.Namespace, model: SiT, info: dict[str, Any], cfg_scale: float) -> None:
    """Flags that the loaded model would ignore or cannot honour (shared with sample_ddp.py)."""
    if not info["official"]:
        given = [f"--{name.replace('_', '-')}" for name in ("model", "image_size", "num_classes")
                 if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only for official checkpoints; {args.ckpt} stores its own "
                             "config: drop them")
    elif args.no_ema:
        raise UsageError(f"--no-ema: official checkpoint {args.ckpt} holds one set of weights; drop the flag")
    if not info["latent"] and args.vae is not None:
        raise UsageError(f"--vae: {args.ckpt} is a pixel-space model that uses no VAE; drop the flag")
    if info["latent"] and (args.vae or info["vae"]) is None:
        raise UsageError("latent-space model: pass --vae (a local diffusers AutoencoderKL directory or a hub id)")
    guided = cfg_scale > 1
    if guided and not has_null_class(model):
        raise UsageError(f"--cfg-scale {cfg_scale}: {args.ckpt} was trained without label dropout, so it has no "
                         "null class for guidance; use --cfg-scale 1")
    if not guided and args.cfg_channels is not None:
        raise UsageError(f"--cfg-channels is ignored without guidance (--cfg-scale {cfg_scale} <= 1): drop it")
    if not guided and args.guidance_interval is not None:
        raise UsageError(f"--guidance-interval is ignored without guidance (--cfg-scale {cfg_scale} <= 1): "
                         "drop it or raise --cfg-scale")
    if isinstance(args.cfg_channels, int) and args.cfg_channels > model.in_channels:
        raise UsageError(f"--cfg-channels {args.cfg_channels}: the model has {model.in_channels} channels")
