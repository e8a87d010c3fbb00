"""Tests for the evaluation math (evaluation/metrics.py), the ADM npz format (data/npz.py) and evaluate.py."""

import itertools
import json
import os

import evaluate
import numpy as np
import pytest
import torch
from data.datasets import make_sinusoids
from data.npz import load_image_folder, load_images, load_npz, save_npz, to_uint8_nhwc
from evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
    wasserstein1,
)
from PIL import Image
from runtime.cli import UsageError
from stub_features import StubFeatures

# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    feats = rng.normal(size=(300, 6))
    assert abs(frechet_distance_from_features(feats, feats)) < 1e-8


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_non_commuting_2d_closed_form():
    # For 2x2 PSD A, B: Tr((AB)^(1/2)) = sqrt(Tr(AB) + 2 sqrt(det A det B)).
    a = np.array([[2.0, 0.8], [0.8, 1.0]])
    b = np.array([[1.0, -0.3], [-0.3, 0.5]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 0.0])
    tr_sqrt = np.sqrt(np.trace(a @ b) + 2 * np.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, b, mu1, a) == pytest.approx(expected, rel=1e-10)


def test_frechet_from_samples_approaches_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 2)) * [1.0, 2.0]
    y = rng.normal(size=(20000, 2)) * [1.0, 1.0] + [3.0, 0.0]
    assert frechet_distance_from_features(x, y) == pytest.approx(9.0 + 1.0, abs=0.1)
    mu, sigma = feature_statistics(x)
    assert mu.shape == (2,) and sigma.shape == (2, 2)


# ----------------------------------------------------------------------------- MMD / KID


def naive_mmd2_unbiased(x, y):
    k = lambda a, b: (np.dot(a, b) / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_unbiased_matches_definition():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(naive_mmd2_unbiased(x, y), rel=1e-10)
    assert polynomial_kernel(x, y).shape == (7, 5)


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 0.5 and shifted > 20 * abs(same)


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_limits():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 4))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_mode_collapse():
    rng = np.random.default_rng(5)
    real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50])
    gen = rng.normal(size=(400, 2))  # only the first mode
    precision, recall = precision_recall(real, gen, k=3)
    assert precision > 0.9 and 0.4 < recall < 0.6


def test_precision_recall_hand_example():
    # 1-D real {0, 1, 3}: 1-NN radii 1, 1, 2 -> real manifold [-1, 5]. Gen {0.5, 10}: precision 1/2.
    # Gen radii (1-NN) 9.5, 9.5 -> balls cover [-9, 19.5]: recall 1.
    real, gen = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [10.0]])
    assert precision_recall(real, gen, k=1) == (0.5, 1.0)


