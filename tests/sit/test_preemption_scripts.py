"""sample_ddp.py and extract_latents.py stopped by a signal mid-run: exit status 75, only complete files on
disk, and the same command rerun ends with the outputs of an uninterrupted run."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import write_image_folder
from ports import free_port
from runtime.preemption import EXIT_PREEMPTED
from stopping import signal_when

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from e2e_checks import parents  # noqa: E402  (the /proc reader benchmarks/example_e2e.py uses)

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | dict(
        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def stop_when(cmd: list[str], ready, sig: signal.Signals, what: str, timeout: float = 240.0
              ) -> subprocess.CompletedProcess:
    """Run cmd, send sig once ready() holds (polled: never a fixed sleep), return the finished process."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    [(out, err)] = signal_when([proc], ready, sig, what, timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def no_temp_files(folder: Path) -> bool:
    return not [name for name in os.listdir(folder) if ".tmp-" in name]


# ----------------------------------------------------------------------------- sample_ddp.py


SAMPLES = 32


def sample_cli(ckpt: str, sample_dir: Path) -> list[str]:
    return [sys.executable, str(SIT_DIR / "sample_ddp.py"), "--ckpt", ckpt, "--sample-dir", str(sample_dir),
            "--folder-name", "s", "--mode", "sde", "--method", "euler", "--num-steps", "40",
            "--num-fid-samples", str(SAMPLES), "--per-proc-batch-size", "2"]


@pytest.fixture(scope="module")
def straight_npz(ckpt: str, tmp_path_factory) -> Path:
    sample_dir = tmp_path_factory.mktemp("straight")
    subprocess.run(sample_cli(ckpt, sample_dir), env=env(), check=True, capture_output=True, timeout=240)
    return sample_dir / "s.npz"


@pytest.mark.parametrize("sig, seed", [(signal.SIGUSR1, 6)])  # SIGTERM: the extraction test below
def test_sample_ddp_stopped_then_rerun_gives_the_straight_npz(ckpt: str, straight_npz: Path, tmp_path: Path,
                                                              sig: signal.Signals, seed: int) -> None:
    folder = tmp_path / "stopped" / "s"
    target = random.Random(seed).randrange(2, 12, 2)

    def pngs() -> int:
        return len(list(folder.glob("*.png"))) if folder.exists() else 0

    stopped = stop_when(sample_cli(ckpt, tmp_path / "stopped"), lambda: pngs() >= target, sig, f"{target} PNGs")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert f"sample_ddp.py: stopped by {sig.name}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert target <= pngs() < SAMPLES and pngs() % 2 == 0  # whole batches only
    assert no_temp_files(folder) and not (tmp_path / "stopped" / "s.npz").exists()
    subprocess.run(sample_cli(ckpt, tmp_path / "stopped"), env=env(), check=True, capture_output=True, timeout=240)
    with np.load(straight_npz) as a, np.load(tmp_path / "stopped" / "s.npz") as b:
        assert a["arr_0"].shape[0] == SAMPLES and np.array_equal(a["arr_0"], b["arr_0"])


# ----------------------------------------------------------------------------- extract_latents.py


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return write_image_folder(tmp_path_factory.mktemp("data") / "train", sizes=((80, 72),) * 12)


def extract_cli(images: str, vae_dir: str, out: Path, workers: str = "0") -> list[str]:
    return [sys.executable, str(SIT_DIR / "extract_latents.py"), "--data-path", images, "--vae", vae_dir,
            "--out", str(out), "--image-size", "64", "--chunk-size", "2", "--batch-size", "1",
            "--num-workers", workers, "--dtype", "float32"]


