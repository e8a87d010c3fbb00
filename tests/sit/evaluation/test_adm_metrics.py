"""evaluation/metrics.py, statistics.py and inception_metrics.py against independent computations of ADM's
formulas (guided-diffusion evaluations/evaluator.py), written here in numpy/scipy on the same features."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from data.npz import choose_subset, save_npz
from evaluation import metrics
from evaluation.inception import Activations
from evaluation.inception_metrics import evaluate_activations, real_vs_real_floor
from evaluation.metrics import (
    frechet_distance,
    frechet_distance_adm,
    inception_score,
    kernel_inception_distance,
    kid_subset_size,
    precision_recall,
    softmax,
)
from evaluation.statistics import compute_stats, read_stats
from runtime.cli import UsageError

# ----------------------------------------------------------------------------- Frechet distance (ADM)


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """ADM's FID on two feature sets, step by step: mean, np.cov(rowvar=False), sqrtm of the product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_adm_frechet_matches_the_step_by_step_formula_and_the_eigendecomposition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) * 1.3 + 0.2
    a, b = compute_stats(x), compute_stats(y)
    assert frechet_distance_adm(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(reference_fid(x, y), rel=1e-10)
    assert frechet_distance_adm(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(
        frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-8)
    # 2x2 closed form: Tr((AB)^(1/2)) = sqrt(Tr(AB) + 2 sqrt(det A det B)).
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    tr = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.25 + 1.0 + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance_adm(np.array([0.5, -1.0]), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-10)


def test_adm_frechet_adds_eps_when_the_product_is_not_finite(monkeypatch):
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def first_call_fails(matrix):
        calls.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    value = frechet_distance_adm(np.zeros(2), s1, np.zeros(2), s2, eps=1e-2)
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + 1e-2 * np.eye(2)) @ (s2 + 1e-2 * np.eye(2)))
    # The offset only enters the square root; the traces are those of the covariances themselves.
    assert value == pytest.approx(5.0 + 10.0 - 2 * (np.sqrt(1.01 * 9.01) + np.sqrt(4.01 * 1.01)), rel=1e-12)


def test_adm_frechet_refuses_a_large_imaginary_part(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 0.5j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance_adm(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 1e-6j))  # tolerated: real part
    assert frechet_distance_adm(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(0.0)


def test_adm_frechet_of_singular_covariances_is_finite():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 40))  # 5 images in 40 dimensions: rank-4 covariances, as with few samples
    s = compute_stats(x)
    assert abs(frechet_distance_adm(s.mu, s.sigma, s.mu, s.sigma)) < 1e-4
    other = compute_stats(rng.normal(size=(5, 40)))
    assert np.isfinite(frechet_distance_adm(s.mu, s.sigma, other.mu, other.sigma))


# ----------------------------------------------------------------------------- Inception Score


def reference_inception_score(logits: np.ndarray, split: int) -> float:
    """improved-gan / ADM: exp of the mean KL(p(y|x) || p(y)) per consecutive split, averaged."""
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split):
        part = probs[start : start + split]
        marginal = part.mean(0)
        kl = [sum(p[c] * np.log(p[c] / marginal[c]) for c in range(len(p))) for p in part]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def test_inception_score_on_given_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(23, 10)) * 3
    for split in (5000, 5, 23):
        assert inception_score(softmax(logits), split) == pytest.approx(reference_inception_score(logits, split),
                                                                         rel=1e-10)
    assert inception_score(softmax(logits), 5) != pytest.approx(inception_score(softmax(logits)), rel=1e-3)
    confident = softmax(np.eye(8) * 50)  # 8 images, each certain of its own class: IS -> 8
    assert inception_score(confident) == pytest.approx(8.0, rel=1e-6)
    assert inception_score(softmax(np.tile(logits[:1], (10, 1)))) == pytest.approx(1.0)  # one prediction: IS 1
    assert np.isfinite(softmax(np.array([[1000.0, 0.0]]))).all()


# ----------------------------------------------------------------------------- precision / recall (ADM)


def reference_precision_recall(ref: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's ManifoldEstimator on squared distances: radius = (k+1)-th smallest including the point itself."""
    def sq_dist(a, b):
        return np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :], 0)

    radii_ref = np.partition(sq_dist(ref, ref), k, axis=1)[:, k]
    radii_gen = np.partition(sq_dist(gen, gen), k, axis=1)[:, k]
    precision = (sq_dist(gen, ref) <= radii_ref[None, :]).any(1).mean()
    recall = (sq_dist(ref, gen) <= radii_gen[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_matches_adms_manifold_estimator():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(150, 6))
    for gen in (rng.normal(size=(120, 6)) * 1.5, rng.normal(size=(90, 6)) * 0.5 + 0.7):
        assert precision_recall(ref, gen, k=3) == pytest.approx(reference_precision_recall(ref, gen, 3), abs=1e-12)
    gen = rng.normal(size=(40, 6))
    assert precision_recall(ref, gen, k=3, batch_size=7) == precision_recall(ref, gen, k=3)  # batching is exact


# ----------------------------------------------------------------------------- KID


def test_kid_refuses_subsets_as_large_as_a_set_and_picks_one_that_fits():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(50, 4))
    with pytest.raises(ValueError, match="below the smaller set's 20"):
        kernel_inception_distance(x, y, num_subsets=5, subset_size=1000)
    with pytest.raises(ValueError):
        kernel_inception_distance(x, y, num_subsets=5, subset_size=20)
    size = kid_subset_size(20, 50)
    assert size == 10 and kid_subset_size(5000, 20000) == 1000 and kid_subset_size(3, 3) == 2
    _, std = kernel_inception_distance(x, y, num_subsets=20, subset_size=size)
    assert std > 1e-6  # subsets differ: the std measures something (the old cap at 20 gave ~1e-16 on x's side)


