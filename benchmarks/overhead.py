"""What ANM costs per training step: time and memory with and without it, side by side in one process.

Each mode (no ANM, the library's ANM, and a naive forward hook) gets its own copy of the
same SiT, the same inputs and the same optimizer, and the modes are timed interleaved, repeat after
repeat, so drift in the machine's speed hits them all alike. Prints a table last and writes JSON.

    python benchmarks/overhead.py                              # tiny SiT on CPU, fp32 and bf16
    python benchmarks/overhead.py --configs XL/2 B/4 --precisions bf16 fp32 --compile   # on a GPU
    python benchmarks/overhead.py --threads 1 --tuned-malloc   # CPU without glibc's page-fault churn
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import resource
except ImportError:  # Windows: no page-fault counter
    resource = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from device import pick_device, sync  # noqa: E402
from modeling.models import SiT  # noqa: E402
from report import ResultFile, run_metadata  # noqa: E402

import anm  # noqa: E402

# name: (model kwargs, batch size). "tiny"/"small" are CPU sizes; XL/2 and B/4 are the GPU anchors.
CONFIGS = {
    "tiny": (dict(input_size=16, patch_size=2, hidden_size=128, depth=6, num_heads=4), 32),
    "small": (dict(input_size=16, patch_size=2, hidden_size=384, depth=12, num_heads=6), 16),
    "B/4": (dict(input_size=32, patch_size=4, hidden_size=768, depth=12, num_heads=12), 256),
    "XL/2": (dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16), 32),
}
# "control" is a second, identical copy of the baseline: its "overhead" is the noise floor of the
# measurement (allocation and cache placement differ between copies, which alone can move a CPU step).
MODES = ("baseline", "anm", "naive", "control")


class NaiveANM:
    """The naive way: a hook per block appending vector_norm(output) to a list, hinge loss on them."""

    def __init__(self, model: torch.nn.Module, alpha: float = 70.0, lam: float = 10.0) -> None:
        self.alpha, self.lam, self.norms = alpha, lam, []
        for block in model.blocks:
            block.register_forward_hook(
                lambda module, args, out: self.norms.append(
                    torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
                )
            )

    def loss(self) -> torch.Tensor:
        norms, self.norms = self.norms, []
        return self.lam * torch.stack([torch.relu(self.alpha - n).mean() / self.alpha for n in norms]).mean()


class Entry(torch.nn.Module):
    """A forward of its own for the naive mode. Compiled graphs live on the outermost forward's code and
    Dynamo does not guard on submodule hooks, so compiling the hooked SiT directly would reuse the
    baseline's hook-free SiT.forward graph (the library's ANM has its own forward and raises if a
    stale graph hides its hooks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def build(mode: str, template: SiT, compile_model: bool, backend: str = "inductor", alpha: float = 70.0):
    model = copy.deepcopy(template)
    regulariser = None
    if mode == "anm":
        model = regulariser = anm.ANM(model, alpha=alpha, warmup=0, nonfinite="propagate")
    elif mode == "naive":
        regulariser = NaiveANM(model)
        model = Entry(model)
    fused = template.pos_embed.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=fused)
    runner = torch.compile(model, backend=backend) if compile_model else model
    return runner, regulariser, opt


def train_step(runner, regulariser, opt, batch, precision: str) -> torch.Tensor:
    x1, noise, t, y = batch
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise  # linear path, t=1 is data
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred = runner(xt, t, y)
    loss = F.mse_loss(pred.float(), x1 - noise)
    if regulariser is not None:
        loss = loss + regulariser.loss()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def saved_for_backward_mib(runner, regulariser, batch, precision: str) -> float:
    """Bytes autograd keeps for backward in one forward (distinct storages), in MiB."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x1, noise, t, y = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise
        with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = runner(xt, t, y)
        loss = F.mse_loss(pred.float(), x1 - noise)
        if regulariser is not None:
            loss = loss + regulariser.loss()
    del loss
    return sum(storages.values()) / 2**20


def minor_page_faults() -> int | None:
    """Page faults of this process so far. On CPU they are a hidden cost of fresh allocations: glibc's
    malloc serves large tensors from new pages whenever its adaptive mmap/trim thresholds say so, and a
    mode that allocates differently can move every other op's faults too (see docs/benchmarks.md)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


# glibc settings that keep freed memory in the process, so steady-state steps take no page faults.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_TOP_PAD_": "268435456"}
MALLOC_ENV = (*TUNED_MALLOC, "LD_PRELOAD")