def test_wasserstein1():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    assert wasserstein1(a, a + 0.5) == pytest.approx(0.5)
    assert wasserstein1(a, a) == 0.0
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert wasserstein1(x, y) == pytest.approx(np.mean(np.abs(np.sort(x) - np.sort(y))))
    assert wasserstein1(np.array([0.0]), np.array([0.0, 2.0])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- ADM npz


def test_npz_roundtrip_and_format(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    path = save_npz(images, str(tmp_path / "sub" / "samples.npz"))
    assert path.endswith("samples.npz") and os.listdir(tmp_path / "sub") == ["samples.npz"]
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"] and data["arr_0"].dtype == np.uint8
        assert np.array_equal(data["arr_0"], images)
    assert np.array_equal(load_npz(path), images)
    np.savez(tmp_path / "wrong.npz", images=images)
    with pytest.raises(UsageError, match="arr_0"):
        load_npz(str(tmp_path / "wrong.npz"))


def test_to_uint8_nhwc_conversions():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)  # NCHW in [-1, 1]
    out = to_uint8_nhwc(x)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert to_uint8_nhwc(np.zeros((2, 5, 5), np.uint8)).shape == (2, 5, 5, 3)  # grayscale -> RGB
    assert to_uint8_nhwc(np.zeros((2, 3, 5, 5), np.uint8)).shape == (2, 5, 5, 3)
    with pytest.raises(TypeError):
        to_uint8_nhwc(np.zeros((2, 5, 5, 3), np.float32))


def test_load_image_folder(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    assert np.array_equal(load_image_folder(str(tmp_path)), images)
    assert np.array_equal(load_images(str(tmp_path), limit=2), images[:2])


# ----------------------------------------------------------------------------- evaluate.py


def test_main_sinusoid_reports_floor(tmp_path):
    images, _ = make_sinusoids(96, 32, torch.Generator().manual_seed(0))
    path = save_npz(images, str(tmp_path / "sinusoid.npz"))
    out = tmp_path / "result.json"
    args = evaluate.get_parser().parse_args([path, "--ref", "sinusoid", "--out", str(out)])
    result = evaluate.main(args)
    assert result["frechet"] < 3 * result["frechet_floor"] and result["validity"] > 0.95
    assert json.loads(out.read_text())["num_samples"] == 96
    blank = save_npz(np.full((96, 32, 32, 3), 128, np.uint8), str(tmp_path / "blank.npz"))
    bad = evaluate.main(evaluate.get_parser().parse_args([blank, "--ref", "sinusoid"]))
    assert bad["frechet"] > 10 * bad["frechet_floor"]


def test_image_folder_ignores_temp_files_and_names_a_corrupt_image(tmp_path):
    images = np.random.default_rng(11).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    # What interrupted writes leave: old-style "<name>.tmp.png" and runtime/atomic.py's ".<name>.tmp-<pid>".
    Image.fromarray(images[0]).save(tmp_path / "000002.png.tmp.png")
    Image.fromarray(images[0]).save(tmp_path / ".000003.png.tmp-42", format="PNG")
    assert np.array_equal(load_image_folder(str(tmp_path)), images)
    (tmp_path / "000004.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UsageError, match=r"cannot decode image .*000004\.png"):
        load_image_folder(str(tmp_path))
    assert np.array_equal(load_image_folder(str(tmp_path), limit=2), images)  # only what is asked is decoded


def test_npz_errors_name_the_file(tmp_path):
    path = save_npz(np.zeros((2, 4, 4, 3), np.uint8), str(tmp_path / "a.npz"))
    (tmp_path / "cut.npz").write_bytes(open(path, "rb").read()[:-40])
    for name in ("cut.npz", "missing.npz"):
        with pytest.raises(UsageError, match=name):
            load_images(str(tmp_path / name))


def test_main_refuses_to_overwrite_results_unless_asked(tmp_path):
    images, _ = make_sinusoids(32, 16, torch.Generator().manual_seed(0))
    path = save_npz(images, str(tmp_path / "s.npz"))
    out = tmp_path / "r.json"
    out.write_text("{}")
    with pytest.raises(UsageError, match="--overwrite"):
        evaluate.main(evaluate.parse_args([path, "--ref", "sinusoid", "--out", str(out)]))
    assert out.read_text() == "{}"
    evaluate.main(evaluate.parse_args([path, "--ref", "sinusoid", "--out", str(out), "--overwrite"]))
    assert json.loads(out.read_text())["num_samples"] == 32
    assert sorted(os.listdir(tmp_path)) == ["r.json", "s.npz"]  # no temp file left


# ----------------------------------------------------------------------------- evaluate.py: ADM parity (stub network)


def run_main(argv, extractor=None):
    return evaluate.main(evaluate.parse_args(argv), extractor=extractor or StubFeatures())


def random_images(n, size=8, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 256, (n, size, size, 3)) + shift, 0, 255).astype(np.uint8)


def test_stored_reference_statistics_change_the_fid(tmp_path):
    gen = save_npz(random_images(20, seed=1), str(tmp_path / "gen.npz"))
    ref_images = random_images(50, seed=2)
    plain = save_npz(ref_images, str(tmp_path / "plain.npz"))
    rng = np.random.default_rng(3)
    mu, a = rng.normal(size=16), rng.normal(size=(16, 16))
    mu_s, b = rng.normal(size=12), rng.normal(size=(12, 12))
    stored = save_npz(ref_images, str(tmp_path / "stored.npz"), mu=mu, sigma=a @ a.T, mu_s=mu_s, sigma_s=b @ b.T)
    computed = run_main([gen, "--ref", plain])
    from_file = run_main([gen, "--ref", stored])
    assert from_file["fid"] != pytest.approx(computed["fid"], rel=1e-3)  # the bug: arr_0 only was read
    assert from_file["sfid"] != pytest.approx(computed["sfid"], rel=1e-3)
    features = StubFeatures()(np.load(gen)["arr_0"])
    g, gs = feature_statistics(features.pool), feature_statistics(features.spatial)
    assert from_file["fid"] == pytest.approx(frechet_distance(*g, mu, a @ a.T), rel=1e-6)
    assert from_file["sfid"] == pytest.approx(frechet_distance(*gs, mu_s, b @ b.T), rel=1e-6)
    assert from_file["statistics"]["fid"]["ref"] == f"read from {stored} (mu, sigma)"
    assert from_file["statistics"]["sfid"]["ref"] == f"read from {stored} (mu_s, sigma_s)"
    assert from_file["statistics"]["fid"]["samples"] == f"computed from 20 images of {gen}"
    assert computed["statistics"]["fid"]["ref"] == f"computed from 50 images of {plain}"
    # Precision/recall use the reference images either way; --stats images ignores the stored statistics.
    assert (from_file["precision"], from_file["recall"]) == (computed["precision"], computed["recall"])
    forced = run_main([gen, "--ref", stored, "--stats", "images"])
    assert forced["fid"] == pytest.approx(computed["fid"]) and forced["stats"] == "images"
    assert from_file["inception_score"] is None and "evaluator.py" in from_file["inception_score_note"]


def test_results_json_records_what_was_used(tmp_path):
    gen = save_npz(random_images(20, seed=1), str(tmp_path / "gen.npz"))
    ref = save_npz(random_images(60, seed=2), str(tmp_path / "ref.npz"))
    out = tmp_path / "r.json"
    run_main([gen, "--ref", ref, "--out", str(out), "--num-ref", "45"])
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == 20 and saved["num_ref"] == 45 and saved["image_size"] == [8, 8]
    assert saved["ref_subset"] == "45 drawn at random (seed 0)" and saved["network"] == {"name": "stub"}
    assert saved["kid_subset_size"] == 10 and "half the smaller set" in saved["kid_subset_size_note"]
    assert saved["fid_floor"] is not None and saved["sfid_floor"] is not None and saved["inception_score"] is None
    assert {"fid", "sfid", "precision", "recall", "kid", "kid_std"} <= set(saved)


def test_num_ref_draws_a_seeded_subset_across_classes(tmp_path):
    # A reference folder sorted by class: the old --num-ref took the first N files, i.e. the first class only.
    for name, value in (("a_dark", 10), ("b_bright", 240)):
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(tmp_path / "ref" / name / f"{i}.png")
    subset = load_images(str(tmp_path / "ref"), 8, seed=0)
    assert 0 < (subset[:, 0, 0, 0] > 128).sum() < 8
    assert np.array_equal(subset, load_images(str(tmp_path / "ref"), 8, seed=0))
    gen = save_npz(random_images(6, seed=1), str(tmp_path / "gen.npz"))
    stub = StubFeatures()
    run_main([gen, "--ref", str(tmp_path / "ref"), "--num-ref", "8"], stub)
    assert np.array_equal(stub.calls[1], subset)  # the reference images evaluated are that subset
    run_main([gen, "--ref", str(tmp_path / "ref"), "--num-ref", "8", "--ref-seed", "5"], stub)
    assert not np.array_equal(stub.calls[3], subset)


def test_reference_of_another_resolution_is_refused(tmp_path):
    gen = save_npz(random_images(8, size=64), str(tmp_path / "gen.npz"))
    ref = save_npz(np.zeros((8, 72, 80, 3), np.uint8), str(tmp_path / "ref.npz"))
    with pytest.raises(UsageError, match=r"64x64 but the reference .* is 72x80.*--image-size 64"):
        run_main([gen, "--ref", ref])


def test_kid_with_few_images_fits_its_subsets_or_refuses(tmp_path):
    gen = save_npz(random_images(20, seed=1), str(tmp_path / "gen.npz"))
    ref = save_npz(random_images(30, seed=2), str(tmp_path / "ref.npz"))
    result = run_main([gen, "--ref", ref])
    assert result["kid_subset_size"] == 10 and result["kid_std"] > 1e-6  # old code: subsets of all 20, std ~1e-16
    with pytest.raises(UsageError, match="--ref-seed must be in"):
        run_main([gen, "--ref", ref, "--ref-seed", "-3"])
    with pytest.raises(UsageError, match="--kid-subset-size 20: .*fewer than the smaller set's 20"):
        run_main([gen, "--ref", ref, "--kid-subset-size", "20"])
    assert run_main([gen, "--ref", ref, "--kid-subset-size", "15"])["kid_subset_size_note"] == "as requested"


def test_samples_statistics_are_used_as_adm_does_but_not_for_a_subset(tmp_path):
    images = random_images(30, seed=4)
    acts = StubFeatures()(images)
    g = feature_statistics(acts.pool)
    gs = feature_statistics(acts.spatial)
    both = save_npz(images, str(tmp_path / "ref.npz"), mu=g[0], sigma=g[1], mu_s=gs[0], sigma_s=gs[1])
    itself = run_main([both, "--ref", both])
    assert abs(itself["fid"]) < 1e-3 and abs(itself["sfid"]) < 1e-3
    assert itself["statistics"]["fid"]["samples"] == f"read from {both} (mu, sigma)"
    subset = run_main([both, "--ref", both, "--num-samples", "10"])
    assert subset["statistics"]["fid"]["samples"].startswith("computed from 10 images")
    assert "cover all its images" in subset["statistics"]["fid"]["samples"]


def test_stats_flags_are_refused_with_the_sinusoid_metric(tmp_path):
    path = save_npz(random_images(8), str(tmp_path / "s.npz"))
    with pytest.raises(UsageError, match="--stats.*ignored with --ref sinusoid"):
        evaluate.main(evaluate.parse_args([path, "--ref", "sinusoid", "--stats", "images"]))


def test_kid_with_two_images_in_a_set_is_refused_in_one_line(tmp_path):
    """With 2 images (and --k 1) the KID subset size was 2 and kernel_inception_distance raised a ValueError."""
    gen = save_npz(random_images(2, seed=1), str(tmp_path / "gen.npz"))
    ref = save_npz(random_images(10, seed=2), str(tmp_path / "ref.npz"))
    with pytest.raises(UsageError, match="KID needs at least 3 images in each set.* the smaller has 2: use more"):
        run_main([gen, "--ref", ref, "--k", "1"])
    assert run_main([gen.replace("gen", "ref"), "--ref", ref, "--k", "1", "--num-samples", "3"])["kid_subset_size"] == 2


def test_overwrite_without_out_is_refused(tmp_path):
    path = save_npz(random_images(8), str(tmp_path / "s.npz"))
    with pytest.raises(UsageError, match="--overwrite replaces an existing --out.*add --out"):
        evaluate.main(evaluate.parse_args([path, "--ref", "sinusoid", "--overwrite"]))
