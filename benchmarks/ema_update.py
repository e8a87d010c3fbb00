"""The EMA update of train.py: the per-parameter loop it had against the multi-tensor ops it has, in one process.

Modes, each stepping the same EMA parameter list towards the same weights (SiT-shaped lists built on the device
from the model's parameter shapes; timed interleaved, the order rotating every repeat, so drift in the machine's
speed hits them all alike):

    loop     train.py's former update_ema: a dict of the EMA's named parameters, then ema.mul_(d).add_(p, 1 - d)
             per parameter (two kernels each: ~580 launches for SiT-XL/2's 292 tensors)
    foreach  modeling/ema.update_ema on lists built once: torch._foreach_mul_ + torch._foreach_add_
    lerp     torch._foreach_lerp_(ema, weights, 1 - d): one pass fewer over the EMA, rounded differently

Sizes: ``full`` (the model's real tensors: memory-bound) and ``one`` (as many tensors, one element each: the
per-tensor dispatch and launch cost alone). After the timing of each size, a check steps copies of the same
start with each mode once and reports the largest difference from ``loop`` and whether it is bit-identical.
Each row is printed, and the JSON rewritten, as soon as it is measured.

    python benchmarks/ema_update.py --threads 1                  # XL/2 on the CPU (and on CUDA when there is one)
    python benchmarks/ema_update.py --configs B/4 --sizes one    # quicker
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from device import sync  # noqa: E402
from modeling.ema import ema_parameters, update_ema  # noqa: E402
from modeling.models import SiT  # noqa: E402
from report import run_metadata, write_json  # noqa: E402

CONFIGS = {
    "tiny": dict(input_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=4),
    "B/4": dict(input_size=32, patch_size=4, hidden_size=768, depth=12, num_heads=12),
    "XL/2": dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}
MODES = ("loop", "foreach", "lerp")
DECAY = 0.9999


@torch.no_grad()
def loop_update(ema_model: nn.Module, model: nn.Module, decay: float = DECAY) -> None:
    """train.py's update_ema before the multi-tensor ops, verbatim."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def build_pair(name: str, size: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(weights, EMA): SiT of the config with uniform random values, made on the device without the model's
    initialisation; ``one``: every parameter replaced by a 1-element one (same names and count)."""
    with torch.device("meta"):
        model = SiT(**CONFIGS[name], in_channels=4, num_classes=1000, learn_sigma=False)
    model = model.to_empty(device=device).requires_grad_(False)
    if size == "one":
        for module in model.modules():
            for key, param in list(module.named_parameters(recurse=False)):
                setattr(module, key, nn.Parameter(param.new_empty(1), requires_grad=False))
    gen = torch.Generator(device).manual_seed(0)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for a, b in zip(model.parameters(), ema.parameters(), strict=True):
            a.uniform_(-1, 1, generator=gen)
            b.uniform_(-1, 1, generator=gen)
    return model, ema


def mode_functions(model: nn.Module, ema: nn.Module) -> dict[str, Callable[[], None]]:
    ema_params, params = ema_parameters(ema, model)  # built once, as train.py does
    return {
        "loop": lambda: loop_update(ema, model),
        "foreach": lambda: update_ema(ema_params, params, DECAY),
        "lerp": lambda: torch._foreach_lerp_(ema_params, params, 1 - DECAY),
    }


def check(model: nn.Module, ema: nn.Module, group: int = 16) -> dict[str, tuple[float, bool]]:
    """Each mode's largest |difference| from loop after one update from the same EMA, and whether it is
    bit-identical (a few tensors at a time: a full copy per mode would not fit beside XL/2 on a small machine)."""
    result = {mode: [0.0, True] for mode in MODES if mode != "loop"}
    ema_params, params = ema_parameters(ema, model)
    with torch.no_grad():
        for start in range(0, len(params), group):
            targets, sources = ema_params[start:start + group], params[start:start + group]
            looped = [e.clone().mul_(DECAY).add_(p, alpha=1 - DECAY) for e, p in zip(targets, sources, strict=True)]
            others = {"foreach": [e.clone() for e in targets], "lerp": [e.clone() for e in targets]}
            update_ema(others["foreach"], sources, DECAY)
            torch._foreach_lerp_(others["lerp"], sources, 1 - DECAY)
            for mode, updated in others.items():
                diff = max((a - b).abs().max().item() for a, b in zip(updated, looped, strict=True))
                result[mode][0] = max(result[mode][0], diff)
                result[mode][1] &= all(torch.equal(a, b) for a, b in zip(updated, looped, strict=True))
    return {mode: (diff, same) for mode, (diff, same) in result.items()}


def bench_case(name: str, size: str, device: torch.device, args: argparse.Namespace) -> list[dict]:
    model, ema = build_pair(name, size, device)
    functions = mode_functions(model, ema)
    warm = {}
    for mode in MODES:  # warm-up, and the duration of one update, to size the timed blocks
        functions[mode]()
        sync(device)
        start = time.perf_counter()
        functions[mode]()
        sync(device)
        warm[mode] = time.perf_counter() - start
    steps = max(1, math.ceil(args.min_block_s / max(min(warm.values()), 1e-9)))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % len(MODES):] + MODES[:repeat % len(MODES)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                functions[mode]()
            sync(device)
            times[mode].append((time.perf_counter() - start) / steps * 1e3)
    checked = check(model, ema)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a shared machine's other work
    params = list(model.parameters())
    base = statistics.median(times["loop"])
    rows = []
    for mode in MODES:
        median = statistics.median(times[mode])
        q = statistics.quantiles(times[mode], n=4) if len(times[mode]) > 1 else [median] * 3
        diff, same = checked.get(mode, (0.0, True))
        rows.append(dict(device=device.type, config=name, size=size, tensors=len(params),
                         params_m=sum(p.numel() for p in params) / 1e6, mode=mode, steps_per_block=steps,
                         ms_median=median, ms_q1=q[0], ms_q3=q[2], ms_all=times[mode], speedup_vs_loop=base / median,
                         max_abs_diff_vs_loop=diff, bit_identical_to_loop=same, load_1min=load))
    return rows


HEADER = (f"{'device':<6} {'config':<6} {'size':<5} {'tensors':>7} {'params M':>9} {'mode':<8} {'ms/update':>10} "
          f"{'IQR':>17} {'vs loop':>8} {'max|diff|':>10} {'bit-equal':>9}")


def row_line(r: dict) -> str:
    return (f"{r['device']:<6} {r['config']:<6} {r['size']:<5} {r['tensors']:>7} {r['params_m']:>9.2f} "
            f"{r['mode']:<8} {r['ms_median']:>10.3f} {r['ms_q1']:>8.3f}-{r['ms_q3']:<8.3f} "
            f"{r['speedup_vs_loop']:>7.2f}x {r['max_abs_diff_vs_loop']:>10.2e} {str(r['bit_identical_to_loop']):>9}")


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    meta = run_metadata(torch.device("cuda" if "cuda" in devices else "cpu"), repeats=args.repeats,
                        min_block_s=args.min_block_s, decay=DECAY, cpu=cpu_model())
    rows: list[dict] = []
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for device_name in devices:
        for name in args.configs:
            for size in args.sizes:
                case = bench_case(name, size, torch.device(device_name), args)
                for row in case:
                    print(row_line(row), flush=True)
                rows.extend(case)
                out = write_json(args.out, dict(meta=meta, rows=rows))  # what is measured so far survives a kill
    print(f"\n{meta['device']} ({meta['cpu']}), torch {meta['torch']}, {meta['threads']} threads; "
          f"ms per update (median of {args.repeats} interleaved blocks); max|diff| and bit-equal: one update from "
          f"the same EMA, against loop; JSON: {out}")
    return rows


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the record."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["XL/2"])
    parser.add_argument("--sizes", nargs="+", choices=["full", "one"], default=["full", "one"])
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="default: the CPU, and CUDA when there is one")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed blocks per mode")
    parser.add_argument("--min-block-s", type=float, default=0.2,
                        help="updates per timed block: enough for this many seconds of the fastest mode")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/ema_update.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