@pytest.fixture(scope="module")
def straight_latents(images: str, vae_dir: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "latents"
    subprocess.run(extract_cli(images, vae_dir, out), env=env(), check=True, capture_output=True, timeout=240)
    return out


@pytest.mark.parametrize("sig, seed, workers", [(signal.SIGTERM, 7, "1")])  # SIGUSR1: the sampling test above
def test_extract_latents_stopped_then_rerun_gives_the_straight_latents(images: str, vae_dir: str,
                                                                       straight_latents: Path, tmp_path: Path,
                                                                       sig: signal.Signals, seed: int,
                                                                       workers: str) -> None:
    out = tmp_path / "stopped"
    target = random.Random(seed).randrange(1, 4)

    def chunks() -> int:
        return len(list(out.glob("chunk_*.npy"))) if out.exists() else 0

    stopped = stop_when(extract_cli(images, vae_dir, out, workers), lambda: chunks() >= target, sig,
                        f"{target} chunks")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert f"extract_latents.py: stopped by {sig.name}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert target <= chunks() < 12 and no_temp_files(out)
    subprocess.run(extract_cli(images, vae_dir, out), env=env(), check=True, capture_output=True, timeout=240)
    names = sorted(p.name for p in straight_latents.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(straight_latents / name), np.load(out / name)), name


def test_sample_ddp_two_ranks_stop_together_and_one_process_finishes(ckpt: str, straight_npz: Path,
                                                                     tmp_path: Path) -> None:
    """Both ranks get SIGTERM (as from torchrun or SLURM), meet at the end, exit 75; a rerun with another
    number of processes completes the same .npz."""
    port = free_port()
    folder = tmp_path / "s"
    procs = [subprocess.Popen(sample_cli(ckpt, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env() | dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    results = signal_when(procs, lambda: folder.exists() and len(list(folder.glob("*.png"))) >= 4, signal.SIGTERM,
                          "4 PNGs")
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, results
    assert all("Traceback" not in err for _, err in results), results
    assert results[0][1].count("sample_ddp.py: stopped by SIGTERM") == 1 and not results[1][1]
    assert len(list(folder.glob("*.png"))) < SAMPLES and no_temp_files(folder)
    subprocess.run(sample_cli(ckpt, tmp_path), env=env(), check=True, capture_output=True, timeout=240)
    with np.load(straight_npz) as a, np.load(tmp_path / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def torchrun_workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun agent started (its children with RANK set)."""
    workers = {}
    for pid in [child for child, parent in parents().items() if parent == agent]:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue  # ended meanwhile
        if b"RANK" in environ:
            workers[int(environ[b"RANK"])] = pid
    return workers


def torchrun_cli(argv: list[str]) -> list[str]:
    """torchrun with two CPU ranks on a free port, running argv (a script and its flags)."""
    port = free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), *argv]


def signal_rank_one(cmd: list[str], ready, what: str, timeout: float = 240.0) -> str:
    """Start a torchrun job, SIGTERM its rank 1 alone once ready() holds, return the job's whole output."""
    agent = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        workers: dict[int, int] = {}
        while not (len(workers) == 2 and ready()):
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            workers = workers if len(workers) == 2 else torchrun_workers(agent.pid)
            time.sleep(0.02)
        os.kill(workers[1], signal.SIGTERM)
        return agent.communicate(timeout=timeout)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def rank_batches_done(folder: Path, rank: int, batch: int = 2, world: int = 2) -> int:
    """Whole batches of rank's share (batches rank, rank + world, ...) whose PNGs are all on disk."""
    return sum(all((folder / f"{i:06d}.png").exists() for i in range(k * batch, (k + 1) * batch))
               for k in range(rank, SAMPLES // batch, world))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers through /proc")
def test_sample_ddp_signal_to_one_rank_stops_both_within_a_batch(ckpt: str, straight_npz: Path,
                                                                tmp_path: Path) -> None:
    """SIGTERM to rank 1 alone of a torchrun job: rank 0 learns it at the ranks' next check and stops too,
    instead of running all of its remaining batches; the rerun under torchrun gives the straight .npz."""
    folder = tmp_path / "s"
    per_rank = SAMPLES // 2 // 2
    # --stop-sync-seconds far below one batch: a check before every batch, so the bound is exact here.
    def cmd() -> list[str]:
        return torchrun_cli([*sample_cli(ckpt, tmp_path)[1:], "--stop-sync-seconds", "0.001"])

    output = signal_rank_one(cmd(), lambda: rank_batches_done(folder, 1) >= 1, "rank 1's first batch")
    done = [rank_batches_done(folder, rank) for rank in range(2)]
    assert "sample_ddp.py: stopped by a signal to another rank" in output, output
    assert len(re.findall(r"exitcode\s+:\s+75 \(pid", output)) == 2, output  # torchrun's report: both ranks exit 75
    # Rank 0 stops at the check after rank 1's last batch: at most one batch past it, never all of its share.
    assert done[1] < per_rank and done[0] <= done[1] + 1 and done[0] < per_rank, (done, output)
    assert no_temp_files(folder) and not (tmp_path / "s.npz").exists()
    rerun = subprocess.run(cmd(), env=env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with np.load(straight_npz) as a, np.load(tmp_path / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_stop_sync_seconds_is_checked_before_any_work(tmp_path: Path) -> None:
    for script, argv in (("sample_ddp.py", ["--ckpt", str(tmp_path / "none.pt"), "--sample-dir", str(tmp_path)]),
                         ("extract_latents.py", ["--data-path", str(tmp_path), "--out", str(tmp_path / "out")])):
        done = subprocess.run([sys.executable, str(SIT_DIR / script), *argv, "--stop-sync-seconds", "0"], env=env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"{script}: error: --stop-sync-seconds must be > 0" in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


CHUNKS = 12  # the images fixture's 24 images in chunks of 2


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers through /proc")
def test_extract_latents_signal_to_one_rank_stops_both(images: str, vae_dir: str, straight_latents: Path,
                                                       tmp_path: Path) -> None:
    """The same for extract_latents.py: 12 chunks of 2 images, one image per batch, the even chunks on rank 0;
    rank 1 alone is stopped after its first chunk, and rank 0 writes at most one more chunk, not all six."""
    out = tmp_path / "latents"

    def chunks(rank: int) -> int:
        return sum((out / f"chunk_{c:06d}.npy").exists() for c in range(rank, CHUNKS, 2))

    cmd = torchrun_cli([*extract_cli(images, vae_dir, out)[1:], "--stop-sync-seconds", "0.001"])
    output = signal_rank_one(cmd, lambda: chunks(1) >= 1, "rank 1's first chunk")
    assert "extract_latents.py: stopped by a signal to another rank" in output, output
    assert len(re.findall(r"exitcode\s+:\s+75 \(pid", output)) == 2, output
    assert chunks(1) < CHUNKS // 2 and chunks(0) <= chunks(1) + 1 and chunks(0) < CHUNKS // 2, \
        (chunks(0), chunks(1), output)
    assert no_temp_files(out)
    rerun = subprocess.run(torchrun_cli([*extract_cli(images, vae_dir, out)[1:]]), env=env(), capture_output=True,
                           text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(p.name for p in out.glob("chunk_*.npy")) == sorted(p.name for p in straight_latents.glob("chunk_*"))
    for c in range(CHUNKS):
        name = f"chunk_{c:06d}.npy"
        assert np.allclose(np.load(straight_latents / name), np.load(out / name), atol=1e-6), name
