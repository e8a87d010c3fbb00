"""The ablation's numbers: speed-up against the baseline, the summary over seeds, tables.md and runs.csv.

Speed-up is measured on the held-out FM loss curves with evaluation/speedup.py (the rule compare_runs.py
uses): the step at which an arm first reaches the same seed's baseline final loss, interpolated linearly in
log(step) between evaluations, and the speed-up = the baseline's final step / that step; and, in reverse,
the step at which the baseline first reached the arm's final loss, over the arm's final step (the
"baseline-equivalent ratio", which exists even when the arm never catches up).

    >>> speedup_stats({0: dict(steps=[0, 10, 20], heldout=[1.0, 0.6, 0.4])},
    ...               {0: dict(steps=[0, 10, 20], heldout=[1.0, 0.55, 0.5])})["per_seed"][0]["steps"]
    14.142135623730955
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable

import numpy as np
from evaluation.speedup import Crossing, arm_reaches_baseline, baseline_reaches_arm, clean_curve
from modeling.alpha_scaling import PAPER_ALPHA, PAPER_LAMBDA
from runtime.atomic import atomic_write

from ablation.arms import ALPHA_GRID, DEFAULT_ARM, DISPERSIVE_ARM, LAMBDA_GRID, Arm, Budget, arm_name

__all__ = ["seed_speedup", "speedup_stats", "summarize", "write_tables", "write_csv"]


#################################################################################
#                              Steps to baseline                                #
#################################################################################


def _bound(entry: Crossing) -> dict | None:
    return None if entry.bound is None else dict(relation=entry.bound.relation, factor=entry.bound.factor)


def seed_speedup(run: dict, base: dict) -> dict:
    """One seed: where the arm first reaches the baseline's final held-out loss and where the baseline first
    reached the arm's (interpolated steps, None if never), the speed-up and the baseline-equivalent ratio.

    A record's step-0 evaluation is not used (no log scale); a value met at the first evaluation after it
    gives that step, and the bound says on which side the true crossing lies.
    """
    base_curve, arm_curve = clean_curve(base["steps"], base["heldout"]), clean_curve(run["steps"], run["heldout"])
    reach = arm_reaches_baseline(base_curve, arm_curve)[-1]
    equiv = baseline_reaches_arm(base_curve, arm_curve)[-1]
    return dict(steps=reach.reached_at, baseline_steps=reach.step, speedup=reach.factor, speedup_bound=_bound(reach),
                equiv=equiv.reached_at, equiv_ratio=equiv.factor, equiv_bound=_bound(equiv))


def speedup_stats(arm_runs: dict[int, dict], base_runs: dict[int, dict]) -> dict:
    """Per-seed steps at which an arm reaches its seed's baseline final held-out loss, and the speed-up.

    speed-up = the baseline's final step / the (interpolated) step at which the arm first reaches the
    baseline's final loss; > 1 is faster. Seeds where the arm never gets there count as 'not reached' (no
    speed-up number for that seed). The reverse view works even then: 'equiv' = the step at which the
    baseline first reached the arm's final loss, and equiv_ratio = equiv / the arm's final step (< 1: the arm
    is slower; None if the arm ends below the baseline's whole curve, i.e. it is ahead).
    """
    per_seed = {seed: seed_speedup(run, base_runs[seed]) for seed, run in arm_runs.items() if seed in base_runs}
    speeds = [v["speedup"] for v in per_seed.values() if v["speedup"] is not None]
    ratios = [v["equiv_ratio"] for v in per_seed.values() if v["equiv_ratio"] is not None]
    return dict(
        per_seed=per_seed,
        reached=len(speeds),
        seeds=len(per_seed),
        speedup_mean=float(np.mean(speeds)) if speeds else None,
        speedup_min=float(np.min(speeds)) if speeds else None,
        speedup_max=float(np.max(speeds)) if speeds else None,
        equiv_ratio_mean=float(np.mean(ratios)) if len(ratios) == len(per_seed) and ratios else None,
        equiv_ratio_min=float(np.min(ratios)) if len(ratios) == len(per_seed) and ratios else None,
        equiv_ratio_max=float(np.max(ratios)) if len(ratios) == len(per_seed) and ratios else None,
    )


#################################################################################
#                                  Summary                                      #
#################################################################################


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std of the finite values (std 0 for one value; (None, None) for none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: dict, arms: list[Arm]) -> dict:
    """Per dataset and arm: final held-out loss over seeds, paired change vs baseline, speed-up, metrics."""
    summary: dict = {}
    for dataset, by_arm in runs.items():
        base = by_arm.get("baseline", {})
        out = summary.setdefault(dataset, {})
        for arm in arms:
            seeds = by_arm.get(arm.name)
            if not seeds:
                continue
            finals = {
                s: r["heldout"][-1] if r["diverged_at"] is None else float("nan") for s, r in seeds.items()
            }
            rel = [100.0 * (finals[s] / base[s]["heldout"][-1] - 1) for s in seeds if s in base]
            entry = dict(
                seeds=sorted(seeds),
                alpha_used=next(iter(seeds.values()))["alpha_used"],
                final_heldout=mean_std(list(finals.values())),
                rel_vs_baseline_pct=mean_std(rel),
                rel_per_seed_pct=rel,
                diverged=[s for s, r in seeds.items() if r["diverged_at"] is not None],
                final_frac_below=mean_std([r["frac_below"][-1] for r in seeds.values()]),
                final_norm_update=mean_std([float(np.mean(r["norm_update"][-1])) for r in seeds.values()]),
                final_norm_output=mean_std([float(np.mean(r["norm_output"][-1])) for r in seeds.values()]),
            )
            if base:
                entry["speed"] = speedup_stats(seeds, base)
            if all("sample_metric" in r for r in seeds.values()):
                for key in ("frechet", "frechet_floor", "validity", "mmd2"):
                    entry[f"sinusoid_{key}"] = mean_std([r["sample_metric"][key] for r in seeds.values()])
            out[arm.name] = entry
    return summary


def fmt(pair: tuple | None, digits: int = 4) -> str:
    """'mean ± std' of a (mean, std) pair, '–' for none."""
    if not pair or pair[0] is None:
        return "–"
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def speed_cells(speed: dict) -> tuple[str, str, str]:
    """Table cells 'reached [step per seed]', 'speed-up (min–max)' and 'baseline-equivalent steps'."""
    if not speed:
        return "– []", "–", ""
    per_seed = speed["per_seed"].values()
    steps = ", ".join("–" if v["steps"] is None else f"{v['steps']:.0f}" for v in per_seed)
    reach = f"{speed['reached']}/{speed['seeds']} [{steps}]"
    sp = "–"
    if speed["speedup_mean"] is not None:
        sp = f"{speed['speedup_mean']:.2f} ({speed['speedup_min']:.2f}–{speed['speedup_max']:.2f})"
    equiv = ", ".join("ahead" if v["equiv"] is None else f"{v['equiv']:.0f}" for v in per_seed)
    if speed["equiv_ratio_mean"] is not None:
        equiv += (f" (×{speed['equiv_ratio_mean']:.2f}, {speed['equiv_ratio_min']:.2f}–"
                  f"{speed['equiv_ratio_max']:.2f})")
    return reach, sp, equiv


def table_rows(summary: dict, dataset: str, names: list[str], label: Callable[[str], str], steps: int) -> list[str]:
    """One markdown row per arm in ``names`` that has runs on ``dataset``."""
    rows = []
    for name in names:
        e = summary.get(dataset, {}).get(name)
        if e is None:
            continue
        reach, sp, equiv = speed_cells(e.get("speed", {}))
        rel_mean, rel_std = e["rel_vs_baseline_pct"]
        rel = "–" if name == "baseline" or rel_mean is None else f"{rel_mean:+.1f}% ± {rel_std:.1f}"
        fd = fmt(e.get("sinusoid_frechet"), 2) if "sinusoid_frechet" in e else "n/a"
        # The baseline has no alpha: its frac < α is measured at the default arm's (matched) alpha.
        alpha = f"({e['alpha_used']:.3g})" if name == "baseline" else f"{e['alpha_used']:.3g}"
        rows.append(f"| {label(name)} | {steps} | {alpha} | {fmt(e['final_heldout'])} | {rel} | {reach} | {sp} | "
                    f"{equiv} | {fmt(e['final_frac_below'], 2)} | {fmt(e['final_norm_update'], 1)} | {fd} |")
    return rows


TABLE_HEADER = (
    "| arm | steps | α used | held-out FM loss ↓ | Δ vs baseline (paired) | reach baseline final "
    "[step per seed] | speed-up (min–max) | baseline-equivalent steps (ratio, min–max) | frac < α | "
    "mean ‖Δh‖ | sinusoid FD ↓ |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def write_tables(summary: dict, arms: list[Arm], budget: Budget, path: str) -> None:
    """tables.md: the Tab. 3 and Tab. 4 shapes and the form study, per dataset."""
    by_name = {a.name: a for a in arms}

    def label(name: str) -> str:
        a = by_name[name]
        if a.repa:
            also = " + ANM default" if a.anm else " + L_disp default" if a.dispersive else ""
            return f"{name} (REPA λ={a.repa_lambda:g}{also})"
        if a.dispersive:
            where = "middle" if a.disp_block is None else f"block {a.disp_block}"
            return (f"{name} (L_disp λ={a.disp_lambda:g}, τ={a.disp_tau:g}, {a.disp_distance}, {where}"
                    + (", + ANM default)" if a.anm else ")"))
        return "baseline (no ANM)" if not a.anm else f"{name} (α={a.alpha:g}, λ={a.lam:g}, {a.scaling})"

    b = budget
    alpha_names = [arm_name(s, a, PAPER_LAMBDA) for s in ("raw", "matched") for a in ALPHA_GRID]
    lam_names = [arm_name(s, PAPER_ALPHA, lam) for s in ("raw", "matched") for lam in LAMBDA_GRID]
    form_names = [DEFAULT_ARM] + [a.name for a in arms if a.name.startswith(DEFAULT_ARM + "_") or a.scaling == "rms"]
    lines = [
        f"# ANM ablation tables ({b.name} budget)",
        "",
        f"SiT D={b.hidden}, depth {b.depth}, {b.image_size}×{b.image_size} images, patch {b.patch_size}, "
        f"batch {b.batch}, {b.steps} steps, AdamW lr {b.lr}, seeds {list(b.seeds)}. Mean ± sample std over "
        "seeds. 'Δ vs baseline' is the per-seed relative change of the final held-out FM loss (negative = "
        "better). 'reach baseline final' counts seeds whose held-out FM loss reaches the same seed's baseline "
        f"final value within the run (evaluated every {b.eval_every} steps), at the step given (interpolated "
        "linearly in log(step) between evaluations, evaluation/speedup.py); speed-up = the baseline's final step "
        "/ that step over those seeds. 'baseline-equivalent steps' = the step at which the same seed's baseline "
        "first reached the arm's final loss (interpolated the same way), and its ratio to the arm's steps (< 1 "
        "= slower; 'ahead' = below the whole baseline curve). A value already met at the first evaluation "
        "after step 0 counts at that step (the crossing may have come earlier). frac < α and ‖Δh‖ are "
        "held-out at the end (frac at the arm's own site/reduce/α). 'matched' = α·√(D/1152). sinusoid FD: "
        "Fréchet distance of the fitted sinusoid parameters of the samples vs real images (real-vs-real floor "
        "and validity rate in summary.json).",
        "",
    ]
    for dataset in summary:
        for title, names in (
            (f"Tab. 3 shape — effect of α (λ=10), {dataset}", ["baseline"] + alpha_names),
            (f"Tab. 4 shape — effect of λ (α=70), {dataset}", ["baseline"] + lam_names),
            (f"Form study (matched α=70, λ=10; one factor at a time), {dataset}", ["baseline"] + form_names),
            (f"Beside Dispersive Loss, {dataset}",
             ["baseline", DEFAULT_ARM] + [a.name for a in arms if a.dispersive and not a.repa]),
            (f"Beside REPA ({os.path.basename(b.repa_encoder or '') or 'no encoder'}), {dataset}",
             ["baseline", DEFAULT_ARM, DISPERSIVE_ARM] + [a.name for a in arms if a.repa]),
        ):
            if title.startswith("Beside REPA") and not any(a.repa for a in arms):
                continue
            lines += [f"## {title}", "", TABLE_HEADER] + table_rows(summary, dataset, names, label, b.steps) + [""]
    with atomic_write(path) as f:
        f.write("\n".join(lines).encode())


CSV_FIELDS = ["dataset", "seed", "arm", "alpha_used", "lam", "scaling", "site", "reduce", "objective",
              "granularity", "warmup_steps", "disp_lambda", "disp_tau", "disp_distance", "disp_block", "repa_lambda",
              "final_heldout", "rel_vs_baseline_pct", "steps_to_baseline",
              "speedup", "final_frac_below", "final_norm_update", "final_norm_output", "sinusoid_frechet",
              "sinusoid_validity", "diverged_at"]


def disp_cells(arm: dict) -> dict:
    """The Dispersive Loss settings of a record's arm for runs.csv (empty cells for arms without it)."""
    if not arm.get("dispersive"):
        return dict(disp_lambda=None, disp_tau=None, disp_distance=None, disp_block=None)
    return dict(disp_lambda=arm["disp_lambda"], disp_tau=arm["disp_tau"],
                disp_distance=arm.get("disp_distance", "l2"), disp_block=arm.get("disp_block") or "middle")


def csv_row(dataset: str, seed: int, record: dict, base: dict | None, speed: dict) -> dict:
    """One runs.csv row: an arm's settings and final numbers on one (dataset, seed)."""
    arm, metric = record["arm"], record.get("sample_metric", {})
    rel = 100 * (record["heldout"][-1] / base["heldout"][-1] - 1) if base is not None else None
    return dict(dataset=dataset, seed=seed, arm=record["name"], alpha_used=record["alpha_used"], lam=arm["lam"],
                scaling=arm["scaling"], site=arm["site"], reduce=record["reduce"], objective=arm["objective"],
                granularity=arm["granularity"], warmup_steps=record["warmup_steps"],
                **disp_cells(arm), repa_lambda=arm["repa_lambda"] if arm.get("repa") else None,
                final_heldout=record["heldout"][-1], rel_vs_baseline_pct=rel,
                steps_to_baseline=speed.get("steps"), speedup=speed.get("speedup"),
                final_frac_below=record["frac_below"][-1],
                final_norm_update=float(np.mean(record["norm_update"][-1])),
                final_norm_output=float(np.mean(record["norm_output"][-1])),
                sinusoid_frechet=metric.get("frechet"), sinusoid_validity=metric.get("validity"),
                diverged_at=record["diverged_at"])


def write_csv(runs: dict, summary: dict, path: str) -> None:
    """runs.csv: one row per (dataset, arm, seed)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for dataset, by_arm in runs.items():
        base = by_arm.get("baseline", {})
        for name, seeds in by_arm.items():
            speed = summary[dataset][name].get("speed", {}).get("per_seed", {})
            for seed, record in sorted(seeds.items()):
                writer.writerow(csv_row(dataset, seed, record, base.get(seed), speed.get(seed, {})))
    with atomic_write(path) as f:
        f.write(text.getvalue().encode())
