"""Work that rank 0 does alone (hashing a checkpoint, packing the .npz, writing metadata, the reference or a
checkpoint, reading checkpoints to resume) must not leave the other ranks waiting in a collective: NCCL's
watchdog ends a collective that waits longer than the group's timeout (torch's default, or
SIT_DIST_TIMEOUT_MINUTES), and a slow file system makes that work arbitrarily long. Here two gloo ranks run
with a group timeout of GROUP_TIMEOUT_S and rank 0's work slowed by more than that
(tests/sit/slow_rank_zero.py): every script must still finish.

Before the long-wait group (runtime/distributed.py) and the packing after leaving the group, rank 1 failed in
its broadcast or barrier with gloo's "Timed out waiting ... for recv operation".
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sample_ddp
from image_folders import write_image_folder
from ports import free_port

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
LAUNCHER = Path(__file__).resolve().parent / "slow_rank_zero.py"
GROUP_TIMEOUT_S = 6.0
SLOW_RANK0_S = 9.0  # past the group's timeout



def two_ranks(script: str, argv: list[str], cwd: Path, slow: float = SLOW_RANK0_S, timeout: float = 300
              ) -> list[subprocess.CompletedProcess]:
    """The launcher's script as two gloo ranks (RANK / WORLD_SIZE, as torchrun sets them); their results."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SLOW_RANK0_S=str(slow),
                GROUP_TIMEOUT_S=str(GROUP_TIMEOUT_S))
    procs = [subprocess.Popen([sys.executable, str(LAUNCHER), script, *argv], cwd=cwd,
                              env=base | dict(RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
            for p, (out, err) in zip(procs, outputs, strict=True)]


def assert_both_succeed(results: list[subprocess.CompletedProcess]) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}: {result.stderr[-3000:]}"
        assert "Timed out" not in result.stderr, result.stderr


def test_sample_ddp_rank_zero_hashing_and_packing_outlast_the_group_timeout(ckpt: str, tmp_path: Path) -> None:
    argv = ["--ckpt", ckpt, "--sample-dir", str(tmp_path / "two"), "--folder-name", "s", "--mode", "ode",
            "--method", "euler", "--num-steps", "2", "--num-fid-samples", "6", "--per-proc-batch-size", "2"]
    assert_both_succeed(two_ranks("sample_ddp.py", argv, tmp_path))
    one = sample_ddp.main(sample_ddp.parse_args([*argv[:3], str(tmp_path / "one"), *argv[4:]]))
    with np.load(one) as a, np.load(tmp_path / "two" / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_build_reference_rank_zero_metadata_and_reference_outlast_the_group_timeout(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", sizes=((12, 10), (9, 14)))
    out = tmp_path / "ref.npz"
    argv = ["--data-path", images, "--out", str(out), "--image-size", "8", "--shard-size", "2", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu"]
    assert_both_succeed(two_ranks("build_reference.py", argv, tmp_path))
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 8, 8, 3) and data["sigma"].shape[0] == data["mu"].shape[0]


def test_train_rank_zero_checkpoint_writes_and_reads_outlast_the_group_timeout(tmp_path: Path) -> None:
    """A milestone at step 2 (a background write), the last step's at 3 (synchronous), then a resume whose
    checkpoint rank 0 reads first: every torch.save and torch.load of a checkpoint on rank 0 is slowed."""
    argv = ["--data", "sinusoid", "--image-size", "8", "--data-size", "32", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(tmp_path), "--exp-name", "run",
            "--eval-every", "0", "--sample-every", "0", "--no-progress", "--ckpt-every", "2", "--log-every", "1"]
    assert_both_succeed(two_ranks("train.py", [*argv, "--max-steps", "3"], tmp_path))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000003.pt"]
    assert_both_succeed(two_ranks("train.py", [*argv, "--max-steps", "4", "--resume", "auto"], tmp_path))
    assert (tmp_path / "run" / "checkpoints" / "0000004.pt").exists()


@pytest.mark.slow  # the same long-wait barrier as build_reference.py's, behind a VAE load
def test_extract_latents_rank_zero_metadata_outlasts_the_group_timeout(tmp_path: Path) -> None:
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(tmp_path / "vae")
    images = write_image_folder(tmp_path / "images", sizes=((20, 16),))
    argv = ["--data-path", images, "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "latents"),
            "--image-size", "16", "--chunk-size", "1", "--batch-size", "1", "--num-workers", "0"]
    assert_both_succeed(two_ranks("extract_latents.py", argv, tmp_path))
    assert len(list((tmp_path / "latents").glob("chunk_*.npy"))) == 2
