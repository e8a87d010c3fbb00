"""The VAE of latent-space models: loading a diffusers AutoencoderKL, decoding latents to uint8 images."""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from runtime.cli import UsageError
from torch import nn

from modeling.hub import fetch_from_hub
from modeling.latent_scaling import LatentScaling, of_vae


def load_vae(name_or_path: str, device: torch.device | str = "cpu") -> nn.Module:
    """
    diffusers AutoencoderKL from a local directory (offline) or a hub id, frozen, in eval mode. A pipeline
    directory with a vae/ subfolder works too. One that cannot be loaded raises cli.UsageError.

    >>> vae = load_vae("/models/sd-vae-ft-ema")  # doctest: +SKIP
    """
    from diffusers.models import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    # diffusers' default low_cpu_mem_usage=True needs accelerate; without it diffusers prints a multi-line
    # notice on every load (every rank) and loads the normal way, as asking for that does silently.
    load = functools.partial(AutoencoderKL.from_pretrained, low_cpu_mem_usage=is_accelerate_available())

    local = os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local and not os.path.isdir(name_or_path):
        raise UsageError(f"VAE folder {name_or_path} does not exist: pass a local diffusers AutoencoderKL "
                         "directory (or a hub id) with --vae")
    subfolder = None
    if (
        os.path.isdir(name_or_path)
        and not os.path.exists(os.path.join(name_or_path, "config.json"))
        and os.path.exists(os.path.join(name_or_path, "vae", "config.json"))
    ):
        subfolder = "vae"
    try:
        if local:
            vae = load(name_or_path, subfolder=subfolder)
        else:  # a hub id: the cache first, and no retries when the hub cannot be reached
            vae = fetch_from_hub(load, name_or_path, "the VAE",
                                 "pass --vae PATH, a local diffusers AutoencoderKL folder (save_pretrained)")
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load the VAE {name_or_path} ({reason}): pass a local diffusers AutoencoderKL "
                         "directory with --vae") from error
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: nn.Module, images: torch.Tensor, scaling: LatentScaling | None = None,
                  generator: torch.Generator | None = None, sample: bool = True,
                  chunk: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> model latents (scaling.from_vae of a posterior sample, or of its mean with
    sample=False), in encoder calls of at most chunk images (default: one call); scaling defaults to the
    VAE's own config factors."""
    scaling = scaling or of_vae(vae)
    parts = []
    for part in images.split(chunk or len(images)):
        posterior = vae.encode(part).latent_dist
        parts.append(scaling.from_vae(posterior.sample(generator=generator) if sample else posterior.mean))
    return torch.cat(parts)


@torch.no_grad()
def decode_to_uint8(x: torch.Tensor, vae: nn.Module | None = None, chunk: int = 32,
                    scaling: LatentScaling | None = None) -> np.ndarray:
    """Model samples (latents if vae is given, else pixels in [-1, 1]) -> uint8 (N, H, W, 3). Latents are
    decoded as vae.decode(z / scaling_factor + shift_factor), with the factors the latents were made with
    (scaling; default: the VAE's own config)."""
    if vae is not None:
        scaling = scaling or of_vae(vae)
        x = torch.cat([vae.decode(scaling.to_vae(part)).sample for part in x.split(chunk)])
    if x.shape[1] == 1:  # grayscale (Fashion-MNIST): 3 channels, as the ADM npz and PNG grids expect
        x = x.expand(-1, 3, -1, -1)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
