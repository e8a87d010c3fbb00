"""
The whole story on one machine, no GPU and no download needed: train a tiny SiT on procedural sinusoid
images twice from the same seed, without and with ANM, sample both, and compare.

    python examples/sit/demo.py                       # CPU: a few minutes on 2 cores
    python examples/sit/demo.py --scale gpu           # a bigger model, longer, on a GPU
    python examples/sit/demo.py --steps 50 --out /tmp/demo   # smoke run

Writes to --out: samples_baseline.png, samples_anm.png, loss.png (training and held-out flow-matching
loss of both runs) and metrics.json (final / held-out FM loss, and the sinusoid metric of each run's
samples next to its real-vs-real noise floor), plus runs/{baseline,anm}/ with each run's checkpoints and
log.csv. The numbers are printed as measured: this demo shows the machinery, it is not evidence that ANM
helps or hurts (one seed, a tiny model, a short horizon).

ANM's alpha is an l2 norm, so it depends on the width D: the paper's alpha=70 at D=1152 is an RMS of
70/sqrt(1152) = 2.06 per feature. The demo keeps that RMS: alpha = 70 * sqrt(D / 1152).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import train
from ablate import PAPER_ALPHA, matched_alpha
from data import make_sinusoids
from sample import decode_to_uint8, generate, load_model, make_sample_fn, save_grid
from sinusoid_metric import SinusoidMetric
from transport import create_transport

import anm

# Per scale: data, model, batch, default steps per run, samples for the metric, Heun steps, EMA decay.
# lr 2e-4 (the paper's 1e-4 is for 400k-step runs) and a short-horizon EMA suit these short runs.
SCALES = {
    "cpu": dict(image_size=16, model="SiT-T/2", hidden_size=64, depth=4, num_heads=4, batch=64,
                steps=2000, num_samples=256, sample_steps=16, ema_decay=0.99, lr=2e-4, num_workers=0),
    "gpu": dict(image_size=32, model="SiT-S/2", hidden_size=384, depth=12, num_heads=6, batch=128,
                steps=10_000, num_samples=2048, sample_steps=50, ema_decay=0.9995, lr=2e-4, num_workers=4),
}


def run_training(name: str, cfg: dict, args: argparse.Namespace, anm_flags: list[str], position: int = 0,
                 threads: int | None = None) -> dict:
    """train.py's main() with the demo's settings; returns its metrics and paths (not the models), so it
    can run in a worker process."""
    if threads is not None:
        torch.set_num_threads(threads)
    steps = args.steps
    argv = [
        "--data", "sinusoid", "--image-size", cfg["image_size"], "--data-size", max(steps, 1) * cfg["batch"],
        "--model", cfg["model"], "--hidden-size", cfg["hidden_size"], "--depth", cfg["depth"],
        "--num-heads", cfg["num_heads"], "--global-batch-size", cfg["batch"], "--lr", cfg["lr"],
        "--ema-decay", cfg["ema_decay"], "--num-workers", cfg["num_workers"],
        "--results-dir", os.path.join(args.out, "runs"), "--exp-name", name, "--global-seed", args.seed,
        "--max-steps", steps, "--log-every", max(1, steps // 50), "--eval-every", max(1, steps // 10),
        "--eval-samples", args.eval_samples, "--ckpt-every", steps, "--sample-every", 0, "--no-console-log",
        "--progress-position", position, *anm_flags,
    ]
    argv = [str(arg) for arg in argv]
    start = time.time()
    out = train.main(train.parse_args(argv))
    out["wall_s"] = time.time() - start
    return {key: value for key, value in out.items() if key not in ("model", "ema")}


def read_log(path: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the training and held-out FM loss from a run's log.csv."""
    import csv

    series: dict[str, list[tuple[int, float]]] = {"fm_loss": [], "heldout_fm_loss": []}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in series:
                if row.get(key):
                    series[key].append((int(row["step"]), float(row[key])))
    return series


