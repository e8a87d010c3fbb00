"""Does ANM speed up flow-matching training? The seed supplement's ablation (Tab. 3 / Tab. 4) at small scale.

One command trains, for every (dataset, seed), a baseline SiT and one ANM arm per grid point, all in
lockstep in one process (ablation/lockstep.py): every arm starts from the same initial weights and sees the
same batches, times and noise. It writes per-arm curves (held-out flow-matching loss on fixed noise and a
fixed t grid, per-layer norms, fraction of tokens below alpha), the steps each arm needs to reach the
baseline's final held-out loss, tables shaped like the supplement's Tab. 3 / Tab. 4, and plots.

    python examples/sit/ablate.py --budget cpu     # 2 workers on 2 CPU cores (see docs/results.md)
    python examples/sit/ablate.py --budget gpu     # one GPU, sized for ~10 min on an H100 (not timed yet)
    python examples/sit/ablate.py --budget smoke   # seconds; what the tests run
    python examples/sit/ablate.py --budget cpu --search dispersive --datasets fashion-mnist --lr 2e-4
                                                   # the positive-control search, at one changed setting
    python examples/sit/ablate.py --budget cpu --search repa --datasets fashion-mnist --repa-encoder stand-in
                                                   # REPA's arms, aligned to a stand-in encoder trained here

Results go to results/ablate/<budget>/: runs/<dataset>/seed<k>/<arm>.json (cached: a rerun only trains
what is missing; the encoder is part of the REPA arms' key alone, so a baseline serves searches with and
without --repa-encoder), runs.csv, summary.json, tables.md, curves.png, grids.png, norms.png.

The arms and budgets are in ablation/arms.py; alpha is run both raw and width-matched (modeling/alpha_scaling.py).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, replace

import torch
from ablation.arms import ARM_SETS, BUDGETS, DATASETS, Arm, Budget, select_arms, set_arm_names
from ablation.lockstep import Job, train_group
from ablation.plots import write_plots
from ablation.records import load_runs, read_record
from ablation.report import summarize, write_csv, write_tables
from ablation.stand_in import stand_in_path, train_stand_in
from regularizers.repa import load_encoder
from runtime.atomic import atomic_write
from runtime.checks import check_device, check_writable_path
from runtime.cli import UsageError, run

POSITIVE_INT_FLAGS = ("steps", "eval_every", "workers", "hidden", "depth", "heads", "batch")
MODEL_FLAGS = ("hidden", "depth", "heads", "batch", "lr")  # model and optimizer overrides: part of the cache key


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides (run size, model width/depth/heads, batch, lr)."""
    budget = BUDGETS[args.budget]
    overrides = {key: getattr(args, key) for key in ("steps", "eval_every", "workers", *MODEL_FLAGS)
                 if getattr(args, key) is not None}
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.datasets is not None:
        overrides["datasets"] = tuple(args.datasets)
    return replace(budget, **overrides)


def missing_jobs(budget: Budget, arms: list[Arm], out_dir: str, device: str) -> list[Job]:
    """One job per (dataset, seed) holding only the arms not cached yet; seeds outermost, so that a run cut
    short still has complete seeds for both datasets."""
    jobs = []
    for seed in budget.seeds:
        for dataset in budget.datasets:
            missing = tuple(a for a in arms if read_record(out_dir, dataset, seed, a.name, budget, a.repa) is None)
            if missing:
                jobs.append(Job(budget, dataset, seed, missing, out_dir, device))
    return jobs


def train_jobs(jobs: list[Job], workers: int) -> None:
    """Train every job, ``workers`` at a time (forked processes) or in this process."""
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(train_group, jobs):
                pass
    else:
        for job in jobs:
            train_group(job)


def group_wall_times(runs: dict, seeds: tuple[int, ...]) -> dict[str, float]:
    """Wall time of each (dataset, seed) group: every arm of a group stores it; read the first arm's."""
    return {f"{dataset}/seed{seed}": first_arm[seed]["group_wall_s"]
            for dataset, first_arm in ((d, next(iter(runs[d].values()))) for d in runs)
            for seed in seeds if seed in first_arm}


def check_args(args: argparse.Namespace) -> None:
    """UsageError for out-of-range numbers (before anything is created)."""
    for key in POSITIVE_INT_FLAGS:
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seeds is not None and any(not 0 <= seed < 2**32 for seed in args.seeds):
        raise UsageError(f"--seeds must be in [0, 2**32), got {args.seeds}")
    if args.search is not None and args.arms:
        raise UsageError("--search and --arms both choose the arms: give one")


def arms_from_args(args: argparse.Namespace, budget: Budget) -> list[Arm]:
    """The arms of --arms, else of the arm set --search, else the budget's (UsageError for unknown names)."""
    try:
        names = set_arm_names(args.search) if args.search is not None else args.arms or budget.arms
        return select_arms(names)
    except ValueError as error:
        raise UsageError(str(error)) from error


