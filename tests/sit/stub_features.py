"""A fast, deterministic stand-in for the Inception network: fixed random projections of the pixels."""
import numpy as np
import torch
from evaluation.inception import Activations


class StubFeatures:
    """uint8 NxHxWx3 images -> Activations: pool and spatial features are seeded linear maps of the pixels
    (each image's features depend on that image only, whatever the batch). Small dimensions keep the
    Frechet distances' matrix square roots cheap."""

    def __init__(self, seed: int = 0, pool_dim: int = 16, spatial_dim: int = 12):
        self.seed = seed
        self.dims = {"pool": pool_dim, "spatial": spatial_dim}
        self.calls: list[np.ndarray] = []  # the images each call received

    def __call__(self, images: np.ndarray) -> Activations:
        self.calls.append(images.copy())
        pixels = images.reshape(len(images), -1).astype(np.float64) / 255
        rng = np.random.default_rng(self.seed)
        pool = rng.normal(size=(pixels.shape[1], self.dims["pool"])) / np.sqrt(pixels.shape[1])
        spatial = rng.normal(size=(pixels.shape[1], self.dims["spatial"])) / np.sqrt(pixels.shape[1])
        rows = [(row @ pool, row @ spatial) for row in pixels]  # row by row: no batch-dependent BLAS blocking
        return Activations(np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows], np.float32))

    def describe(self) -> dict:
        return dict(name="stub")


def stub_factory(device: torch.device, batch_size: int) -> StubFeatures:
    """build_reference.py's extractor_factory for the stub."""
    return StubFeatures()