def plot_losses(logs: dict[str, dict], path: str) -> None:
    """Training (left) and held-out (right) FM loss of both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fm_loss", "training FM loss (mean over log interval)"),
                           (axes[1], "heldout_fm_loss", "held-out FM loss (fixed noise, uniform t grid)")):
        for name, series in logs.items():
            if series[key]:
                steps, values = zip(*series[key], strict=True)
                ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def update_norms(model: torch.nn.Module, image_size: int, alpha: float, seed: int, n: int = 256) -> dict:
    """Per-token l2 norm of each block's residual update, on fresh sinusoids noised at a uniform t grid:
    mean per block, overall mean, and the share of tokens below alpha (measured after training, the same
    way for both runs)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x1, _ = make_sinusoids(n, image_size, gen)
    x0 = torch.randn(x1.shape, generator=gen)
    t = (torch.arange(n) + 0.5) / n
    xt, _ = create_transport().plan(t, x0, x1)
    with anm.ActivationCollector(model.eval(), layers="auto", site="update") as collector:
        model(xt.to(device), t.to(device), torch.zeros(n, dtype=torch.long, device=device))
        norms = collector.norms()
    every = torch.cat([layer.reshape(-1) for layer in norms])
    return dict(mean=every.mean().item(), per_block=[layer.mean().item() for layer in norms],
                frac_below_alpha=(every < alpha).float().mean().item())


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 (N, H, W, 3) images, so that 16px samples are visible."""
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def main(args: argparse.Namespace) -> dict:
    cfg = dict(SCALES[args.scale])
    if args.steps is None:
        args.steps = cfg["steps"]
    if args.num_samples is not None:
        cfg["num_samples"] = args.num_samples
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    width = cfg["hidden_size"]
    alpha = matched_alpha(PAPER_ALPHA, width)  # the paper's per-feature RMS at this width
    # The paper ramps lambda in over 2000 steps; short runs ramp over their first quarter (a ramp over a
    # few dozen steps stalled the tiny model in trials).
    warmup = min(2000, args.steps // 4)
    print(f"SiT D={width}, depth {cfg['depth']}, {cfg['image_size']}px sinusoids, batch {cfg['batch']}, "
          f"{args.steps} steps per run, on {device}")
    print(f"ANM: alpha = 70 * sqrt({width}/1152) = {alpha:.2f} (per-token l2 norm of each block's residual "
          f"update; RMS {alpha / math.sqrt(width):.2f} as the paper's 70 at D=1152), lambda = 10, "
          f"warm-up {warmup} steps")

    start = time.time()
    jobs = {
        "baseline": ["--no-anm"],
        "anm": ["--anm", "--anm-alpha", f"{alpha:.6g}", "--anm-lambda", "10", "--anm-warmup", str(warmup),
                "--anm-site", "update"],
    }
    parallel = device.type == "cpu" and args.parallel
    # On CPU each run gets one core: tiny matmuls gain little from 2 threads, and OpenMP threads that
    # share cores with anything else slow down many-fold.
    threads = args.threads or (1 if device.type == "cpu" else None)
    if parallel:
        print(f"Training both runs at once, in 2 processes with {threads} thread(s) each")
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(run_training, name, cfg, args, flags, i, threads)
                       for i, (name, flags) in enumerate(jobs.items())}
            runs = {name: future.result() for name, future in futures.items()}
    else:
        runs = {name: run_training(name, cfg, args, flags, 0, threads) for name, flags in jobs.items()}
    if threads is not None:
        torch.set_num_threads(threads)

    # Samples: the same noise for both EMA models, Heun ODE.
    metric = SinusoidMetric(image_size=cfg["image_size"], seed=args.seed + 777)
    sample_fn = make_sample_fn(create_transport(), "ode", "heun", cfg["sample_steps"])
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(cfg["num_samples"], 3, cfg["image_size"], cfg["image_size"], generator=gen).to(device)
    y = torch.zeros(cfg["num_samples"], dtype=torch.long, device=device)
    results: dict = dict(
        config=dict(cfg, scale=args.scale, steps=args.steps, seed=args.seed,
                    anm=dict(alpha=alpha, alpha_rule="70*sqrt(D/1152)", lam=10.0, warmup=warmup,
                             site="update",
                             reduce="l2")),
    )
    logs = {}
    for name, out in runs.items():
        ema, _ = load_model(out["checkpoint"], device)  # the run's final EMA weights
        images = torch.cat([generate(ema, part, y[: len(part)], sample_fn) for part in z.split(256)])
        uint8 = decode_to_uint8(images)
        save_grid(upscale(uint8[:64], max(1, 64 // cfg["image_size"])),
                  os.path.join(args.out, f"samples_{name}.png"), nrow=8)
        sinusoid = metric(uint8)
        trained = load_model(out["checkpoint"], device, use_ema=False)[0]
        norms = update_norms(trained, cfg["image_size"], alpha, seed=args.seed + 999)
        log = logs[name] = read_log(out["log_csv"])
        results[name] = dict(
            final_fm_loss=log["fm_loss"][-1][1] if log["fm_loss"] else None,
            heldout_fm_loss=out.get("heldout_fm_loss"),
            heldout_fm_loss_ema=out.get("heldout_fm_loss_ema"),
            update_norms=norms, sinusoid=sinusoid, train_wall_s=out["wall_s"], checkpoint=out["checkpoint"],
        )
    plot_losses(logs, os.path.join(args.out, "loss.png"))
    results["wall_s"] = time.time() - start
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)

    # The comparison, as measured.
    rows = [
        ("training FM loss (last log interval)", "final_fm_loss", None),
        ("held-out FM loss", "heldout_fm_loss", None),
        ("held-out FM loss, EMA", "heldout_fm_loss_ema", None),
        ("sinusoid Frechet (EMA samples)", "frechet", "frechet_floor"),
        ("sinusoid MMD^2", "mmd2", "mmd2_floor"),
        ("valid sinusoids (rho < 0.05)", "validity", "validity_real"),
        ("mean |update| per token (final weights)", "mean", None),
        (f"tokens with |update| < alpha={alpha:.1f}", "frac_below_alpha", None),
    ]
    print(f"\n{'':40s}{'baseline':>12s}{'ANM':>12s}{'real vs real':>14s}")
    for label, key, floor in rows:
        values = [next(part[key] for part in (results[n], results[n]["sinusoid"], results[n]["update_norms"])
                       if key in part) for n in runs]
        floor_value = results["baseline"]["sinusoid"][floor] if floor else None
        cells = "".join(f"{v:12.4g}" if v is not None else f"{'-':>12s}" for v in values)
        print(f"{label:40s}{cells}{floor_value:14.4g}" if floor_value is not None else f"{label:40s}{cells}")
    print(f"\n{cfg['num_samples']} samples per run; lower is better except validity. One seed: "
          "differences within run-to-run noise mean nothing.")
    print(f"Wrote samples_baseline.png, samples_anm.png, loss.png, metrics.json to {args.out} "
          f"({results['wall_s']:.0f} s)")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu: tiny (minutes); gpu: bigger")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: per scale)")
    parser.add_argument("--out", type=str, default="demo_out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: train baseline and ANM at the same time in two processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (CPU default: 1)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per run for the metric")
    parser.add_argument("--eval-samples", type=int, default=512, help="held-out images for the FM loss")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
