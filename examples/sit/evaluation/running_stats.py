"""The mean and covariance of features that arrive in chunks, without holding them all.

FID's statistics are the mean and ``np.cov(rowvar=False)`` of every image's features: for a reference of the
whole ImageNet train set, 1.28 M rows of 2048 pool_3 and 2023 spatial values (42 GB in float64) that
``compute_stats`` would need at once. :class:`RunningStats` keeps the count, the mean and the centred sum of
outer products, in float64, and merges each chunk into them with the pairwise update of Chan, Golub and
LeVeque (exact in exact arithmetic, and as stable as the two-pass ``np.cov``: no sum of squares minus a
squared sum). Memory: one D x D matrix. The result equals ``compute_stats`` of all rows up to float rounding,
and depends only on the chunks' contents and order.

Example:
    >>> import numpy as np
    >>> rows = np.random.default_rng(0).normal(size=(10, 3))
    >>> running = RunningStats()
    >>> for chunk in (rows[:4], rows[4:]):
    ...     running.update(chunk)
    >>> bool(np.allclose(running.stats().sigma, np.cov(rows, rowvar=False)))
    True
"""
from __future__ import annotations

import numpy as np

from evaluation.statistics import GaussianStats

__all__ = ["RunningStats"]


class RunningStats:
    """Count, mean and centred sum of outer products of the feature rows seen so far (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum over rows of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray) -> None:
        """Add a chunk of rows (k, D)."""
        rows = np.asarray(features, np.float64)
        if rows.ndim != 2:
            raise ValueError(f"features must be (rows, dims), got shape {rows.shape}")
        k = len(rows)
        if k == 0:
            return
        mean = rows.mean(axis=0)
        centred = rows - mean
        m2 = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.m2 = k, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"features of {mean.shape[0]} dims after {self.mean.shape[0]}")
        total = self.count + k
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * k / total)
        self.mean = self.mean + delta * (k / total)
        self.count = total

    def stats(self) -> GaussianStats:
        """Mean and unbiased covariance (np.cov's normalisation: count - 1), as compute_stats returns them."""
        if self.count == 0:
            raise ValueError("no features were added")
        sigma = self.m2 / (self.count - 1) if self.count > 1 else np.full_like(self.m2, np.nan)
        return GaussianStats(self.mean, np.atleast_2d(sigma), "images", self.count)
