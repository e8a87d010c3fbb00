"""Samples seeded by their global index: sample i draws its label, starting noise and SDE Brownian noise from
generators seeded by (global seed, i) alone, so a set of N samples is the same images whatever the number of
processes and the batch they are drawn in (sample_ddp.py, and the FID of evaluation/sample_metrics.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from modeling.generation import generate
from modeling.latent_scaling import LatentScaling
from modeling.models import SiT
from modeling.vae import decode_to_uint8

__all__ = ["sample_seed", "sample_inputs", "sample_images", "batch_indices"]


def sample_seed(global_seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (global_seed, index, stream).

    >>> sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(0, 2)
    True
    """
    state = np.random.SeedSequence([global_seed, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_inputs(indices: Sequence[int], global_seed: int, num_classes: int, shape: tuple[int, ...]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and noise (N, *shape) of the given sample indices, each from its own generator.

    >>> labels, noise = sample_inputs(range(3), 0, 10, (4, 8, 8))
    >>> labels.shape, noise.shape
    (torch.Size([3]), torch.Size([3, 4, 8, 8]))
    """
    labels, noise = [], []
    for i in indices:
        gen = torch.Generator().manual_seed(sample_seed(global_seed, i))
        labels.append(torch.randint(0, num_classes, (), generator=gen))
        noise.append(torch.randn(shape, generator=gen))
    return torch.stack(labels), torch.stack(noise)


def batch_indices(num: int, batch: int, rank: int, world_size: int) -> list[range]:
    """This rank's share of samples 0..num-1: batch k holds [k*batch, (k+1)*batch), rank r takes batches
    r, r + world_size, ... (the same split as sample_ddp.py's).

    >>> batch_indices(5, 2, 1, 2)
    [range(2, 4)]
    """
    return [range(k * batch, min((k + 1) * batch, num)) for k in range(rank, -(-num // batch), world_size)]


@torch.no_grad()
def sample_images(model: SiT, indices: Sequence[int], global_seed: int, shape: tuple[int, ...],
                  sample_fn: Callable, device: torch.device, cfg_scale: float = 1.0, cfg_channels: int | None = None,
                  guidance_interval: Sequence[float] | None = None, precision: str = "fp32",
                  vae: nn.Module | None = None, scaling: LatentScaling | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images of the given sample indices: each sample's label, noise and SDE noise from its
    own generators (stream 0: label and noise, stream 1: the SDE's Brownian noise), the network under bf16
    autocast when precision is "bf16" (the sampler's state stays fp32), latents decoded by vae with scaling.

    >>> images = sample_images(model, range(8), 0, (4, 32, 32), fn, torch.device("cpu"), vae=vae)  # doctest: +SKIP
    """
    labels, noise = sample_inputs(indices, global_seed, model.num_classes, shape)
    sde_gens = [torch.Generator(device).manual_seed(sample_seed(global_seed, i, stream=1)) for i in indices]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        x = generate(model, noise.to(device), labels.to(device), sample_fn, cfg_scale, cfg_channels, sde_gens,
                     guidance_interval=guidance_interval)
    return decode_to_uint8(x, vae, scaling=scaling)