# ----------------------------------------------------------------------------- statistics in an .npz


def test_read_stats_from_an_adm_npz(tmp_path):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    rng = np.random.default_rng(5)
    mu, a = rng.normal(size=6), rng.normal(size=(6, 6))
    path = save_npz(images, str(tmp_path / "ref.npz"), mu=mu, sigma=a @ a.T)
    stats = read_stats(path, "pool", 6)
    assert stats.source == "file" and np.array_equal(stats.mu, mu) and stats.count is None
    assert read_stats(path, "spatial", 6) is None  # no mu_s / sigma_s
    assert read_stats(save_npz(images, str(tmp_path / "plain.npz")), "pool", 6) is None
    with pytest.raises(UsageError, match=r"not the \(2048,\)"):
        read_stats(path, "pool", 2048)
    with pytest.raises(UsageError, match="mu without sigma"):
        read_stats(save_npz(images, str(tmp_path / "half.npz"), mu=mu), "pool", 6)
    with pytest.raises(UsageError, match="NaN"):
        read_stats(save_npz(images, str(tmp_path / "nan.npz"), mu=mu * np.nan, sigma=a), "pool", 6)
    computed = compute_stats(rng.normal(size=(30, 6)).astype(np.float32))
    assert computed.source == "images" and computed.count == 30 and computed.mu.dtype == np.float64


# ----------------------------------------------------------------------------- all metrics together


def acts(rng, n, shift=0.0):
    return Activations(rng.normal(size=(n, 16)) + shift, rng.normal(size=(n, 9)) + shift)


def test_evaluate_activations_uses_stored_statistics_when_given():
    rng = np.random.default_rng(6)
    gen, ref = acts(rng, 60), acts(rng, 200, shift=0.3)
    computed, _ = evaluate_activations(gen, ref, kid_subsets=5, kid_subset_size=30)
    g, r = compute_stats(gen.pool), compute_stats(ref.pool)
    assert computed["fid"] == pytest.approx(frechet_distance_adm(g.mu, g.sigma, r.mu, r.sigma))
    gs, rs = compute_stats(gen.spatial), compute_stats(ref.spatial)
    assert computed["sfid"] == pytest.approx(frechet_distance_adm(gs.mu, gs.sigma, rs.mu, rs.sigma))
    fake = compute_stats(rng.normal(size=(500, 16)) + 2.0)
    fake = type(fake)(fake.mu, fake.sigma, "file", None)
    stored, stats = evaluate_activations(gen, ref, ref_stats={"pool": fake, "spatial": None}, kid_subsets=5,
                                         kid_subset_size=30)
    assert stored["fid"] == pytest.approx(frechet_distance_adm(g.mu, g.sigma, fake.mu, fake.sigma))
    assert stored["fid"] > computed["fid"] + 10 and stored["sfid"] == computed["sfid"]
    assert stats["ref"]["pool"].source == "file" and stats["ref"]["spatial"].source == "images"
    # Precision/recall and KID are always on the reference images' activations, never the stored statistics.
    assert (stored["precision"], stored["recall"], stored["kid"]) == (computed["precision"], computed["recall"],
                                                                      computed["kid"])
    assert stored["inception_score"] is None and "logits" in stored["inception_score_note"]


def test_real_vs_real_floor_takes_disjoint_random_halves(monkeypatch):
    # A reference sorted by class (first half one class, second half another), as a folder or a class-ordered
    # npz is: the old floor ref[:n] vs ref[n:2n] compared the two classes.
    rng = np.random.default_rng(7)
    ref = Activations(np.concatenate([rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 5]),
                      np.concatenate([rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + 5]))
    seen = []
    real_compute = compute_stats
    monkeypatch.setattr("evaluation.inception_metrics.compute_stats",
                        lambda f: seen.append(np.asarray(f)) or real_compute(f))
    floors = real_vs_real_floor(ref, 100, seed=0)
    pool_a, pool_b = seen[0], seen[1]
    rows = {tuple(r) for r in pool_a}
    assert len(pool_a) == len(pool_b) == 100 and not rows & {tuple(r) for r in pool_b}  # disjoint
    assert 20 < (pool_a[:, 0] > 2.5).sum() < 80  # both classes in each half
    first_class, second_class = real_compute(ref.pool[:100]), real_compute(ref.pool[100:])
    class_split = frechet_distance_adm(first_class.mu, first_class.sigma, second_class.mu, second_class.sigma)
    assert floors["fid_floor"] < class_split / 10
    a, b = real_compute(pool_a), real_compute(pool_b)
    assert floors["fid_floor"] == pytest.approx(frechet_distance_adm(a.mu, a.sigma, b.mu, b.sigma), rel=1e-8)
    assert real_vs_real_floor(ref, 101, seed=0) == dict(fid_floor=None, sfid_floor=None)


def test_choose_subset_is_seeded_and_spans_the_whole_range():
    first = choose_subset(1000, 100, None)
    assert first.tolist() == list(range(100))
    a, b, c = choose_subset(1000, 100, 0), choose_subset(1000, 100, 0), choose_subset(1000, 100, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and len(set(a.tolist())) == 100
    assert (a < 500).sum() > 30 and (a >= 500).sum() > 30 and np.all(np.diff(a) > 0)
    assert metrics.kid_subset_size(10, 10) == 5
