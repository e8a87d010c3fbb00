"""Loading a SiT from a checkpoint: one of train.py's (config inside) or an official one (config from flags)."""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch
from runtime.checks import read_checkpoint
from runtime.cli import UsageError

from modeling.latent_scaling import SD_SCALING, of_checkpoint, trained_on
from modeling.models import SiT, create_model, load_official_checkpoint
from modeling.transport import PATHS, PREDICTIONS

OFFICIAL_DEFAULTS = dict(image_size=256, num_classes=1000)  # flags that only describe official checkpoints


def _load_error(path: str, error: Exception) -> UsageError:
    """A state_dict mismatch as one line: the first missing / unexpected / mis-sized keys."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
    detail = "; ".join(lines)
    detail = detail if len(detail) <= 240 else detail[:240] + "..."
    return UsageError(f"weights in checkpoint {path} do not fit the model ({detail}): the file is damaged or "
                      "from another model; choose another --ckpt")


def _build_ours(state: Mapping, path: str, use_ema: bool) -> tuple[SiT, dict[str, Any]]:
    weights = "ema" if use_ema else "model"
    missing = [key for key in ("model_config", weights, "latent") if key not in state]
    if missing:
        hint = " or pass --no-ema (it holds raw weights only)" if missing == ["ema"] and "model" in state else ""
        raise UsageError(f"checkpoint {path} lacks {', '.join(missing)}: not a complete train.py checkpoint; "
                         f"choose another --ckpt{hint}")
    config = dict(state["model_config"])
    try:
        model = SiT(**config)
    except (TypeError, ValueError) as error:
        raise UsageError(f"checkpoint {path} has an unusable model_config {config} ({error})") from error
    try:
        model.load_state_dict(state[weights])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise _load_error(path, error) from error
    run_args = state.get("args") or {}
    run_args = vars(run_args) if isinstance(run_args, argparse.Namespace) else dict(run_args)
    transport = dict(path_type=run_args.get("path_type", "Linear"), prediction=run_args.get("prediction", "velocity"))
    if transport["path_type"] not in PATHS or transport["prediction"] not in PREDICTIONS:
        raise UsageError(f"checkpoint {path} was trained with an unknown transport {transport}")
    scaling, assumed = of_checkpoint(state, config.get("in_channels", 4))
    info = dict(official=False, latent=bool(state["latent"]), vae=state.get("vae"), config=config,
                step=state.get("step"), transport=transport, latent_scaling=scaling, latent_scaling_assumed=assumed,
                trained_on=trained_on(state))
    return model, info


def _build_official(state: Any, path: str, model_name: str | None, image_size: int,
                    num_classes: int) -> tuple[SiT, dict[str, Any]]:
    if not isinstance(state, Mapping):
        raise UsageError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict: choose another --ckpt")
    if model_name is None:
        raise UsageError(f"{path} is an official (config-less) checkpoint: pass --model, e.g. --model SiT-XL/2")
    if image_size % 8:
        raise UsageError(f"--image-size must be a multiple of 8 (the VAE's downsampling), got {image_size}")
    config = dict(input_size=image_size // 8, num_classes=num_classes, learn_sigma=False)
    try:
        model = load_official_checkpoint(create_model(model_name, **config), state)
    except (RuntimeError, ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"{_load_error(path, error)} or check --model, --image-size and --num-classes") from error
    info = dict(official=True, latent=True, vae=None, config=dict(config, in_channels=4), step=None,
                transport=dict(path_type="Linear", prediction="velocity"), latent_scaling=SD_SCALING,
                latent_scaling_assumed=False, trained_on=None)  # the official models: SD-VAE latents
    return model, info


def load_model(ckpt: str, device: torch.device, model_name: str | None = None, image_size: int = 256,
               num_classes: int = 1000, use_ema: bool = True) -> tuple[SiT, dict[str, Any]]:
    """A SiT in eval mode from a train.py checkpoint (config stored inside) or an official checkpoint
    (config from model_name / image_size / num_classes, latent space). Returns (model, info) with info
    holding official (bool), latent (bool), vae (train.py's --vae, if latent), the SiT config, step,
    transport (the path_type / prediction it was trained with), latent_scaling (the factors of its latents,
    modeling/latent_scaling.py; None for pixel models) and latent_scaling_assumed (a checkpoint from before
    the record: SD's factors assumed). Unusable files raise cli.UsageError."""
    state = read_checkpoint(ckpt)
    if isinstance(state, Mapping) and "model_config" in state:
        model, info = _build_ours(state, ckpt, use_ema)
    else:
        model, info = _build_official(state, ckpt, model_name, image_size, num_classes)
    return model.to(device).eval(), info
