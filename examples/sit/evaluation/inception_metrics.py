"""
All Inception-feature metrics of generated images against a reference, from their activations
(evaluation/inception.py) and, where an .npz carries them, the reference's stored statistics.

As ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``):
- FID: Frechet distance (metrics.frechet_distance_adm) of pool_3 statistics, sFID the same on the
  mixed_6/conv spatial features; each side's statistics come from its .npz when it holds them (a
  reference batch's mu / sigma / mu_s / sigma_s), else from its activations (mean, np.cov(rowvar=False)).
- precision / recall: k-NN manifolds (k = 3) of the pool_3 activations of the reference images and the
  samples (never from stored statistics).
- Inception Score: needs logits the offline network lacks; None with the reason (see inception.py).
Not in ADM's evaluator, added here: KID (mean and std over random subsets) and the real-vs-real floors
(FID / sFID between two disjoint random halves of the reference, each of the samples' size).
"""

import numpy as np

from evaluation.inception import INCEPTION_SCORE_UNAVAILABLE, Activations
from evaluation.metrics import frechet_distance, frechet_distance_adm, kernel_inception_distance, precision_recall
from evaluation.statistics import GaussianStats, compute_stats

StatsPair = dict[str, GaussianStats | None]  # {"pool": ..., "spatial": ...}; None: compute from activations


def resolve_stats(activations: Activations, stored: StatsPair | None) -> dict[str, GaussianStats]:
    """Per feature kind, the stored statistics when there are some, else those of the activations."""
    stored = stored or {}
    return {kind: stored.get(kind) or compute_stats(getattr(activations, kind)) for kind in ("pool", "spatial")}


def real_vs_real_floor(ref: Activations, size: int, seed: int) -> dict[str, float | None]:
    """FID and sFID between two disjoint random halves of `size` reference images each (None if too few).

    Not an ADM number, so it takes the eigendecomposition form of the same distance (metrics.frechet_distance):
    equal up to rounding, and much faster than scipy's sqrtm on 2048 x 2048 matrices.
    """
    if len(ref) < 2 * size or size < 2:
        return dict(fid_floor=None, sfid_floor=None)
    order = np.random.default_rng(seed).permutation(len(ref))
    first, second = ref.take(order[:size]), ref.take(order[size : 2 * size])
    floors = {}
    for kind, key in (("pool", "fid_floor"), ("spatial", "sfid_floor")):
        a, b = compute_stats(getattr(first, kind)), compute_stats(getattr(second, kind))
        floors[key] = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    return floors


def adm_metrics(gen: Activations, ref: Activations, gen_stats: StatsPair | None = None,
                ref_stats: StatsPair | None = None, k: int = 3) -> tuple[dict, dict[str, dict[str, GaussianStats]]]:
    """
    (metrics, statistics): FID, sFID, precision and recall as ADM's evaluator computes them, and the statistics
    each distance used, {"samples" / "ref": {"pool" / "spatial": GaussianStats}}. evaluate.py
    (:func:`evaluate_activations`) and the FID during and after training (evaluation/sample_metrics.py) both
    compute their numbers here.

    >>> rng = np.random.default_rng(0)
    >>> acts = lambda n: Activations(rng.normal(size=(n, 8)), rng.normal(size=(n, 5)))
    >>> sorted(adm_metrics(acts(40), acts(80))[0])
    ['fid', 'precision', 'recall', 'sfid']
    """
    gen_resolved, ref_resolved = resolve_stats(gen, gen_stats), resolve_stats(ref, ref_stats)
    metrics = {}
    for kind, key in (("pool", "fid"), ("spatial", "sfid")):
        a, b = gen_resolved[kind], ref_resolved[kind]
        metrics[key] = frechet_distance_adm(a.mu, a.sigma, b.mu, b.sigma)
    metrics["precision"], metrics["recall"] = precision_recall(ref.pool, gen.pool, k=k)
    return metrics, dict(samples=gen_resolved, ref=ref_resolved)


def evaluate_activations(
    gen: Activations,
    ref: Activations,
    gen_stats: StatsPair | None = None,
    ref_stats: StatsPair | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
) -> tuple[dict, dict[str, dict[str, GaussianStats]]]:
    """
    (metrics, statistics): FID, sFID, precision, recall, KID (+ std), the real-vs-real floors and IS (None);
    and the statistics each distance used, {"samples" / "ref": {"pool" / "spatial": GaussianStats}}.
    kid_subset_size must already fit the sets (metrics.kid_subset_size).

    >>> rng = np.random.default_rng(0)
    >>> acts = lambda n: Activations(rng.normal(size=(n, 8)), rng.normal(size=(n, 5)))
    >>> result, stats = evaluate_activations(acts(40), acts(80), kid_subsets=5, kid_subset_size=20)
    >>> sorted(result)  # doctest: +NORMALIZE_WHITESPACE
    ['fid', 'fid_floor', 'inception_score', 'inception_score_note', 'kid', 'kid_std', 'precision', 'recall',
     'sfid', 'sfid_floor']
    """
    adm, statistics = adm_metrics(gen, ref, gen_stats, ref_stats, k)
    kid, kid_std = kernel_inception_distance(gen.pool, ref.pool, kid_subsets, kid_subset_size, seed=seed)
    metrics = dict(
        fid=adm["fid"],
        sfid=adm["sfid"],
        inception_score=None,
        inception_score_note=INCEPTION_SCORE_UNAVAILABLE,
        precision=adm["precision"],
        recall=adm["recall"],
        kid=kid,
        kid_std=kid_std,
        **real_vs_real_floor(ref, len(gen), seed),
    )
    return metrics, statistics
