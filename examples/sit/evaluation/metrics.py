"""
Distances between two sets of feature vectors: Frechet distance (FID), unbiased MMD^2 / KID,
k-NN precision/recall (Kynkaanniemi et al. 2019), Inception Score and 1-D Wasserstein-1.

:func:`frechet_distance` (eigendecomposition, numpy only) serves the sinusoid metric;
:func:`frechet_distance_adm` is guided-diffusion's ``evaluations/evaluator.py`` computation (scipy's sqrtm
of the covariance product, 1e-6 added to both diagonals when it is not finite), used for FID and sFID.
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


def frechet_distance_adm(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """
    The Frechet distance exactly as ADM's evaluator (FIDStatistics.frechet_distance, after TTUR's fid.py):
    scipy.linalg.sqrtm(sigma1 @ sigma2); if that is not finite, sqrtm((sigma1 + eps I) @ (sigma2 + eps I));
    a complex result whose diagonal has an imaginary part above 1e-3 is an error, otherwise its real part.

    >>> frechet_distance_adm(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))  # doctest: +ELLIPSIS
    2.0...
    """
    from scipy import linalg  # only the Inception metrics need scipy

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps  # the product is (nearly) singular
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm of the covariance product has an imaginary component "
                             f"{np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


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
    KID (Binkowski et al. 2018): mean and std of the unbiased polynomial-kernel MMD^2 over num_subsets
    random subsets of subset_size images drawn (without replacement) from each set. A subset as large as a
    set would be that whole set every time, and the std would measure nothing: a ValueError, as is a subset
    smaller than 2 (the unbiased estimate needs pairs). :func:`kid_subset_size` picks one that fits.

    >>> feats_gen, feats_ref = np.random.randn(300, 16), np.random.randn(300, 16)
    >>> kid_mean, kid_std = kernel_inception_distance(feats_gen, feats_ref, num_subsets=10, subset_size=100)
    """
    smaller = min(len(features1), len(features2))
    if not 2 <= subset_size < smaller:
        raise ValueError(f"KID subset size {subset_size} must be >= 2 and below the smaller set's {smaller} images")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        a = features1[rng.choice(len(features1), subset_size, replace=False)]
        b = features2[rng.choice(len(features2), subset_size, replace=False)]
        values.append(mmd2_unbiased(a, b))
    return float(np.mean(values)), float(np.std(values))


def kid_subset_size(num1: int, num2: int, requested: int = 1000) -> int:
    """
    The KID subset size used for sets of num1 and num2 images: the requested size (1000, as Binkowski et al.
    and torch-fidelity), or half the smaller set when that is smaller, so that subsets differ.

    >>> kid_subset_size(50000, 10000), kid_subset_size(500, 10000)
    (1000, 250)
    """
    return max(2, min(requested, min(num1, num2) // 2))


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
#                                Inception Score                                #
#################################################################################


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so large logits do not overflow."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """
    Inception Score as ADM's evaluator (after improved-gan): consecutive splits of split_size class
    distributions p(y|x) (the last may be shorter), per split exp(mean_x KL(p(y|x) || p(y))) with p(y) the
    split's mean, averaged over splits. ADM's p(y|x) is softmax(pool_3 @ W) with W the 2048 x 1008
    softmax/logits/MatMul weight (no bias).

    >>> inception_score(np.full((10, 4), 0.25))  # every image the same uniform prediction
    1.0
    """
    probs = np.asarray(probs, np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


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
