"""Tests for examples/sit/extract_latents.py and data.LatentDataset with a tiny random VAE (offline)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import extract_latents  # noqa: E402
from data.datasets import LatentDataset, build_dataset, latent_chunk_path  # noqa: E402
from image_folders import write_image_folder  # noqa: E402
from ports import free_port
from runtime.cli import UsageError  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "sit" / "extract_latents.py"


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    # 2 classes x 4 images = 8 images; chunk size 3 -> chunks of 3, 3, 2.
    return write_image_folder(
        tmp_path_factory.mktemp("data") / "train", sizes=((40, 32), (32, 48), (64, 64), (33, 35))
    )


def run_args(image_root, vae, out, **overrides):
    args = extract_latents.get_parser().parse_args(
        [
            "--data-path",
            image_root,
            "--vae",
            vae,
            "--out",
            str(out),
            "--image-size",
            "32",
            "--chunk-size",
            "3",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--dtype",
            "float32",
        ]
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def cli_args(image_root, vae_dir, out) -> list[str]:
    """The extraction settings every command-line run here shares (both ranks' runs compare to one)."""
    return ["--data-path", image_root, "--vae", vae_dir, "--out", str(out), "--image-size", "32",
            "--chunk-size", "3", "--batch-size", "2", "--num-workers", "0", "--dtype", "float32"]



@pytest.fixture(scope="module")
def straight_run(tiny_vae_dir, image_root, tmp_path_factory):
    """A complete extraction through the command line, started from another working directory."""
    out = tmp_path_factory.mktemp("straight") / "latents"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *cli_args(image_root, tiny_vae_dir, out),
        ],
        check=True,
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
    )
    return out


def test_output_layout(straight_run, tiny_vae_dir):
    meta = json.loads((straight_run / "meta.json").read_text())
    assert meta["num_images"] == 8 and meta["latent_shape"] == [4, 4, 4] and meta["num_classes"] == 2
    assert meta["scaling_factor"] == pytest.approx(0.18215)
    assert sorted(p.name for p in straight_run.iterdir() if p.name.startswith("chunk")) == [
        "chunk_000000.npy",
        "chunk_000001.npy",
        "chunk_000002.npy",
    ]
    assert np.load(latent_chunk_path(str(straight_run), 2)).shape == (2, 2, 2, 4, 4, 4)
    assert np.array_equal(np.load(straight_run / "labels.npy"), [0, 0, 0, 0, 1, 1, 1, 1])
    assert not [p for p in straight_run.iterdir() if ".tmp" in p.name]


def test_moments_match_the_vae(straight_run, tiny_vae_dir, image_root):
    from data.datasets import ImageFolderDataset

    vae = extract_latents.load_vae(tiny_vae_dir)
    x = ImageFolderDataset(image_root, 32, random_flip=False)[4][0][None]
    with torch.no_grad():
        plain, flipped = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
    stored = torch.from_numpy(np.load(latent_chunk_path(str(straight_run), 1))[1])  # image 4 = chunk 1, row 1
    assert torch.allclose(stored[0, 0], plain.mean[0], atol=1e-5) and torch.allclose(
        stored[0, 1], plain.std[0], atol=1e-5
    )
    assert torch.allclose(stored[1, 0], flipped.mean[0], atol=1e-5)
    assert torch.allclose(stored[1, 1], flipped.std[0], atol=1e-5)


def test_resume_after_interruption_equals_straight_run(straight_run, tiny_vae_dir, image_root, tmp_path):
    out = tmp_path / "latents"
    extract_latents.main(run_args(image_root, tiny_vae_dir, out, max_chunks=1))
    assert os.path.exists(latent_chunk_path(str(out), 0)) and not os.path.exists(
        latent_chunk_path(str(out), 1)
    )
    with pytest.raises(FileNotFoundError, match="missing"):
        LatentDataset(str(out))  # an unfinished extraction is refused, not silently partial
    first_mtime = os.stat(latent_chunk_path(str(out), 0)).st_mtime_ns
    # A process killed while writing leaves a temp file behind; it must not count as a finished chunk.
    (out / "chunk_000001.npy.tmp.999").write_bytes(b"garbage")
    extract_latents.main(run_args(image_root, tiny_vae_dir, out))
    assert os.stat(latent_chunk_path(str(out), 0)).st_mtime_ns == first_mtime  # finished chunk skipped
    for chunk in range(3):
        # allclose, not equal: the straight run is another process, whose thread count may change
        # the order of float reductions in the encoder.
        assert np.allclose(
            np.load(latent_chunk_path(str(out), chunk)),
            np.load(latent_chunk_path(str(straight_run), chunk)),
            rtol=0,
            atol=1e-5,
        )


def test_resume_with_other_settings_is_refused(straight_run, tiny_vae_dir, image_root, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(straight_run, out)
    with pytest.raises(UsageError, match="chunk_size"):
        extract_latents.main(run_args(image_root, tiny_vae_dir, out, chunk_size=4))


def test_latent_dataset_samples_posterior(straight_run):
    ds = LatentDataset(str(straight_run))
    assert len(ds) == 8 and ds.num_classes == 2
    z, y = ds.__getitem__(5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 4) and z.dtype == torch.float32 and y == 1
    z2, _ = ds.__getitem__(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)
    assert not torch.equal(z, ds.__getitem__(5, generator=torch.Generator().manual_seed(1))[0])
    # The exact draw: flip ~ randint(2), then z = (mean + std * eps) * 0.18215 — for seeds drawing either
    # flip, so that a dataset ignoring the flipped moments fails.
    moments = torch.from_numpy(np.array(ds.moments(5)))
    flips = set()
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        flip = int(torch.randint(2, (), generator=gen))
        eps = torch.randn(4, 4, 4, generator=gen)
        z = ds.__getitem__(5, generator=torch.Generator().manual_seed(seed))[0]
        assert torch.allclose(z, (moments[flip, 0] + moments[flip, 1] * eps) * 0.18215, atol=1e-6)
        flips.add(flip)
    assert flips == {0, 1}  # both flips occur over draws
    assert ds[0][0].shape == (4, 4, 4)  # plain indexing uses the global RNG


def test_build_dataset_latents(straight_run):
    ds, channels, size, classes = build_dataset("latents", path=str(straight_run))
    assert (len(ds), channels, size, classes) == (8, 4, 4, 2)
    with pytest.raises(ValueError, match="not image_size"):
        build_dataset("latents", data_path=str(straight_run), image_size=64)


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(straight_run, tiny_vae_dir, image_root, tmp_path):
    out = tmp_path / "latents"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(SCRIPT),
            *cli_args(image_root, tiny_vae_dir, out),
        ],
        check=True,
        cwd=tmp_path,
        env=env,
    )
    for chunk in range(3):
        assert np.allclose(
            np.load(latent_chunk_path(str(out), chunk)),
            np.load(latent_chunk_path(str(straight_run), chunk)),
            atol=1e-6,
        )


def test_load_vae_takes_a_pipeline_directory_with_a_vae_subfolder(tiny_vae_dir, tmp_path):
    import shutil

    from modeling.vae import load_vae

    shutil.copytree(tiny_vae_dir, tmp_path / "pipeline" / "vae")
    direct, nested = load_vae(tiny_vae_dir), load_vae(str(tmp_path / "pipeline"))
    for (name, a), b in zip(direct.state_dict().items(), nested.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not nested.training and not any(p.requires_grad for p in nested.parameters())
