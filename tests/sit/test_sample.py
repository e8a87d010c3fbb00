"""sample.py and sample_ddp.py on tiny checkpoints (CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sample
import sample_ddp
import torch
import train
from models import SiT
from PIL import Image

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A train.py checkpoint of a tiny pixel-space SiT on 8x8 sinusoids (2 steps)."""
    results = tmp_path_factory.mktemp("train")
    out = train.main(train.parse_args([
        "--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
        "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--max-steps", "2",
        "--eval-every", "0", "--sample-every", "0", "--no-progress", "--no-tensorboard", "--ema-decay", "0.5",
    ]))
    return out["checkpoint"]


def test_sample_grid_from_our_checkpoint(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--num-samples", "6", "--nrow", "3", "--num-steps", "2",
                                   "--out", str(out)]))
    grid = np.array(Image.open(out))
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)  # 2 rows x 3 columns of 8x8 images, 2px pad
    assert grid[2:10, 2:10].std() > 0  # an image, not the padding colour
    sde = tmp_path / "sde.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--num-samples", "4", "--mode", "sde", "--method", "euler",
                                   "--num-steps", "3", "--out", str(sde)]))
    assert Image.open(sde).size == (22, 22)


def test_decode_to_uint8_and_grid_layout(tmp_path: Path) -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    images = sample.decode_to_uint8(x)  # grayscale -> RGB, clamped, [-1, 1] -> [0, 255]
    assert images.shape == (1, 2, 2, 3) and images.dtype == np.uint8
    assert images[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    cells = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    sample.save_grid(cells, str(tmp_path / "g.png"), nrow=2)
    grid = np.array(Image.open(tmp_path / "g.png"))
    assert grid.shape == (14, 14, 3) and grid[2, 2, 0] == 10 and grid[2, 8, 0] == 20 and grid[8, 2, 0] == 30
    assert grid[8, 8, 0] == 255  # the missing 4th cell is padding


def test_latent_checkpoint_decodes_with_local_vae(tmp_path: Path) -> None:
    """Latent models go through the VAE given by --vae (a local diffusers directory, no download)."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    config = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                  num_classes=10)
    model = SiT(**config)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "model_config": config,
                "latent": True, "vae": str(tmp_path / "vae"), "step": 0}, tmp_path / "latent.pt")
    out = tmp_path / "latent.png"
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "latent.pt"), "--num-samples", "2",
                                   "--num-steps", "1",
                                   "--cfg-scale", "2.0", "--out", str(out)]))
    assert Image.open(out).size == (2 * (8 + 2) + 2, 8 + 2 + 2)  # 4x4 latents -> 8x8 pixels (2x VAE)


def ddp_args(ckpt: str, sample_dir: Path, *extra: str):
    return sample_ddp.parse_args(["--ckpt", ckpt, "--sample-dir", str(sample_dir), "--folder-name", "s",
                                  "--mode", "ode", "--method", "euler", "--num-steps", "2", *extra])


def test_sample_ddp_batch_size_independent_resumable_npz(ckpt: str, tmp_path: Path) -> None:
    npz_a = sample_ddp.main(ddp_args(ckpt, tmp_path / "a", "--num-fid-samples", "5",
                                     "--per-proc-batch-size", "2"))
    npz_b = sample_ddp.main(ddp_args(ckpt, tmp_path / "b", "--num-fid-samples", "5",
                                     "--per-proc-batch-size", "3"))
    with np.load(npz_a) as a, np.load(npz_b) as b:
        assert list(a.keys()) == ["arr_0"]
        arr_a, arr_b = a["arr_0"], b["arr_0"]
    assert arr_a.shape == (5, 8, 8, 3) and arr_a.dtype == np.uint8
    assert np.array_equal(arr_a, arr_b)  # each sample's noise and label depend only on (seed, index)
    assert len({arr_a[i].tobytes() for i in range(5)}) == 5  # but samples differ from each other
    other = sample_ddp.main(ddp_args(ckpt, tmp_path / "c", "--num-fid-samples", "2", "--global-seed", "1"))
    with np.load(other) as c:
        assert not np.array_equal(c["arr_0"], arr_a[:2])

    # Resume: existing PNGs are kept as they are, missing ones are regenerated identically.
    folder = tmp_path / "a" / "s"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000001.png")  # marks "already done"
    os.remove(folder / "000003.png")
    os.remove(folder / "000004.png")
    sample_ddp.main(ddp_args(ckpt, tmp_path / "a", "--num-fid-samples", "5", "--per-proc-batch-size", "2"))
    with np.load(npz_a) as a:
        resumed = a["arr_0"]
    assert (resumed[1] == 0).all()  # skipped
    assert np.array_equal(resumed[[0, 2, 3, 4]], arr_b[[0, 2, 3, 4]])
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(5)]  # no temp files left


def test_sde_samples_are_batch_size_independent_too(ckpt: str, tmp_path: Path) -> None:
    def run(folder: str, batch: str) -> np.ndarray:
        args = ddp_args(ckpt, tmp_path / folder, "--num-fid-samples", "5", "--per-proc-batch-size", batch)
        args.mode, args.num_steps, args.cfg_scale = "sde", 4, 2.0  # Brownian noise and CFG's doubled batch
        with np.load(sample_ddp.main(args)) as npz:
            return npz["arr_0"]

    assert np.array_equal(run("a", "2"), run("b", "3"))


def test_bf16_sampling_runs_under_autocast_and_stays_close_to_fp32(ckpt: str, tmp_path: Path, monkeypatch) -> None:
    seen = []
    original = sample_ddp.generate

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(*args, **kwargs)

    monkeypatch.setattr(sample_ddp, "generate", spy)

    def run(folder: str, *extra: str) -> np.ndarray:
        with np.load(sample_ddp.main(ddp_args(ckpt, tmp_path / folder, "--num-fid-samples", "3", *extra))) as npz:
            return npz["arr_0"].astype(int)

    fp32 = run("fp32")
    bf16 = run("bf16", "--precision", "bf16")
    assert seen == [False, True]
    assert np.abs(fp32 - bf16).max() <= 16 and np.abs(fp32 - bf16).mean() < 2


def test_sde_sampler_rejects_a_wrong_number_of_generators() -> None:
    from samplers import Sampler
    from transport import create_transport

    fn = Sampler(create_transport()).sample_sde(num_steps=3)
    with pytest.raises(ValueError, match="one per sample"):
        fn(torch.zeros(3, 1), lambda x, t: x, generator=[torch.Generator()] * 2)


def test_sample_seed_depends_on_seed_and_index_only() -> None:
    seeds = {sample_ddp.sample_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300
    y1, z1 = sample_ddp.sample_inputs(range(2, 5), 0, 10, (3, 4, 4))
    y2, z2 = sample_ddp.sample_inputs(range(0, 6), 0, 10, (3, 4, 4))
    assert torch.equal(z1, z2[2:5]) and torch.equal(y1, y2[2:5])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_ddp_two_processes_match_one(ckpt: str, tmp_path: Path) -> None:
    one = sample_ddp.main(ddp_args(ckpt, tmp_path / "one", "--num-fid-samples", "5",
                                   "--per-proc-batch-size", "2"))
    cli = ["--ckpt", ckpt, "--sample-dir", str(tmp_path / "two"), "--folder-name", "s", "--mode", "ode",
           "--method", "euler", "--num-steps", "2", "--num-fid-samples", "5", "--per-proc-batch-size", "2"]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(SIT_DIR / "sample_ddp.py"), *cli], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    with np.load(one) as a, np.load(tmp_path / "two" / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
