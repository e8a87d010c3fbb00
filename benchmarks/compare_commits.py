"""The library's hook cost at two commits, paired in one process: which commit's ANM costs more per step?

overhead.py compares ANM with no ANM inside one process; comparing two of its runs made at two commits
compares two processes, whose memory placement alone can move a CPU step by a few percent. Here the
`anm/` package of each commit is extracted (`git archive`) under a name of its own and imported side by
side; each gets its own copy of the same tiny SiT (overhead.py's "tiny" config, fp32, adaLN perturbed as
there), and the modes — baseline, a second baseline ("control", the noise floor) and ANM at each commit
— are timed interleaved, rotating who goes first. Per repeat, each mode's CPU time per step is divided by
that repeat's baseline (paired), and the medians of those ratios are reported.

    python benchmarks/compare_commits.py 6ceb113 HEAD --steps 5 --repeats 40

Then ``loss()`` alone, per commit (``--loss-calls``; 0 skips it): its CPU time per call, after a training
forward of the same SiT, interleaved between the commits, and the number of aten ops one call dispatches
(counted with a ``TorchDispatchMode``). On a GPU each of those ops is a kernel launch or an allocation on
the step's critical path; the count does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "sit"))
from modeling.models import SiT  # noqa: E402
from report import write_json  # noqa: E402


def import_commit(commit: str, into: Path) -> object:
    """The `anm` package of `commit`, imported as `anm_<commit>` (its imports are relative)."""
    name = "anm_" + "".join(ch if ch.isalnum() else "_" for ch in commit)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "anm"], check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into / name, filter="data")
    (into / name / "anm").rename(into / name / name)
    sys.path.insert(0, str(into / name))
    return importlib.import_module(name)


def tiny_sit() -> SiT:
    torch.manual_seed(0)
    model = SiT(input_size=16, patch_size=2, hidden_size=128, depth=6, num_heads=4, in_channels=4,
                num_classes=1000, learn_sigma=False)
    for block in model.blocks:  # as overhead.py: non-zero updates and ANM gradients, as mid-training
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    return model


def train_step(model, regulariser, opt, batch) -> None:
    x1, noise, t, y = batch
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise
    loss = F.mse_loss(model(xt, t, y).float(), x1 - noise)
    if regulariser is not None:
        loss = loss + regulariser.loss()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def loss_call_costs(libraries: dict, template: SiT, batch: tuple, calls: int) -> dict:
    """Per commit: median CPU µs of one loss() call (blocks of 20 calls, interleaved) and its aten ops."""
    x1, noise, t, y = batch
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise
    wrappers = {commit: lib.ANM(copy.deepcopy(template), alpha=70.0, warmup=0) for commit, lib in libraries.items()}
    micros = {commit: [] for commit in wrappers}
    for block in range(max(1, calls // 20)):
        for commit in list(wrappers)[block % len(wrappers):] + list(wrappers)[: block % len(wrappers)]:
            wrapper, spent = wrappers[commit], 0.0
            for _ in range(20):
                wrapper(xt, t, y)  # a training forward: what loss() consumes (not timed)
                start = time.process_time()
                wrapper.loss()
                spent += time.process_time() - start
            micros[commit].append(spent / 20 * 1e6)
    ops = {}
    for commit, wrapper in wrappers.items():
        wrapper(xt, t, y)
        with _CountOps() as counter:
            wrapper.loss()
        ops[commit] = counter.ops
    return dict(cpu_us_median={c: statistics.median(m) for c, m in micros.items()}, cpu_us=micros, aten_ops=ops)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    template = tiny_sit()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 4, 16, 16, generator=gen), torch.randn(32, 4, 16, 16, generator=gen),
             torch.rand(32, generator=gen), torch.randint(0, 1000, (32,), generator=gen))
    with tempfile.TemporaryDirectory() as tmp:
        libraries = {commit: import_commit(commit, Path(tmp)) for commit in dict.fromkeys(args.commits)}
        modes = {}
        for name in ("baseline", "control", *(f"anm@{commit}" for commit in libraries)):
            model = copy.deepcopy(template)
            regulariser = None
            if name.startswith("anm@"):
                model = regulariser = libraries[name[4:]].ANM(model, alpha=70.0, warmup=0, nonfinite="propagate")
            modes[name] = (model, regulariser, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0))
        for mode in modes.values():
            for _ in range(args.warmup):
                train_step(*mode, batch)
        names = list(modes)
        cpu_ms = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                start = time.process_time()
                for _ in range(args.steps):
                    train_step(*modes[name], batch)
                cpu_ms[name].append((time.process_time() - start) / args.steps * 1e3)
    paired = {
        name: statistics.median(a / b - 1 for a, b in zip(cpu_ms[name], cpu_ms["baseline"], strict=True)) * 100
        for name in names
    }
    first, last = (f"anm@{commit}" for commit in (args.commits[0], args.commits[-1]))
    diffs = [(a - b) / c * 100 for a, b, c in zip(cpu_ms[last], cpu_ms[first], cpu_ms["baseline"], strict=True)]
    result = dict(
        commits=args.commits, steps=args.steps, repeats=args.repeats, threads=args.threads, torch=torch.__version__,
        cpu_ms=cpu_ms, paired_overhead_pct=paired,
        last_minus_first_pct=dict(median=statistics.median(diffs), mean=statistics.mean(diffs),
                                  stdev=statistics.stdev(diffs), last_costlier_in=sum(d > 0 for d in diffs)),
    )
    for name in names:
        print(f"{name:<16} cpu ms/step {statistics.median(cpu_ms[name]):8.2f} paired vs baseline {paired[name]:+6.2f}%")
    spread = result["last_minus_first_pct"]
    print(f"{last} - {first}: median {spread['median']:+.2f}% of a baseline step (sd {spread['stdev']:.2f}; "
          f"costlier in {spread['last_costlier_in']} of {args.repeats} repeats)")
    if args.loss_calls > 0:
        # The packages stay imported after their extracted files are gone (every module loads at import).
        result["loss_call"] = loss_call_costs(libraries, template, batch, args.loss_calls)
        for commit in libraries:
            print(f"loss() at {commit:<10} cpu µs/call {result['loss_call']['cpu_us_median'][commit]:8.1f}  "
                  f"aten ops/call {result['loss_call']['aten_ops'][commit]}")
    print(f"JSON: {write_json(args.out, result)}")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commits", nargs=2, help="two commits (or branches) whose anm/ to compare")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved timed blocks per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss-calls", type=int, default=200, help="loss() calls timed per commit; 0 = skip")
    parser.add_argument("--out", default="benchmarks/results/compare_commits.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
