"""export_images.py: the toy data sets as PNG folders, for build_reference.py (the FID of toy runs)."""
from __future__ import annotations

import os
from pathlib import Path

import export_images
import numpy as np
import pytest
import torch
from data.fashion_mnist import FASHION_MNIST_ROOT, FashionMNISTDataset
from data.npz import list_image_paths, load_image_folder
from data.sinusoids import SinusoidDataset
from modeling.vae import decode_to_uint8
from runtime.cli import UsageError


def export(*argv: str) -> str:
    return export_images.main(export_images.parse_args(list(argv)))


def test_sinusoids_are_fresh_draws_quantised_as_samples_are(tmp_path: Path) -> None:
    out = export("--data", "sinusoid", "--image-size", "8", "--num-images", "5", "--out", str(tmp_path / "s"))
    written = load_image_folder(out)
    dataset = SinusoidDataset(5, 8, seed=1)  # the default --seed: not train.py's seed-0 training items
    assert np.array_equal(written, decode_to_uint8(torch.stack([dataset[i][0] for i in range(5)])))
    assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(5)]  # flat, nothing else left
    assert not np.array_equal(written[0], decode_to_uint8(SinusoidDataset(1, 8, seed=0)[0][0][None])[0])
    with pytest.raises(UsageError, match="exists: images are never written into an existing folder"):
        export("--data", "sinusoid", "--out", out)
    with pytest.raises(UsageError, match="--split and --data-path are for --data fashion-mnist"):
        export("--data", "sinusoid", "--split", "test", "--out", str(tmp_path / "t"))
    assert sorted(os.listdir(tmp_path)) == ["s"]


@pytest.mark.skipif(not os.path.exists(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_writes_its_test_split_as_rgb_class_folders(tmp_path: Path) -> None:
    out = export("--data", "fashion-mnist", "--num-images", "12", "--out", str(tmp_path / "f"))
    paths = list_image_paths(out)
    assert len(paths) == 12 and all(os.path.basename(os.path.dirname(p)).isdigit() for p in paths)
    dataset = FashionMNISTDataset(split="test")
    by_index = {int(os.path.basename(p)[:-4]): p for p in paths}
    from PIL import Image

    for index, path in by_index.items():
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
            assert np.array_equal(np.array(image), decode_to_uint8(dataset[index][0][None])[0])
        assert os.path.basename(os.path.dirname(path)) == str(dataset[index][1])
