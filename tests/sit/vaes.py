"""Tiny random diffusers VAEs saved locally (no download), with the factors of the VAE they stand in for."""
from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_vae(path: Path, latent_channels: int = 4, scaling_factor: float = 0.18215,
                  shift_factor: float | None = None, seed: int = 0) -> Path:
    """An AutoencoderKL with 2x downsampling (8x8 images -> 4x4 latents) written to path; returns path."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=scaling_factor,
                        shift_factor=shift_factor)
    vae.save_pretrained(path)
    return path
