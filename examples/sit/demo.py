"""
The whole story on one machine, no GPU and no download needed: train a tiny SiT on procedural sinusoid
images twice from the same seed, without and with ANM, sample both, and compare.

    python examples/sit/demo.py                       # CPU (see README.md for the time it takes)
    python examples/sit/demo.py --scale gpu           # a bigger model, longer, on a GPU
    python examples/sit/demo.py --steps 50 --out /tmp/demo   # smoke run

Writes to --out:
  samples.png     real training images | baseline samples | ANM samples, side by side
  norms.png       mean ||block update|| per block over training, both runs, with ANM's alpha as a line
  loss.png        training flow-matching loss and the loss on the fixed evaluation set, both runs
  comparison.md   the comparison table and the speed-up in steps; metrics.json: every number, the settings and
                  the time taken
  speedup/        compare_runs.py's comparison of the two runs (speedup.json, speedup.md, curves.png)
  runs/{baseline,anm}/   each run's checkpoints and log.csv (train.py's layout; a rerun replaces them)

Both runs are measured the same way (evaluation/heldout.py) at every saved checkpoint: FM loss and each block's
residual-update norm on a fixed evaluation set (the training images with fixed noise and a uniform t
grid); at the end also the FM loss on fresh sinusoids neither run saw. On CPU the training set is small
enough for the tiny model to learn it by heart within the run, which is what makes its samples clean.
Samples are judged by the sinusoid metric (evaluation/sinusoid_metric.py), next to its real-vs-real noise floor.
This demo shows the machinery; one seed of a tiny model is not evidence that ANM helps or hurts.

ANM's alpha is an l2 norm, so it depends on the width D: the demo keeps the paper's per-feature RMS,
alpha = 70 * sqrt(D / 1152) (modeling/alpha_scaling.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from glob import glob

import numpy as np
import torch
from data.sinusoids import SinusoidDataset, make_sinusoids
from evaluation.demo_report import comparison_rows, plot_losses, plot_norms, plot_samples, write_table
from evaluation.heldout import HeldoutSet, make_heldout, measure
from evaluation.sinusoid_metric import SinusoidMetric
from evaluation.speedup_report import compare_run_folders
from modeling.alpha_scaling import PAPER_ALPHA, PAPER_LAMBDA, matched_alpha
from modeling.generation import generate, make_sample_fn
from modeling.loading import load_model
from modeling.transport import create_transport
from modeling.vae import decode_to_uint8
from runtime.atomic import atomic_write
from runtime.checks import check_writable_path
from runtime.cli import HelpFormatter, UsageError, run

EVAL_SEED = 12345  # the fixed noise of the evaluation set
HELDOUT_SEED = 2_000_003  # fresh sinusoids, drawn apart from the training set's per-item seeds
METRIC_SEED = 777  # the metric's real reference sets
LABELS = {"baseline": "baseline", "anm": "ANM"}
# The speed-up in steps is read from the runs' log.csv, as compare_runs.py reads any run. The runs log no
# held-out loss (--eval-every 0): train.py's held-out set for sinusoids is fresh images, which a model that
# learns its 32 training images by heart does not learn. The training FM loss is the quantity they minimise.
SPEEDUP_METRIC = "fm_loss"


@dataclass(frozen=True)
class Scale:
    """Data, model and run size of the demo; every field is a train.py flag or a sampling setting."""

    image_size: int
    model: str  # SiT-<size>/<patch>
    hidden_size: int
    depth: int
    num_heads: int
    data_size: int  # training images (a finite set, shuffled every epoch)
    batch: int
    steps: int
    lr: float
    ema_decay: float
    num_samples: int  # samples of each run for the metric
    sample_steps: int  # Heun steps
    eval_points: int  # checkpoints measured on the held-out set over training
    eval_samples: int  # held-out images
    num_workers: int = 0


SCALES = {
    # A small training set that the tiny model can learn to reproduce within minutes on a CPU (it memorises
    # it): with unlimited data, runs this short give blocky noise. lr 3e-3 and a short-horizon EMA suit
    # such short runs (the paper's 1e-4 and 0.9999 are for 400k steps).
    "cpu": Scale(image_size=8, model="SiT-T/2", hidden_size=64, depth=4, num_heads=4, data_size=32, batch=32,
                 steps=5000, lr=3e-3, ema_decay=0.995, num_samples=256, sample_steps=16, eval_points=10,
                 eval_samples=256),
    # Not timed on a GPU yet. Every eval point keeps a checkpoint (weights, EMA, optimizer): ~80 MB here.
    "gpu": Scale(image_size=16, model="SiT-S/2", hidden_size=256, depth=6, num_heads=4, data_size=100_000,
                 batch=128, steps=10_000, lr=2e-4, ema_decay=0.9995, num_samples=2048, sample_steps=32,
                 eval_points=10, eval_samples=1024, num_workers=4),
}


@dataclass(frozen=True)
class Training:
    """One of the demo's two trainings: its name and the ANM flags handed to train.py."""

    name: str
    anm_flags: tuple[str, ...]


