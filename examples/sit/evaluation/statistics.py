"""
The Gaussian statistics FID and sFID compare: computed from activations as ADM's evaluator does
(mean, ``np.cov(rowvar=False)``), or read from an ADM-format .npz that carries them.

ADM reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold ``mu`` / ``sigma`` (pool_3) and
``mu_s`` / ``sigma_s`` (mixed_6/conv spatial features) next to ``arr_0``; guided-diffusion's
``evaluations/evaluator.py`` uses those instead of statistics of ``arr_0`` whenever ``mu`` is present.
build_reference.py writes the same four keys.
"""

import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from runtime.cli import UsageError

# (mean key, covariance key) per feature kind, as ADM names them.
NPZ_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, and where they came from (for the results JSON)."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str  # "file" (read from the .npz) or "images" (computed from the images' activations)
    count: int | None  # images they were computed from; None when read from a file (it does not say)

    def describe(self, path: str) -> str:
        """One phrase: what these statistics are."""
        if self.source == "file":
            return f"read from {path}"
        return f"computed from {self.count} images of {path}"


def compute_stats(features: np.ndarray) -> GaussianStats:
    """
    ADM's compute_statistics: mean over images and np.cov(rowvar=False) (unbiased), here in float64.

    >>> compute_stats(np.random.randn(10, 3)).sigma.shape
    (3, 3)
    """
    features = np.asarray(features, np.float64)
    return GaussianStats(features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False)), "images",
                         len(features))


def read_stats(path: str, kind: str, dim: int) -> GaussianStats | None:
    """
    The statistics of one feature kind ("pool" or "spatial") stored in an .npz, or None when it has none
    (an image folder, or an .npz with arr_0 only). Wrongly shaped or non-finite ones raise cli.UsageError.
    """
    if not path.lower().endswith(".npz"):
        return None
    mean_key, cov_key = NPZ_KEYS[kind]
    try:
        with np.load(path) as data:
            keys = set(data.keys())
            if mean_key not in keys and cov_key not in keys:
                return None
            if mean_key not in keys or cov_key not in keys:
                raise UsageError(f"{path} holds {mean_key if mean_key in keys else cov_key} without "
                                 f"{cov_key if mean_key in keys else mean_key}: rebuild it with build_reference.py "
                                 "or pass --stats images")
            mu, sigma = np.asarray(data[mean_key], np.float64), np.asarray(data[cov_key], np.float64)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UsageError(f"cannot read the statistics in {path} ({type(error).__name__}): write it again") from error
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UsageError(f"{path}: {mean_key} {mu.shape} / {cov_key} {sigma.shape} are not the ({dim},) / ({dim}, "
                         f"{dim}) statistics of this network's {kind} features: pass --stats images or another "
                         "reference")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: {mean_key} / {cov_key} hold NaN or infinite values: rebuild the reference")
    return GaussianStats(mu, sigma, "file", None)
