"""How long train.py takes to write a checkpoint of a given size on the file system a folder is on.

A stop signal's checkpoint must be on disk before the scheduler's SIGKILL (SLURM: ``KillWait`` seconds after
SIGTERM; ``--signal=USR1@N``: N seconds before the time limit), so the stop budget is the write time of the
whole state — weights, EMA and AdamW's two moments, 10.8 GB for SiT-XL/2. This times train.py's own write
path (``runtime/checkpoint_writer.write_state``: torch.save into a temp file, fsync, rename, folder fsync) for
states of the given sizes, made of float32 tensors of a few MB like a model's, and the copy into host memory
that a background write starts with (from the GPU with ``--device cuda``). It projects the write time of each
``--models`` state at the median rate measured. Prints a table last and writes JSON.

    python benchmarks/checkpoint_write.py --dir /shared/results/ckpt-bench              # your cluster's disk
    python benchmarks/checkpoint_write.py --dir /tmp/ckpt-bench --sizes-gb 0.5 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from device import pick_device, sync  # noqa: E402
from modeling.models import SIT_SIZES, SiT  # noqa: E402
from report import run_metadata, write_json  # noqa: E402
from runtime.checkpoint_writer import to_host, write_state  # noqa: E402

TENSOR_BYTES = 16 << 20  # a state of tensors this large (SiT-XL/2's biggest weights are about 21 MB)
STATE_COPIES = 4  # weights, EMA, AdamW's exp_avg and exp_avg_sq, all float32


def state_bytes(model: str) -> int:
    """Bytes of a train.py checkpoint of SiT-<size>/<patch> (ImageNet-256 latents: 32 x 32 x 4)."""
    size, patch = model.split("/")
    depth, hidden, heads = SIT_SIZES[size]
    with torch.device("meta"):
        sit = SiT(input_size=32, patch_size=int(patch), in_channels=4, hidden_size=hidden, depth=depth,
                  num_heads=heads, num_classes=1000, learn_sigma=False)
    return STATE_COPIES * 4 * sum(p.numel() for p in sit.parameters())


def make_state(nbytes: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 tensors of TENSOR_BYTES (the last one smaller) adding up to nbytes, random (nothing to compress)."""
    gen = torch.Generator(device).manual_seed(seed)
    state, left, i = {}, nbytes, 0
    while left > 0:
        numel = max(1, min(TENSOR_BYTES, left) // 4)
        state[f"t{i:05d}"] = torch.rand(numel, generator=gen, device=device)
        left -= numel * 4
        i += 1
    return state


def measure(nbytes: int, folder: Path, device: torch.device, repeats: int) -> dict:
    """Median and range over repeats of the host copy and of the durable write of one state of nbytes."""
    state = make_state(nbytes, device)
    copies, writes = [], []
    for r in range(repeats):
        sync(device)
        start = time.perf_counter()
        host = to_host(state)
        copies.append(time.perf_counter() - start)
        path = folder / f"{r:07d}.pt"
        stats = write_state(str(path), host)
        writes.append(stats.seconds)
        written = stats.bytes
        os.remove(path)
        del host
    rate = written / statistics.median(writes) / 1e6
    return dict(state_gb=nbytes / 1e9, file_gb=written / 1e9, copy_s=statistics.median(copies),
                copy_s_range=[min(copies), max(copies)], write_s=statistics.median(writes),
                write_s_range=[min(writes), max(writes)], write_mb_per_s=rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="folder to write in: one on the file system your checkpoints "
                                                     "go to (a sub-folder is made and removed)")
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                        help="state sizes to time (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="writes per size (default: %(default)s)")
    parser.add_argument("--models", nargs="*", default=["XL/2", "B/4"],
                        help="SiT sizes whose checkpoint write time is projected (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="where the state lives before the copy (default: auto)")
    parser.add_argument("--out", default="benchmarks/results/checkpoint_write.json", help="JSON record")
    args = parser.parse_args()
    device = pick_device(args.device)
    folder = Path(args.dir) / f"checkpoint-write-{os.getpid()}"
    folder.mkdir(parents=True)
    try:
        rows = [measure(int(gb * 1e9), folder, device, args.repeats) for gb in args.sizes_gb]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rate = statistics.median(row["write_mb_per_s"] for row in rows)
    projected = {model: dict(state_gb=state_bytes(model) / 1e9, write_s=state_bytes(model) / 1e6 / rate)
                 for model in args.models}
    result = dict(meta=run_metadata(device, dir=str(Path(args.dir).resolve()), repeats=args.repeats,
                                    load_average=os.getloadavg()),
                  rows=rows, median_write_mb_per_s=rate, projected=projected)
    path = write_json(args.out, result)

    print(f"{'state GB':>9} {'copy s':>8} {'write s':>8} {'range':>13} {'MB/s':>7}")
    print("-" * 49)
    for row in rows:
        low, high = row["write_s_range"]
        print(f"{row['state_gb']:9.2f} {row['copy_s']:8.2f} {row['write_s']:8.2f} {low:6.2f}-{high:<6.2f} "
              f"{row['write_mb_per_s']:7.0f}")
    print(f"median write rate {rate:.0f} MB/s (fsync included) in {Path(args.dir).resolve()}; projected:")
    for model, p in projected.items():
        print(f"  SiT-{model}: {p['state_gb']:.2f} GB state, write {p['write_s']:.1f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