def bench_case(name: str, precision: str, compile_model: bool, args, device, results: ResultFile | None = None
               ) -> list[dict]:
    model_kwargs, batch_size = CONFIGS[name]
    batch_size = args.batch_size or batch_size
    torch.manual_seed(0)
    template = SiT(**model_kwargs, in_channels=4, num_classes=1000, learn_sigma=False).to(device)
    # Leave adaLN-Zero's identity start so that updates and ANM gradients are non-zero, as mid-training.
    for block in template.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    gen = torch.Generator(device).manual_seed(0)
    size = model_kwargs["input_size"]
    batch = (
        torch.randn(batch_size, 4, size, size, device=device, generator=gen),
        torch.randn(batch_size, 4, size, size, device=device, generator=gen),
        torch.rand(batch_size, device=device, generator=gen),
        torch.randint(0, 1000, (batch_size,), device=device, generator=gen),
    )
    names = tuple(mode for mode in MODES if mode in args.modes)  # in MODES order: baseline first
    case = f"{name} {precision} compile={compile_model}"
    if results is not None:
        results.stage(f"{case}: build, warm-up")
    modes = {mode: build(mode, template, compile_model, alpha=args.anm_alpha) for mode in names}
    memory = {mode: saved_for_backward_mib(*modes[mode][:2], batch, precision) for mode in names}
    for mode in names:  # warm-up: compilation, allocator, autotuning
        for _ in range(args.warmup):
            train_step(*modes[mode], batch, precision)
    sync(device)
    times = {mode: [] for mode in names}
    # Process CPU time per step: on a CPU shared with other jobs it barely moves when wall time does, so
    # with --threads 1 it is the steadier measure of the work each mode does (on CUDA: host time only).
    cpu_times = {mode: [] for mode in names}
    peaks = {mode: [] for mode in names}
    faults = {mode: [] for mode in names}
    rows = []
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]  # rotate who goes first
        for mode in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            faults_start = minor_page_faults()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                train_step(*modes[mode], batch, precision)
            sync(device)
            times[mode].append((time.perf_counter() - start) / args.steps * 1e3)
            cpu_times[mode].append((time.process_time() - cpu_start) / args.steps * 1e3)
            if faults_start is not None:
                faults[mode].append((minor_page_faults() - faults_start) / args.steps)
            if device.type == "cuda":
                peaks[mode].append(torch.cuda.max_memory_allocated() / 2**30)
        rows = summarize(name, batch_size, precision, compile_model, names, times, cpu_times, memory, peaks, faults)
        if results is not None:  # every repeat: a run stopped by a time limit keeps the repeats it finished
            results.stage(f"{case}: repeat {repeat + 1}/{args.repeats}")
            for row in rows:
                results.row((case, row["mode"]), row)
    return rows


def summarize(name, batch_size, precision, compile_model, names, times, cpu_times, memory, peaks, faults
              ) -> list[dict]:
    """The rows of one case from the blocks timed so far (medians and quartiles per mode)."""
    rows = []
    base = statistics.median(times["baseline"])
    cpu_base = statistics.median(cpu_times["baseline"])
    for mode in names:
        median = statistics.median(times[mode])
        q = statistics.quantiles(times[mode], n=4) if len(times[mode]) > 1 else [median, median, median]
        rows.append(
            dict(
                config=name, batch=batch_size, precision=precision, compile=compile_model, mode=mode,
                ms_median=median, ms_q1=q[0], ms_q3=q[2], ms_all=times[mode],
                overhead_pct=(median / base - 1) * 100,
                cpu_ms_median=statistics.median(cpu_times[mode]),
                cpu_overhead_pct=(statistics.median(cpu_times[mode]) / cpu_base - 1) * 100,
                saved_mib=memory[mode], saved_extra_mib=memory[mode] - memory["baseline"],
                peak_gib=max(peaks[mode]) if peaks[mode] else None,
                page_faults_per_step=statistics.median(faults[mode]) if faults[mode] else None,
                repeats_done=len(times[mode]),
            )
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    header = (
        f"{'config':<6} {'bs':>4} {'prec':<5} {'compile':<7} {'mode':<9} {'ms/step':>9} {'IQR':>15} {'overhead':>9} "
        f"{'cpu ms':>8} {'cpu ovh':>8} {'saved MiB':>10} {'+saved':>8} {'peak GiB':>9} {'faults':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        faults = f"{r['page_faults_per_step']:.0f}" if r["page_faults_per_step"] is not None else "-"
        print(
            f"{r['config']:<6} {r['batch']:>4} {r['precision']:<5} {str(r['compile']):<7} {r['mode']:<9} "
            f"{r['ms_median']:>9.2f} {r['ms_q1']:>7.2f}-{r['ms_q3']:<7.2f} {r['overhead_pct']:>+8.1f}% "
            f"{r['cpu_ms_median']:>8.2f} {r['cpu_overhead_pct']:>+7.1f}% "
            f"{r['saved_mib']:>10.1f} {r['saved_extra_mib']:>+8.1f} {peak:>9} {faults:>7}"
        )


def main(args: argparse.Namespace) -> list[dict]:
    args.modes = ["baseline", *(mode for mode in args.modes if mode != "baseline")]
    if args.tuned_malloc and any(os.environ.get(name) != value for name, value in TUNED_MALLOC.items()):
        # glibc reads these once, at start-up: run this script again in a process that has them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    device = pick_device(args.device, args.threads)
    configs = args.configs or (["XL/2", "B/4"] if device.type == "cuda" else ["tiny"])
    malloc_env = {name: os.environ[name] for name in MALLOC_ENV if name in os.environ}
    meta = run_metadata(device, steps=args.steps, repeats=args.repeats, malloc_env=malloc_env)
    results = ResultFile(args.out, meta)  # on disk from the first row on (see report.py)
    rows = []
    for name in configs:
        for precision in args.precisions:
            for compile_model in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                rows.extend(bench_case(name, precision, compile_model, args, device, results))
                print(f"done {name} {precision} compile={compile_model}", flush=True)
    results.finish()
    out = results.path
    print_table(rows)
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"malloc env {malloc_env or 'default'}; faults = minor page faults per step; JSON: {out}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="?", const="both", default="off", choices=["off", "on", "both"],
                        help="time torch.compile'd models too (--compile = both), or only them (--compile on)")
    parser.add_argument("--anm-alpha", type=float, default=70.0,
                        help="the anm mode's alpha: 70 keeps the hinge active on every token here (worst case); "
                             "1e-6 leaves it inactive everywhere, as once every norm is past alpha")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="modes to time; baseline always runs (the others are relative to it)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed blocks per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="rerun in a process whose glibc malloc keeps freed memory (no page-fault churn)")
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
