"""Tests for examples/sit/data/datasets.py: ADM crop, ImageFolder, sinusoids, IDX/Fashion-MNIST, build_dataset."""

import gzip
import json
import math
import os
import re
import struct

import numpy as np
import pytest
import torch
from data.datasets import (
    FASHION_MNIST_ROOT,
    DataError,
    FashionMNISTDataset,
    ImageFolderDataset,
    LatentDataset,
    MissingDataError,
    SinusoidDataset,
    build_dataset,
    center_crop_arr,
    find_image_files,
    make_sinusoids,
    read_idx,
    render_sinusoids,
    sample_sinusoid_params,
    scan_image_files,
    scan_image_folder,
)
from image_folders import add_disk_junk, write_image_folder
from PIL import Image

# ----------------------------------------------------------------------------- ADM crop


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (20, 30), (64, 64)])
def test_center_crop_arr_size(size):
    assert center_crop_arr(Image.new("RGB", size), 32).size == (32, 32)


def test_center_crop_arr_keeps_center_and_box_halves():
    # Left third red, middle green, right third blue; a 3:1 image must crop to the green middle.
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, :64, 0] = 255
    arr[:, 64:128, 1] = 255
    arr[:, 128:, 2] = 255
    out = np.array(center_crop_arr(Image.fromarray(arr), 16))
    assert out.shape == (16, 16, 3)
    assert out[..., 1].min() > 200 and out[..., 0].max() < 50 and out[..., 2].max() < 50
    # Short side 64 >= 2*16 twice: two BOX halvings then an exact-size BICUBIC (identity) -> equal to BOX 4x.
    expected = Image.fromarray(arr).resize((96, 32), Image.BOX).resize((48, 16), Image.BOX)
    assert np.array_equal(out, np.array(expected)[:, 16:32])


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_dataset(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(root, image_size=16, random_flip=False)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    expected = np.array(center_crop_arr(Image.open(ds.paths[0]).convert("RGB"), 16))
    assert torch.allclose(x, torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1)


def test_image_folder_random_flip(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    plain = ImageFolderDataset(root, image_size=16, random_flip=False)[2][0]
    flipping = ImageFolderDataset(root, image_size=16, random_flip=True)
    torch.manual_seed(0)
    seen = {"plain": 0, "flip": 0}
    for _ in range(20):
        x = flipping[2][0]
        if torch.equal(x, plain):
            seen["plain"] += 1
        else:
            assert torch.equal(x, plain.flip(-1))
            seen["flip"] += 1
    assert seen["plain"] > 0 and seen["flip"] > 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"))


def test_corrupt_image_names_the_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(root, image_size=16, random_flip=False)
    with open(ds.paths[1], "r+b") as f:
        f.truncate(30)
    with pytest.raises(DataError, match=f"cannot read image {ds.paths[1]} .*replace or remove it"):
        ds[1]
    assert ds[0][0].shape == (3, 16, 16)  # the others still load
    with pytest.raises(MissingDataError):  # still a FileNotFoundError for callers that catch that
        ImageFolderDataset(str(tmp_path / "missing"))


def test_scan_reads_regular_files_only_and_ignores_hidden_entries(tmp_path):
    """A pipe named like an image blocked the reader forever; ._0.png stopped a run; .ipynb_checkpoints was a
    class."""
    root = write_image_folder(tmp_path / "imgs")
    clean = find_image_files(root)
    junk = add_disk_junk(root)
    os.symlink("fifo.png", os.path.join(root, "cat", "to_fifo.png"))  # a link is followed to what it names
    os.symlink("1.png", os.path.join(root, "cat", "to_1.png"))
    os.symlink("gone.png", os.path.join(root, "dog", "broken.png"))
    scan = scan_image_folder(root)
    assert scan.classes == ["cat", "dog"] and scan.hidden == 4
    assert scan.paths == [*clean[0][:2], os.path.join(root, "cat", "2.png"), os.path.join(root, "cat", "to_1.png"),
                          *clean[0][3:]]
    assert scan.labels == [0, 0, 0, 0, 1, 1, 1]
    assert scan.not_regular == [f"{junk['not_regular'][0]} (named pipe)",
                                f"{os.path.join(root, 'cat', 'to_fifo.png')} (named pipe)",
                                f"{os.path.join(root, 'dog', 'broken.png')} (broken symbolic link)",
                                f"{junk['not_regular'][1]} (socket)"]
    summary = scan.summary()
    assert "\n" not in summary and summary.startswith(f"image folder {root}: ignored 4 hidden entries (names starting")
    assert "skipped 4 non-regular files named like images, never opened: " in summary
    assert all(entry in summary for entry in scan.not_regular)
    ds = ImageFolderDataset(root, image_size=8, random_flip=False)
    assert ds.scan_summary == summary and len(ds) == 7
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))  # nothing left that cannot be read


