"""Procedural sinusoid images with a known distribution: no download, no network."""

import math

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_sinusoid_params(
    n: int, image_size: int = 32, generator: torch.Generator | None = None, components: int = 1
) -> dict[str, torch.Tensor]:
    """
    Draw the parameters of n images with K=components waves each: integer frequency f in 1..S/4
    (cycles per image, below Nyquist), direction theta ~ U[0, pi), phase phi ~ U[0, 2 pi), colours
    c0, c1 ~ U[0, 1]^3. Shapes: f, theta, phi (n, K); c0, c1 (n, K, 3).

    >>> sample_sinusoid_params(5, 32)["c0"].shape
    torch.Size([5, 1, 3])
    """
    max_freq = max(1, image_size // 4)
    shape = (n, components)
    # One draw per field in a fixed order, so a given generator state always yields the same images.
    f = torch.randint(1, max_freq + 1, shape, generator=generator).double()
    theta = torch.rand(shape, generator=generator, dtype=torch.float64) * math.pi
    phi = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * math.pi
    c0 = torch.rand(shape + (3,), generator=generator, dtype=torch.float64)
    c1 = torch.rand(shape + (3,), generator=generator, dtype=torch.float64)
    return dict(f=f, theta=theta, phi=phi, c0=c0, c1=c1)


def render_sinusoids(params: dict[str, torch.Tensor], image_size: int = 32) -> torch.Tensor:
    """
    Images in [0, 1], shape (n, 3, S, S): x(u, v) = c0 + (c1 - c0) * (1 + sin(2 pi f (u cos theta +
    v sin theta) / S + phi)) / 2 with u the column and v the row index; K components are averaged.

    >>> render_sinusoids(sample_sinusoid_params(2, 16), 16).shape
    torch.Size([2, 3, 16, 16])
    """
    coords = torch.arange(image_size, dtype=torch.float64)
    v, u = coords[:, None], coords[None, :]
    f, theta, phi = (params[k][..., None, None] for k in ("f", "theta", "phi"))  # (n, K, 1, 1)
    wave = 0.5 * (
        1 + torch.sin(2 * math.pi * f * (u * torch.cos(theta) + v * torch.sin(theta)) / image_size + phi)
    )
    c0, c1 = params["c0"][..., None, None], params["c1"][..., None, None]  # (n, K, 3, 1, 1)
    images = c0 + (c1 - c0) * wave[:, :, None]
    return images.mean(dim=1).float()


def make_sinusoids(
    n: int, image_size: int = 32, generator: torch.Generator | None = None, components: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    n sinusoid images in [-1, 1] (n, 3, S, S) and their parameters (see sample_sinusoid_params).

    >>> images, params = make_sinusoids(8, 32, torch.Generator().manual_seed(0))
    >>> images.shape, bool(images.min() >= -1), bool(images.max() <= 1)
    (torch.Size([8, 3, 32, 32]), True, True)
    """
    params = sample_sinusoid_params(n, image_size, generator, components)
    return render_sinusoids(params, image_size) * 2 - 1, params


def _index_generator(seed: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, index) alone: item i never depends on the dataset length."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class SinusoidDataset(Dataset):
    """Procedural sinusoid images (3xSxS in [-1, 1], label 0); item i is a pure function of (seed, i)."""

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, components: int = 1):
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.components = components

    def __len__(self) -> int:
        return self.num_samples

    def params(self, index: int) -> dict[str, torch.Tensor]:
        """The true parameters of item index (each with a leading batch dim of 1)."""
        return sample_sinusoid_params(1, self.image_size, _index_generator(self.seed, index), self.components)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return render_sinusoids(self.params(index), self.image_size)[0] * 2 - 1, 0