#################################################################################
#                                   Training                                    #
#################################################################################


def train_argv(training: Training, scale: Scale, out: str, seed: int, position: int) -> list[str]:
    """train.py's command line for one run."""
    every = max(1, scale.steps // scale.eval_points)
    argv = [
        "--data", "sinusoid", "--image-size", scale.image_size, "--data-size", scale.data_size,
        "--model", scale.model, "--hidden-size", scale.hidden_size, "--depth", scale.depth,
        "--num-heads", scale.num_heads, "--class-dropout-prob", 0, "--global-batch-size", scale.batch,
        "--lr", scale.lr, "--ema-decay", scale.ema_decay, "--num-workers", scale.num_workers,
        "--results-dir", os.path.join(out, "runs"), "--exp-name", training.name, "--global-seed", seed,
        "--max-steps", scale.steps, "--log-every", every, "--ckpt-every", every, "--eval-every", 0,
        "--sample-every", 0, "--no-console-log", "--progress-position", position, *training.anm_flags,
    ]
    return [str(arg) for arg in argv]


TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def start_training(argv: list[str], threads: int | None) -> subprocess.Popen:
    """train.py with ``argv`` in a child process, with ``threads`` torch threads (default: torch's)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, TRAIN_SCRIPT, *argv], env=env)


def finished_run(name: str, process: subprocess.Popen, out: str) -> dict:
    """Wait for one run; its folder, log.csv and last checkpoint. A failed run ends the demo (its own error
    is on the console above)."""
    code = process.wait()
    if code != 0:
        raise UsageError(f"the {name} run failed (train.py exit code {code}): see its error above")
    experiment_dir = os.path.join(out, "runs", name)
    return dict(experiment_dir=experiment_dir, log_csv=os.path.join(experiment_dir, "log.csv"),
                checkpoint=checkpoints(experiment_dir)[-1])


def train_both(trainings: list[Training], scale: Scale, args: argparse.Namespace) -> dict[str, dict]:
    """Train each of ``trainings`` with train.py, at the same time in separate processes with --parallel
    (each with ``args.threads`` threads); returns each run's folder, log.csv and last checkpoint by name."""
    jobs = {t.name: train_argv(t, scale, args.out, args.seed, i) for i, t in enumerate(trainings)}
    if not args.parallel:
        return {name: finished_run(name, start_training(argv, args.threads), args.out) for name, argv in jobs.items()}
    processes = {name: start_training(argv, args.threads) for name, argv in jobs.items()}
    try:
        return {name: finished_run(name, process, args.out) for name, process in processes.items()}
    finally:
        for process in processes.values():  # one run failed: do not leave the other training on
            if process.poll() is None:
                process.terminate()
                process.wait()


#################################################################################
#                                  Measuring                                    #
#################################################################################


def compare_both(trained: dict[str, dict], out: str) -> dict:
    """compare_runs.py's comparison of the ANM run against the baseline, written to <out>/speedup/; returns
    the metric, the folder and both directions' factors at the final logged steps."""
    result = compare_run_folders([trained["anm"]["experiment_dir"]], [trained["baseline"]["experiment_dir"]],
                                 SPEEDUP_METRIC, os.path.join(out, "speedup"), overwrite=True)
    return dict(metric=SPEEDUP_METRIC, folder="speedup", summary=result["arms"][0]["summary"])


def checkpoints(experiment_dir: str) -> list[str]:
    """A run's checkpoints in step order."""
    return sorted(glob(os.path.join(experiment_dir, "checkpoints", "*.pt")))


def evaluation_sets(scale: Scale, seed: int, device: torch.device) -> tuple[HeldoutSet, HeldoutSet, np.ndarray]:
    """The fixed evaluation set (training images, repeated up to ``eval_samples``, with fixed noise and t),
    a held-out set of fresh sinusoids the runs never saw, and the real images of the left grid (uint8)."""
    train_set = SinusoidDataset(scale.data_size, scale.image_size, seed=seed)  # what train.py trains on
    images = torch.stack([train_set[i % scale.data_size][0] for i in range(scale.eval_samples)])
    fresh, _ = make_sinusoids(scale.eval_samples, scale.image_size, torch.Generator().manual_seed(HELDOUT_SEED))
    real = decode_to_uint8(images[: min(64, scale.data_size)])
    return make_heldout(images, seed=EVAL_SEED).to(device), make_heldout(fresh, seed=HELDOUT_SEED).to(device), real


def curves(experiment_dir: str, evaluation: HeldoutSet, transport, device: torch.device) -> dict[str, list]:
    """FM loss (raw and EMA weights) and mean update norm per block on ``evaluation`` at every checkpoint."""
    series: dict[str, list] = dict(step=[], fm_loss=[], fm_loss_ema=[], update_norms=[])
    for path in checkpoints(experiment_dir):
        raw, info = load_model(path, device, use_ema=False)
        ema, _ = load_model(path, device, use_ema=True)
        result = measure(raw, transport, evaluation, sites=("update",))
        series["step"].append(info["step"])
        series["fm_loss"].append(result.fm_loss)
        series["fm_loss_ema"].append(measure(ema, transport, evaluation).fm_loss)
        series["update_norms"].append(result.mean_per_block("update"))
    return series


def training_log(log_csv: str) -> dict[str, list]:
    """(step, FM loss) of the training log, and ANM's own per-block norms on the training batches."""
    series: dict[str, list] = dict(step=[], fm_loss=[], anm_norms=[])
    with open(log_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("fm_loss"):
                continue
            series["step"].append(int(row["step"]))
            series["fm_loss"].append(float(row["fm_loss"]))
            norms = [float(v) for k, v in row.items() if k.startswith("anm/norm/") and v]
            series["anm_norms"].append(norms)
    return series


def final_norms(checkpoint: str, evaluation: HeldoutSet, transport, alpha: float, device: torch.device) -> dict:
    """Per-token update norms of the final raw weights: mean per block, overall mean, share below alpha."""
    raw, _ = load_model(checkpoint, device, use_ema=False)
    norms = measure(raw, transport, evaluation, sites=("update",)).norms["update"]
    return dict(mean=norms.mean().item(), per_block=norms.mean(dim=(1, 2)).tolist(),
                frac_below_alpha=(norms < alpha).float().mean().item())


def sample(checkpoint: str, scale: Scale, seed: int, device: torch.device) -> np.ndarray:
    """uint8 samples of a run's final EMA weights: Heun ODE from noise drawn from ``seed`` (same for both)."""
    ema, _ = load_model(checkpoint, device, use_ema=True)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(scale.num_samples, 3, scale.image_size, scale.image_size, generator=gen).to(device)
    y = torch.zeros(scale.num_samples, dtype=torch.long, device=device)
    sample_fn = make_sample_fn(create_transport(), "ode", "heun", scale.sample_steps)
    return decode_to_uint8(torch.cat([generate(ema, part, y[: len(part)], sample_fn) for part in z.split(256)]))


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the training workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


#################################################################################
#                                     Main                                      #
#################################################################################


DEMO_MARKER = ".demo-output"  # only a folder carrying it has runs/ that a rerun may replace


def check_args(args: argparse.Namespace) -> Scale:
    """The scale with the command line's overrides; UsageError before anything is written."""
    for flag in ("steps", "num_samples", "eval_samples", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    check_writable_path(args.out, flag="--out")
    overrides = {k: getattr(args, k) for k in ("steps", "num_samples", "eval_samples") if getattr(args, k)}
    scale = replace(SCALES[args.scale], **overrides)
    return replace(scale, eval_points=min(scale.eval_points, scale.steps))


def main(args: argparse.Namespace) -> dict:
    scale = check_args(args)
    marker = os.path.join(args.out, DEMO_MARKER)
    if os.path.exists(os.path.join(args.out, "runs")) and not os.path.exists(marker):
        raise UsageError(f"--out {args.out} holds a runs/ folder that demo.py did not make: choose another --out")
    os.makedirs(args.out, exist_ok=True)
    with atomic_write(marker) as f:
        f.write(b"written by examples/sit/demo.py; a rerun replaces runs/baseline and runs/anm\n")
    for name in ("baseline", "anm"):  # a rerun replaces the runs an earlier one left (stale checkpoints)
        shutil.rmtree(os.path.join(args.out, "runs", name), ignore_errors=True)
    start, cpu_start = time.time(), cpu_seconds()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.parallel = args.parallel and device.type == "cpu"
    # Tiny matmuls gain little from a second thread, and OpenMP threads that share a core slow down many-fold.
    args.threads = args.threads or (1 if device.type == "cpu" else None)
    alpha = matched_alpha(PAPER_ALPHA, scale.hidden_size)  # the paper's per-feature RMS at this width
    # The paper ramps lambda in over 2000 steps of 400k; short runs ramp over their first quarter.
    warmup = min(2000, scale.steps // 4)
    anm_config = dict(alpha=alpha, alpha_rule="70*sqrt(D/1152)", lam=PAPER_LAMBDA, warmup=warmup, site="update",
                      reduce="l2")
    print(f"SiT D={scale.hidden_size}, depth {scale.depth}, {scale.model}, {scale.image_size}px sinusoids "
          f"({scale.data_size} training images), batch {scale.batch}, {scale.steps} steps per run, on {device}")
    print(f"ANM: alpha = 70 * sqrt({scale.hidden_size}/1152) = {alpha:.2f} (per-token l2 norm of each block's "
          f"residual update; RMS {alpha / math.sqrt(scale.hidden_size):.2f} as the paper's 70 at D=1152), "
          f"lambda = {PAPER_LAMBDA:g}, warm-up {warmup} steps")
    trainings = [Training("baseline", ("--no-anm",)),
                 Training("anm", ("--anm", "--anm-alpha", f"{alpha:.6g}", "--anm-lambda", f"{PAPER_LAMBDA:g}",
                                  "--anm-warmup", str(warmup), "--anm-site", "update"))]
    trained = train_both(trainings, scale, args)
    train_wall = time.time() - start
    speedup = compare_both(trained, args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    transport = create_transport()
    evaluation, fresh, real = evaluation_sets(scale, args.seed, device)
    metric = SinusoidMetric(image_size=scale.image_size, seed=METRIC_SEED)
    results: dict = dict(config=dict(asdict(scale), scale=args.scale, seed=args.seed, anm=anm_config),
                         speedup=speedup)
    results["real_training_images_sinusoid"] = real_metric = metric(real)
    grids = {f"real training images ({len(real)})\nvalid sinusoids: {real_metric['validity']:.0%}": real}
    series = {}  # by the label the plots show
    for name, out in trained.items():
        samples = sample(out["checkpoint"], scale, args.seed, device)
        measured = series[LABELS[name]] = dict(evaluation=curves(out["experiment_dir"], evaluation, transport,
                                                                 device), train=training_log(out["log_csv"]))
        ema, _ = load_model(out["checkpoint"], device, use_ema=True)
        results[name] = dict(
            final_fm_loss=measured["train"]["fm_loss"][-1],
            train_images_fm_loss_ema=measured["evaluation"]["fm_loss_ema"][-1],
            fresh_fm_loss_ema=measure(ema, transport, fresh).fm_loss,
            update_norms=final_norms(out["checkpoint"], evaluation, transport, alpha, device),
            sinusoid=metric(samples), checkpoint=os.path.relpath(out["checkpoint"], args.out),
            curves=measured["evaluation"],
        )
        validity = results[name]["sinusoid"]["validity"]
        grids[f"{LABELS[name]} samples\nvalid sinusoids: {validity:.0%}"] = samples

    plot_samples(grids, os.path.join(args.out, "samples.png"))
    plot_norms(series, alpha, os.path.join(args.out, "norms.png"))
    plot_losses(series, os.path.join(args.out, "loss.png"))
    rows = comparison_rows(results, alpha)
    results["timing"] = dict(train_wall_s=train_wall, wall_s=time.time() - start, cpu_s=cpu_seconds() - cpu_start,
                             threads_per_run=args.threads, parallel=args.parallel, cpu_count=os.cpu_count())
    table = write_table(rows, results, os.path.join(args.out, "comparison.md"))
    with atomic_write(os.path.join(args.out, "metrics.json")) as f:
        f.write(json.dumps(results, indent=1).encode())

    print(f"\n{table}")
    t = results["timing"]
    print(f"Wrote samples.png, norms.png, loss.png, comparison.md, metrics.json, speedup/ to {args.out} "
          f"({t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU)")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu: tiny (minutes); gpu: bigger")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: per scale)")
    parser.add_argument("--out", type=str, default="demo_out", help="folder for the figures, table and runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initial weights and sampling")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: train baseline and ANM at the same time in two processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (CPU default: 1)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per run for the metric")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="images of the evaluation and held-out sets (default: per scale)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