def test_scan_summary_counts_and_names_a_few(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    assert ImageFolderDataset(root, 8).scan_summary is None  # a clean folder: nothing to say
    for i in range(7):
        os.mkfifo(os.path.join(root, "dog", f"p{i}.png"))
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"")
    summary = scan_image_folder(root).summary()
    assert "ignored 1 hidden entry (" in summary and "skipped 7 non-regular files" in summary
    assert "p4.png (named pipe) and 2 more" in summary and "p5.png" not in summary


def test_scan_names_an_unreadable_folder(tmp_path):
    """os.walk skipped a folder it could not list, silently dropping its images."""
    if os.geteuid() == 0:
        pytest.skip("root reads any folder")
    root = write_image_folder(tmp_path / "imgs")
    locked = tmp_path / "imgs" / "dog" / "more"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=f"cannot list {re.escape(str(locked))} .*fix its permissions"):
            scan_image_folder(root)
    finally:
        locked.chmod(0o755)


def test_scan_keeps_os_walk_order(tmp_path):
    """Files of a folder (by name), then its sub-folders: the order earlier extractions were indexed in."""
    for path in ("c/b/1.png", "c/a/2.png", "c/3.png", "c/A.png", "c/b/x/4.png", "B/5.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    paths, labels, classes = find_image_files(str(tmp_path))
    assert classes == ["B", "c"] and labels == [0, 1, 1, 1, 1, 1]
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["B/5.png", "c/3.png", "c/A.png", "c/a/2.png",
                                                             "c/b/1.png", "c/b/x/4.png"]


# ----------------------------------------------------------------------------- latents (checks on open)


def write_latent_folder(root, num_images=10, chunk_size=4):
    """meta.json, labels.npy and float16 moment shards as extract_latents.py writes them."""
    os.makedirs(root)
    meta = dict(num_images=num_images, image_size=16, chunk_size=chunk_size, latent_shape=[4, 2, 2], num_classes=3)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    np.save(os.path.join(root, "labels.npy"), np.arange(num_images, dtype=np.int64) % 3)
    for chunk, start in enumerate(range(0, num_images, chunk_size)):
        rows = min(chunk_size, num_images - start)
        np.save(os.path.join(root, f"chunk_{chunk:06d}.npy"), np.ones((rows, 2, 2, 4, 2, 2), np.float16))
    return str(root)


def test_latent_dataset_opens_a_good_folder(tmp_path):
    ds = LatentDataset(write_latent_folder(tmp_path / "lat"))
    assert len(ds) == 10 and ds[9][0].shape == (4, 2, 2) and ds[9][1] == 0


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p, "r+b").truncate(100), "is truncated or not a .npy file"),
    (lambda p: np.save(p, np.ones((3, 2, 2, 4, 2, 2), np.float16)), "expected float16/32 (4, 2, 2, 4, 2, 2)"),
    (lambda p: np.save(p, np.ones((4, 2, 2, 4, 2, 2), np.int32)), "holds int32"),
    (lambda p: open(p, "wb").write(os.urandom(500)), "is truncated or not a .npy file"),
])
def test_latent_dataset_names_a_bad_shard(tmp_path, damage, message):
    root = write_latent_folder(tmp_path / "lat")
    shard = os.path.join(root, "chunk_000001.npy")
    damage(shard)
    with pytest.raises(DataError, match="latent shard " + re.escape(shard) + ".*" + re.escape(message)):
        LatentDataset(root)