def check_repa_flags(args: argparse.Namespace, arms: list[Arm]) -> None:
    """UsageError, before anything is created, when the REPA arms and --repa-encoder disagree or its folder holds
    no DINOv2."""
    wanted = [arm.name for arm in arms if arm.repa]
    if not wanted and args.repa_encoder is not None:
        raise UsageError("--repa-encoder would be ignored: no REPA arm was chosen (--search repa)")
    if wanted and args.repa_encoder is None:
        raise UsageError(f"the arms {wanted} need --repa-encoder PATH (a local transformers DINOv2 folder) or "
                         "--repa-encoder stand-in (a small encoder trained on Fashion-MNIST here)")
    if wanted and args.repa_encoder != "stand-in":
        load_encoder(os.path.abspath(args.repa_encoder))  # one line if it is no DINOv2 folder


def with_repa_encoder(args: argparse.Namespace, budget: Budget, out_dir: str) -> Budget:
    """The budget with the REPA arms' encoder (after check_repa_flags): --repa-encoder's folder, or the stand-in
    this ablation trains once into <out>/stand_in_encoder (ablation/stand_in.py)."""
    if args.repa_encoder is None:
        return budget
    if args.repa_encoder != "stand-in":
        return replace(budget, repa_encoder=os.path.abspath(args.repa_encoder))
    print(f"[ablate] the stand-in encoder (ablation/stand_in.py) -> {stand_in_path(out_dir)}", flush=True)
    return replace(budget, repa_encoder=train_stand_in(os.path.abspath(stand_in_path(out_dir)), budget.image_size))


def encoder_record(budget: Budget) -> dict | None:
    """What summary.json says of the REPA arms' encoder: its folder and, for the stand-in, how it was trained."""
    if budget.repa_encoder is None:
        return None
    record = os.path.join(budget.repa_encoder, "stand_in.json")
    stand_in = json.loads(open(record).read()) if os.path.exists(record) else None
    return dict(path=budget.repa_encoder, stand_in=stand_in)


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    budget = budget_from_args(args)
    if budget.hidden % budget.heads:
        raise UsageError(f"the width {budget.hidden} must be a multiple of the {budget.heads} heads "
                         "(--hidden, --heads)")
    arms = arms_from_args(args, budget)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    out_dir = args.out or os.path.join("results", "ablate", budget.name)
    check_writable_path(out_dir, flag="--out")
    check_repa_flags(args, arms)
    os.makedirs(out_dir, exist_ok=True)
    budget = with_repa_encoder(args, budget, out_dir)
    start = time.time()

    jobs = missing_jobs(budget, arms, out_dir, device)
    print(f"[ablate] {len(arms)} arms, {len(jobs)} (dataset, seed) groups to train -> {out_dir}", flush=True)
    train_jobs(jobs, min(budget.workers, len(jobs)) if device == "cpu" else 1)

    runs = load_runs(out_dir, budget, arms)
    summary = summarize(runs, arms)
    meta = dict(budget=budget.name, config=budget.cache_key(), device=device, torch=torch.__version__,
                arms=[asdict(a) for a in arms], wall_s_this_call=time.time() - start,
                group_wall_s=group_wall_times(runs, budget.seeds), repa_encoder=encoder_record(budget),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    with atomic_write(os.path.join(out_dir, "summary.json")) as f:
        f.write(json.dumps(dict(meta=meta, summary=summary), indent=1, default=str).encode())
    write_csv(runs, summary, os.path.join(out_dir, "runs.csv"))
    write_tables(summary, arms, budget, os.path.join(out_dir, "tables.md"))
    if not args.no_plots and runs:
        write_plots(runs, summary, out_dir)
    print(f"[ablate] done in {time.time() - start:.0f}s: {out_dir}/tables.md", flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ANM ablation (supplement Tab. 3/4 + form study) at small scale.")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--out", type=str, default=None, help="default: results/ablate/<budget>")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's training steps")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
    parser.add_argument("--arms", nargs="+", default=None, help="only these arm names (default: all)")
    parser.add_argument("--search", choices=sorted(ARM_SETS), default=None,
                        help="the baseline and the arms of this search instead (ablation/arms.py ARM_SETS): "
                             "'dispersive' = Dispersive Loss with one of weight, temperature, distance, block "
                             "changed; 'dispersive-cos' = the same changes from its cosine form")
    parser.add_argument("--hidden", type=int, default=None, help="override the budget's model width D")
    parser.add_argument("--depth", type=int, default=None, help="override the budget's number of blocks")
    parser.add_argument("--heads", type=int, default=None, help="override the budget's attention heads")
    parser.add_argument("--batch", type=int, default=None, help="override the budget's training batch size")
    parser.add_argument("--lr", type=float, default=None, help="override the budget's AdamW learning rate")
    parser.add_argument("--workers", type=int, default=None, help="parallel (dataset, seed) groups on CPU")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repa-encoder", type=str, default=None, metavar="PATH|stand-in",
                        help="the REPA arms' encoder: a local transformers DINOv2 folder, or 'stand-in' for a small "
                             "encoder trained on Fashion-MNIST labels here (ablation/stand_in.py)")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
