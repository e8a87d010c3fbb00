"""What writing the PNGs costs sample_ddp.py: its sampling loop with the PNGs written in the loop (``--png-threads
0``, as before) against written by a thread pool while the next batch samples (``--png-threads N``).

A pixel-space SiT with random weights samples ``--num-samples`` images of ``--image-size`` (so the PNGs have
the size of ImageNet-256 samples) with a few Euler steps: the network is cheap, as it is per image on a GPU
next to a PNG's encoding and fsync. Each arm samples into a fresh folder of ``--dir``; the arms alternate,
repeat after repeat, and their PNGs and .npz are checked to be byte-identical. Columns: seconds of the
sampling loop (``sample_all``: sampling, decoding, PNG writes), of the whole script, and images/s of the loop.
Prints a table last and writes JSON.

    python benchmarks/sample_writes.py --dir /tmp/png-bench
    python benchmarks/sample_writes.py --dir /shared/samples --threads 0 4 8 --num-samples 512
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
import sample_ddp  # noqa: E402
from modeling.models import SiT  # noqa: E402
from report import run_metadata, write_json  # noqa: E402


def tiny_checkpoint(path: Path, image_size: int, patch: int) -> None:
    """A train.py-style checkpoint of a small pixel-space SiT (random weights: the images are noise-like,
    which is what makes PNGs expensive)."""
    torch.manual_seed(0)
    config = dict(input_size=image_size, patch_size=patch, in_channels=3, hidden_size=64, depth=2, num_heads=2,
                  num_classes=10, learn_sigma=False)
    model = SiT(**config)
    torch.save(dict(model=model.state_dict(), ema=model.state_dict(), model_config=config, latent=False, vae=None,
                    step=0, args=dict(path_type="Linear", prediction="velocity")), path)


def folder_digest(folder: Path) -> str:
    """SHA-256 over the folder's PNGs, in name order."""
    digest = hashlib.sha256()
    for png in sorted(folder.glob("*.png")):
        digest.update(png.read_bytes())
    return digest.hexdigest()


def run_arm(ckpt: Path, out: Path, threads: int, args: argparse.Namespace) -> dict:
    """One sample_ddp.py run: seconds of its sampling loop and of the whole script, and digests of the outputs."""
    loop = []
    real = sample_ddp.sample_all

    def timed(*a, **kw):
        start = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            loop.append(time.perf_counter() - start)

    sample_ddp.sample_all = timed
    try:
        start = time.perf_counter()
        npz = sample_ddp.main(sample_ddp.parse_args([
            "--ckpt", str(ckpt), "--sample-dir", str(out), "--folder-name", "s", "--mode", "ode", "--method",
            "euler", "--num-steps", str(args.steps), "--num-fid-samples", str(args.num_samples),
            "--per-proc-batch-size", str(args.batch_size), "--png-threads", str(threads)]))
        total = time.perf_counter() - start
    finally:
        sample_ddp.sample_all = real
    with np.load(npz) as data:
        npz_sha = hashlib.sha256(data["arr_0"].tobytes()).hexdigest()
    return dict(loop_s=loop[0], total_s=total, png_sha256=folder_digest(out / "s"), arr_0_sha256=npz_sha)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="folder the samples are written in (a sub-folder is made and "
                                                     "removed): one on the disk your samples go to")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 4], help="--png-threads arms (default: 0 4)")
    parser.add_argument("--num-samples", type=int, default=256, help="images per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="--per-proc-batch-size (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--patch", type=int, default=16, help="SiT patch size (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="Euler steps per image (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/sample_writes.json", help="JSON record")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    root = Path(args.dir) / f"sample-writes-{os.getpid()}"
    root.mkdir(parents=True)
    runs: dict[int, list[dict]] = {t: [] for t in args.threads}
    try:
        ckpt = root / "tiny.pt"
        tiny_checkpoint(ckpt, args.image_size, args.patch)
        for repeat in range(args.repeats):
            order = args.threads[repeat % len(args.threads):] + args.threads[:repeat % len(args.threads)]
            for threads in order:
                out = root / f"t{threads}-r{repeat}"
                runs[threads].append(run_arm(ckpt, out, threads, args))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    digests = {(r["png_sha256"], r["arr_0_sha256"]) for rs in runs.values() for r in rs}
    assert len(digests) == 1, "the arms wrote different PNGs or .npz"
    rows = []
    for threads, rs in runs.items():
        loop = statistics.median(r["loop_s"] for r in rs)
        rows.append(dict(png_threads=threads, loop_s=loop, loop_s_range=[min(r["loop_s"] for r in rs),
                                                                         max(r["loop_s"] for r in rs)],
                         total_s=statistics.median(r["total_s"] for r in rs), img_per_s=args.num_samples / loop))
    settings = {k: v for k, v in vars(args).items() if k not in ("dir", "out", "threads")}
    result = dict(meta=run_metadata(torch.device("cpu"), dir=str(Path(args.dir).resolve()), arms=args.threads,
                                    load_average=os.getloadavg(), **settings),
                  rows=rows, runs=runs, identical_outputs=True)
    path = write_json(args.out, result)
    print(f"{'png threads':>11} {'loop s':>8} {'range':>13} {'total s':>8} {'img/s':>7}")
    print("-" * 51)
    for row in rows:
        low, high = row["loop_s_range"]
        print(f"{row['png_threads']:11d} {row['loop_s']:8.2f} {low:6.2f}-{high:<6.2f} {row['total_s']:8.2f} "
              f"{row['img_per_s']:7.1f}")
    print(f"PNGs and arr_0 identical in every run; wrote {path}")


if __name__ == "__main__":
    main()
