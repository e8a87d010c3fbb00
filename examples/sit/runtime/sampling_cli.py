"""The flags and checks that sample.py and sample_ddp.py share."""
from __future__ import annotations

import argparse
import math
from typing import Any

from modeling.generation import has_null_class
from modeling.loading import OFFICIAL_DEFAULTS
from modeling.models import SiT, SiT_models

from runtime.cli import UsageError


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


def add_guidance_args(parser: argparse.ArgumentParser, cfg_default_help: str) -> None:
    """Classifier-free guidance flags (shared with sample_ddp.py)."""
    parser.add_argument("--cfg-scale", type=float, default=None, help=cfg_default_help)
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="channels guided: 3 = reference (DiT), 4 = all (REPA) (default: 3, or fewer if the "
                             "model has fewer; needs --cfg-scale > 1)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only at LO <= t <= HI (t=0 noise, t=1 data; REPA's [lo, hi] is 1-hi 1-lo "
                             "here; needs --cfg-scale > 1) (default: every step)")


def check_sampling_args(args: argparse.Namespace) -> None:
    """Flags that are wrong whatever the model (shared with sample_ddp.py); raises cli.UsageError."""
    if args.num_steps is not None:
        least = 1 if args.mode == "ode" else 2
        if args.num_steps < least:
            raise UsageError(f"--num-steps must be >= {least} for --mode {args.mode}, got {args.num_steps}")
    if args.cfg_scale is not None and not 0 <= args.cfg_scale < math.inf:  # NaN fails too
        raise UsageError(f"--cfg-scale must be >= 0 and finite (1 = no guidance), got {args.cfg_scale}")
    seed_flag = "--seed" if hasattr(args, "seed") else "--global-seed"
    seed = getattr(args, seed_flag[2:].replace("-", "_"))
    if not 0 <= seed < 2**63:  # the range that torch and numpy seeding both accept
        raise UsageError(f"{seed_flag} must be in [0, 2**63), got {seed}")
    if args.cfg_channels is not None and args.cfg_channels < 1:
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
    if args.cfg_channels is not None and args.cfg_channels > model.in_channels:
        raise UsageError(f"--cfg-channels {args.cfg_channels}: the model has {model.in_channels} channels")