def test_latent_dataset_bad_meta_and_labels(tmp_path):
    root = write_latent_folder(tmp_path / "lat")
    np.save(os.path.join(root, "labels.npy"), np.zeros(7, np.int64))
    with pytest.raises(DataError, match="labels.npy holds \\(7,\\) labels, meta.json says 10 images"):
        LatentDataset(root)
    with open(os.path.join(root, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        LatentDataset(root)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump({"num_images": 10}, f)
    with pytest.raises(DataError, match="lacks chunk_size, latent_shape, num_classes, image_size"):
        LatentDataset(root)
    with pytest.raises(MissingDataError, match="meta.json missing"):
        LatentDataset(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- sinusoids


def test_make_sinusoids_shapes_and_ranges():
    images, params = make_sinusoids(64, 32, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    f = params["f"][:, 0]
    assert torch.equal(f, f.round()) and f.min() >= 1 and f.max() <= 8
    assert params["theta"].min() >= 0 and params["theta"].max() < math.pi
    assert params["phi"].min() >= 0 and params["phi"].max() < 2 * math.pi
    assert params["c0"].shape == (64, 1, 3) and params["c1"].min() >= 0 and params["c1"].max() <= 1


def test_render_matches_formula():
    params = dict(
        f=torch.tensor([[2.0]]),
        theta=torch.tensor([[0.3]]),
        phi=torch.tensor([[1.0]]),
        c0=torch.tensor([[[0.1, 0.2, 0.3]]]),
        c1=torch.tensor([[[0.9, 0.5, 0.0]]]),
    )
    image = render_sinusoids(params, 16)[0]
    v, u = 5, 11
    wave = 0.5 * (1 + math.sin(2 * math.pi * 2 * (u * math.cos(0.3) + v * math.sin(0.3)) / 16 + 1.0))
    expected = [c0 + (c1 - c0) * wave for c0, c1 in zip([0.1, 0.2, 0.3], [0.9, 0.5, 0.0], strict=True)]
    assert torch.allclose(image[:, v, u], torch.tensor(expected), atol=1e-6)


def test_sinusoid_components_average():
    params = sample_sinusoid_params(4, 32, torch.Generator().manual_seed(1), components=3)
    assert params["f"].shape == (4, 3) and params["c0"].shape == (4, 3, 3)
    mixed = render_sinusoids(params, 32)
    single = [render_sinusoids({k: v[:, i : i + 1] for k, v in params.items()}, 32) for i in range(3)]
    assert torch.allclose(mixed, sum(single) / 3, atol=1e-6)


def test_sinusoid_dataset_deterministic_per_index():
    a, b = SinusoidDataset(10, seed=3), SinusoidDataset(1000, seed=3)
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == 0
    assert torch.equal(a[7][0], SinusoidDataset(10, seed=3)[7][0])
    assert not torch.equal(a[7][0], a[8][0])
    assert not torch.equal(a[7][0], SinusoidDataset(10, seed=4)[7][0])  # held-out set = other seed
    assert a[0][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        a[10]


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


def write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = struct.pack(">HBB", 0, codes[array.dtype], array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fake_fashion_mnist(root, n=5):
    os.makedirs(root, exist_ok=True)
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return images, labels


def test_read_idx_roundtrip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(str(tmp_path / "a.gz")), array)
    ints = np.array([[1, -2], [300000, 4]], dtype=">i4")
    write_idx(tmp_path / "b.gz", ints)
    out = read_idx(str(tmp_path / "b.gz"))
    assert out.dtype == np.int32 and np.array_equal(out, ints)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(str(tmp_path / "bad.gz"))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header"):
        read_idx(str(tmp_path / "short.gz"))


def test_fashion_mnist_from_idx_files(tmp_path):
    images, labels = write_fake_fashion_mnist(str(tmp_path))
    ds = FashionMNISTDataset(str(tmp_path), split="test", image_size=32)
    x, y = ds[3]
    assert len(ds) == 5 and y == 3 and x.shape == (1, 32, 32)
    assert torch.all(x[:, :2] == -1)  # zero padding is black background
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(images[3]).float() / 127.5 - 1)
    assert FashionMNISTDataset(str(tmp_path), image_size=28)[0][0].shape == (1, 28, 28)
    assert FashionMNISTDataset(str(tmp_path), image_size=16)[0][0].shape == (1, 16, 16)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNISTDataset(str(tmp_path / "nope"))


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_debian_package():
    ds, channels, size, classes = build_dataset("fashion-mnist", split="test")
    assert len(ds) == 10_000 and (channels, size, classes) == (1, 32, 10)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10 and x.min() >= -1 and x.max() <= 1
    assert sorted(np.unique(ds.labels)) == list(range(10))


# ----------------------------------------------------------------------------- factory


def test_build_dataset(tmp_path):
    ds, c, s, k = build_dataset("sinusoid", num_samples=7, image_size=16, seed=1)
    assert (len(ds), c, s, k) == (7, 3, 16, 1) and ds[0][0].shape == (3, 16, 16)
    write_fake_fashion_mnist(str(tmp_path / "fm"))
    ds, c, s, k = build_dataset("fashion-mnist", root=str(tmp_path / "fm"))
    assert (len(ds), c, s, k) == (5, 1, 32, 10)
    root = write_image_folder(tmp_path / "imgs")
    ds, c, s, k = build_dataset("imagenet", data_path=root, image_size=16)
    assert (len(ds), c, s, k) == (6, 3, 16, 2) and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="data_path"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("cifar", data_path=root)


def test_scan_image_files_reads_trees_as_training_does_and_flat_folders(tmp_path):
    """The lister of build_reference.py / evaluate.py: a tree exactly as scan_image_folder (links, order, junk),
    a flat folder of images by name; files beside the class folders left out and counted."""
    root = write_image_folder(tmp_path / "imgs")
    add_disk_junk(root)
    write_image_folder(tmp_path / "other", classes=("emu",))
    os.symlink(tmp_path / "other" / "emu", os.path.join(root, "emu"))
    Image.new("RGB", (4, 4)).save(os.path.join(root, "stray.png"))
    tree, files = scan_image_folder(root), scan_image_files(root)
    assert files.paths == tree.paths and files.labels == tree.labels and files.classes == ["cat", "dog", "emu"]
    assert files.hidden == tree.hidden == 4 and files.not_regular == tree.not_regular
    assert tree.beside_classes == 0 and files.beside_classes == 1
    assert "left out 1 image beside the class folders" in files.summary()
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.png", "a.jpg", "._a.png", "notes.txt"):
        Image.new("RGB", (4, 4)).save(flat / name, format="PNG")
    scan = scan_image_files(str(flat))
    assert scan.paths == [str(flat / "a.jpg"), str(flat / "b.png")] and scan.labels == [0, 0] and not scan.classes
    assert scan.hidden == 1
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(str(flat))  # not an ImageFolder tree: training refuses it
