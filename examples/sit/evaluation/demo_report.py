"""What demo.py shows: the three image grids side by side, the norm and loss curves, and the comparison table
with the speed-up in steps."""
from __future__ import annotations

import math

import numpy as np
from runtime.atomic import atomic_write

from evaluation.speedup_report import headline

__all__ = ["plot_samples", "plot_norms", "plot_losses", "comparison_rows", "speedup_lines", "write_table"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, dpi: int = 100) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)


def tile(images: np.ndarray, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, 3) images as one (rows, nrow) mosaic on a white background."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid


def plot_samples(grids: dict[str, np.ndarray], path: str, count: int = 64) -> None:
    """One figure: each grid's first ``count`` images side by side, under its title (the dict key)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 4.2))
    for ax, (title, images) in zip(axes, grids.items(), strict=True):
        ax.imshow(tile(images[:count]), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_norms(series: dict[str, dict], alpha: float, path: str) -> None:
    """Mean ||update|| per block over training, one panel per run, ANM's alpha as a dashed line; where
    train.py logged ANM's own norms (on the training batches), their mean over blocks as a dotted line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.8), sharey=True)
    for ax, (name, run) in zip(axes, series.items(), strict=True):
        steps, norms = run["evaluation"]["step"], np.array(run["evaluation"]["update_norms"])
        for block in range(norms.shape[1]):
            ax.plot(steps, norms[:, block], marker=".", label=f"block {block}")
        logged = [(step, np.mean(n)) for step, n in zip(run["train"]["step"], run["train"]["anm_norms"],
                                                        strict=True) if n]
        if logged:
            ax.plot(*zip(*logged, strict=True), color="gray", linestyle=":", label="train.py log (mean)")
        ax.axhline(alpha, color="k", linestyle="--", label=f"α = {alpha:.1f}")
        ax.set(title=f"{name}: mean ‖Δh‖ per block", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("per-token ‖block(h) − h‖₂")
    fig.tight_layout()
    _save(fig, path)


def plot_losses(series: dict[str, dict], path: str) -> None:
    """Training FM loss (left) and FM loss of the raw and EMA weights on the fixed evaluation set (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for name, run in series.items():
        (line,) = left.plot(run["train"]["step"], run["train"]["fm_loss"], label=name)
        curve = run["evaluation"]
        right.plot(curve["step"], curve["fm_loss"], color=line.get_color(), marker=".", label=name)
        right.plot(curve["step"], curve["fm_loss_ema"], color=line.get_color(), linestyle=":", label=f"{name}, EMA")
    left.set(title="training FM loss (mean over log interval)", xlabel="step", yscale="log")
    right.set(title="FM loss on the training images (fixed noise and t)", xlabel="step", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def comparison_rows(results: dict, alpha: float) -> list[tuple[str, list[float | None], float | None]]:
    """(label, [baseline, ANM], real-vs-real value or None) for every row of the comparison table."""
    def both(get) -> list[float | None]:
        return [get(results[name]) for name in ("baseline", "anm")]

    floor = results["baseline"]["sinusoid"]
    return [
        ("training FM loss (last log interval)", both(lambda r: r["final_fm_loss"]), None),
        ("FM loss on the training images, EMA", both(lambda r: r["train_images_fm_loss_ema"]), None),
        ("FM loss on fresh sinusoids (never trained on), EMA", both(lambda r: r["fresh_fm_loss_ema"]), None),
        ("valid sinusoids (ρ < 0.05), EMA samples", both(lambda r: r["sinusoid"]["validity"]),
         floor["validity_real"]),
        ("sinusoid Fréchet distance ↓", both(lambda r: r["sinusoid"]["frechet"]), floor["frechet_floor"]),
        ("sinusoid MMD² ↓", both(lambda r: r["sinusoid"]["mmd2"]), floor["mmd2_floor"]),
        ("mean ‖Δh‖ per token, final weights", both(lambda r: r["update_norms"]["mean"]), None),
        (f"tokens with ‖Δh‖ < α = {alpha:.1f}", both(lambda r: r["update_norms"]["frac_below_alpha"]), None),
    ]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def speedup_lines(speedup: dict) -> list[str]:
    """The speed-up in steps of the ANM run, in both directions, as measured by compare_runs.py."""
    summary = speedup["summary"]
    return [
        f"Speed-up in steps (`compare_runs.py` on the runs' `log.csv`, column `{speedup['metric']}`; factor = "
        "baseline step / ANM step, above 1 ANM is faster, interpolated in log(step) between logged steps): "
        f"{headline('ANM', summary, 'arm_reaches_baseline')}; {headline('ANM', summary, 'baseline_reaches_arm')}. "
        f"Tables and curves: `{speedup['folder']}/`.",
        "",
    ]


def write_table(rows: list, results: dict, path: str) -> str:
    """comparison.md: the table, what was run, and what the comparison does and does not mean; returns it."""
    config, timing = results["config"], results["timing"]
    lines = ["| | baseline | ANM | real vs real |", "|---|---|---|---|"]
    lines += [f"| {label} | {_cell(values[0])} | {_cell(values[1])} | {_cell(floor)} |"
              for label, values, floor in rows]
    lines += [
        "",
        f"SiT {config['model']} (D={config['hidden_size']}, depth {config['depth']}) on {config['image_size']}×"
        f"{config['image_size']} sinusoids, {config['data_size']} training images, batch {config['batch']}, "
        f"{config['steps']} steps, lr {config['lr']:g}, EMA {config['ema_decay']}, seed {config['seed']}; "
        f"ANM α = {config['anm']['alpha']:.2f}, λ = {config['anm']['lam']:g}, warm-up {config['anm']['warmup']} "
        f"steps. {config['num_samples']} samples per run (Heun, {config['sample_steps']} steps, the same noise for "
        f"both); FM losses on {config['eval_samples']} items with fixed noise and t. The sinusoid metric compares "
        "samples with fresh real sinusoids, not with the training images; 'real vs real': the metric between "
        f"two sets of real images of the same size (its noise floor). Took {timing['wall_s']:.0f} s wall, "
        f"{timing['cpu_s']:.0f} s CPU.",
        "",
        *(speedup_lines(results["speedup"]) if "speedup" in results else []),
        "One seed of a tiny model that learns a small training set by heart: this shows what the demo measures; "
        "it is evidence neither for nor against a speed-up from ANM (see docs/results.md for the ablation).",
        "",
    ]
    text = "\n".join(lines)
    with atomic_write(path) as f:
        f.write(text.encode())
    return text
