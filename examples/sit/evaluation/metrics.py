"""
Distances between two sets of feature vectors: Frechet distance (FID), unbiased MMD^2 / KID,
k-NN precision/recall (Kynkaanniemi et al. 2019) and 1-D Wasserstein-1.

Pure numpy/torch (no scipy), so the same math serves Inception features (evaluate.py) and
sinusoid parameter features (evaluation/sinusoid_metric.py).
"""

import numpy as np
import torch

#################################################################################
#                                Frechet Distance                               #
#################################################################################


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    Mean and (unbiased) covariance of an (N, D) feature array, in float64.

    >>> mu, sigma = feature_statistics(np.random.randn(100, 8))
    >>> sigma.shape
    (8, 8)
    """
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix through its eigendecomposition."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))  # doctest: +ELLIPSIS
    2.0...
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    # Tr((s1 s2)^(1/2)) = Tr((s1^(1/2) s2 s1^(1/2))^(1/2)): the inner matrix is symmetric PSD, so an
    # eigendecomposition is stable and exact where scipy.linalg.sqrtm on s1 s2 may go complex.
    root1 = _sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """
    Frechet distance between Gaussians fitted to two (N, D) feature arrays (FID on Inception features).

    >>> fd = frechet_distance_from_features(np.random.randn(500, 4), np.random.randn(500, 4) + 1)  # ~4
    """
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


#################################################################################
#                              MMD^2 / Kernel Inception Distance                #
#################################################################################


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID kernel k(x, y) = (x.y / d + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, kernel=polynomial_kernel) -> float:
    """
    Unbiased estimate of MMD^2 between the sets x (m, D) and y (n, D): diagonal terms are left out of
    the within-set means, so the expectation is exactly 0 when both sets come from one distribution.

    >>> mmd = mmd2_unbiased(np.random.randn(200, 4), np.random.randn(200, 4))  # ~0, may be negative
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """
    KID (Binkowski et al. 2018): mean and std of the unbiased polynomial-kernel MMD^2 over random
    subsets of both sets (subset_size is capped at the smaller set).

    >>> feats_gen, feats_ref = np.random.randn(300, 16), np.random.randn(300, 16)
    >>> kid_mean, kid_std = kernel_inception_distance(feats_gen, feats_ref, num_subsets=10, subset_size=100)
    """
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(features1), len(features2))
    values = []
    for _ in range(num_subsets):
        a = features1[rng.choice(len(features1), size, replace=False)]
        b = features2[rng.choice(len(features2), size, replace=False)]
        values.append(mmd2_unbiased(a, b))
    return float(np.mean(values)), float(np.std(values))


#################################################################################
#                          k-NN Precision / Recall                              #
#################################################################################


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(features), batch_size):
        dists = torch.cdist(features[start : start + batch_size], features)
        # The k+1 smallest include the point itself at distance 0.
        radii.append(dists.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Whether each query lies within the k-NN ball of at least one support point."""
    inside = []
    for start in range(0, len(queries), batch_size):
        dists = torch.cdist(queries[start : start + batch_size], support)
        inside.append((dists <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(
    real_features: np.ndarray, gen_features: np.ndarray, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """
    Improved precision/recall (Kynkaanniemi et al. 2019): the real (generated) manifold is the union of
    balls around each real (generated) point reaching its k-th nearest neighbour; precision is the
    fraction of generated points inside the real manifold, recall the fraction of real points inside
    the generated one. k=3 as in the ADM evaluator.

    >>> feats = np.random.randn(100, 8)
    >>> precision_recall(feats, feats, k=3)
    (1.0, 1.0)
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    gen = torch.as_tensor(np.asarray(gen_features), dtype=torch.float64)
    precision = _inside_manifold(gen, real, _kth_neighbour_radii(real, k, batch_size), batch_size)
    recall = _inside_manifold(real, gen, _kth_neighbour_radii(gen, k, batch_size), batch_size)
    return float(precision.double().mean()), float(recall.double().mean())


#################################################################################
#                                Wasserstein-1                                  #
#################################################################################


def wasserstein1(a: np.ndarray, b: np.ndarray) -> float:
    """
    Wasserstein-1 distance between two 1-D empirical distributions: the integral of |F_a - F_b|.

    >>> wasserstein1(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    1.0
    """
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))
