"""compare_runs.py's work: the speed-up in steps of each arm against the baseline (evaluation/speedup.py) on
the arms' mean curves and per seed pair, written as speedup.json, speedup.md and curves.png.

The headline factors compare the mean curves over seeds (at the steps every seed of the arm logged); each
seed that both the arm and the baseline ran also gives its own pair of curves, and the factors at the final
logged points of those pairs are summarised by their mean, min and max.

    result = compare_run_folders(["results/anm-s0"], ["results/base-s0"], "heldout_fm_loss_ema", "comparison")
    print(result["arms"][0]["summary"]["baseline_reaches_arm"]["factor"])   # e.g. 0.62: the arm is slower
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from runtime.atomic import atomic_write
from runtime.checks import check_writable_path
from runtime.cli import UsageError

from evaluation.run_arms import MIN_VALUES, Arm, Grouping, flag, group_arms, load_run
from evaluation.speedup import (
    DIRECTIONS,
    Crossing,
    Curve,
    arm_reaches_baseline,
    baseline_reaches_arm,
    mean_curve,
    seed_stats,
)

__all__ = ["OUTPUTS", "compare_run_folders", "compare_arms", "headline", "write_outputs", "check_out"]

OUTPUTS = ("speedup.json", "speedup.md", "curves.png")
METHOD = ("factor = baseline step / arm step (> 1: the arm needs fewer steps); steps between logged points "
          "interpolated linearly in log(step), never extrapolated; rows at step 0 and empty cells not used; "
          "arm_reaches_baseline: not reached means factor < S / s_last; baseline_reaches_arm: not reached means "
          "factor > S_last / s")
MEASURES = {"arm_reaches_baseline": arm_reaches_baseline, "baseline_reaches_arm": baseline_reaches_arm}


#################################################################################
#                                   Numbers                                     #
#################################################################################


def _curve_json(curve: Curve) -> dict[str, list]:
    return dict(step=curve.steps.tolist(), value=curve.values.tolist())


def arm_curve(arm: Arm, metric: str) -> Curve:
    """The arm's mean curve over its seeds; UsageError when its seeds share too few logged steps."""
    curve = mean_curve([run.curve for run in arm.runs.values()])
    if len(curve) < MIN_VALUES:
        raise UsageError(f"the runs of {arm.label} ({', '.join(r.path for r in arm.runs.values())}) log {metric} at "
                         f"{len(curve)} common step(s) > 0; a mean curve over seeds needs at least {MIN_VALUES}")
    return curve


def _directions(base: Curve, arm: Curve, higher_is_better: bool) -> dict[str, list[Crossing]]:
    return {name: MEASURES[name](base, arm, higher_is_better) for name in DIRECTIONS}


def _entries(directions: dict[str, list[Crossing]]) -> dict[str, Any]:
    """Every entry of both directions, and the final one of each (the headline)."""
    return {**{name: [e.as_dict() for e in entries] for name, entries in directions.items()},
            "summary": {name: entries[-1].as_dict() for name, entries in directions.items()}}


def _per_seed(baseline: Arm, arm: Arm, higher_is_better: bool) -> dict[str, Any]:
    """Both directions for every seed both arms ran, and mean/min/max over those pairs of the final factors."""
    pairs = [seed for seed in arm.runs if seed in baseline.runs]
    results = {seed: _directions(baseline.runs[seed].curve, arm.runs[seed].curve, higher_is_better) for seed in pairs}
    return dict(seeds=pairs,
                by_seed={str(seed): _entries(directions) for seed, directions in results.items()},
                summary={name: seed_stats({seed: results[seed][name][-1] for seed in pairs}) for name in DIRECTIONS})


def _runs_json(arm: Arm) -> list[dict[str, Any]]:
    return [dict(seed=seed, path=run.path) for seed, run in arm.runs.items()]


def compare_arms(grouping: Grouping, metric: str, higher_is_better: bool = False) -> dict[str, Any]:
    """speedup.json's content: for every arm, both directions on the mean curves, per seed pair, the summary."""
    base_curve = arm_curve(grouping.baseline, metric)
    arms = []
    for arm in grouping.arms:
        curve = arm_curve(arm, metric)
        arms.append(dict(
            label=arm.label, runs=_runs_json(arm), seeds=list(arm.runs),
            differs={flag(key): dict(baseline=old, arm=new) for key, (old, new) in arm.differs.items()},
            curve=_curve_json(curve), **_entries(_directions(base_curve, curve, higher_is_better)),
            per_seed=_per_seed(grouping.baseline, arm, higher_is_better)))
    warnings = [f"{d['flag']} differs between the runs (compared anyway with --force): "
                + ", ".join(f"{v!r} ({p})" for p, v in d["values"].items()) for d in grouping.forced]
    return dict(metric=metric, higher_is_better=higher_is_better, method=METHOD,
                baseline=dict(label=grouping.baseline.label, runs=_runs_json(grouping.baseline),
                              seeds=list(grouping.baseline.runs), curve=_curve_json(base_curve)),
                arms=arms, warnings=warnings, forced_differences=grouping.forced)


#################################################################################
#                                    Words                                      #
#################################################################################


SYMBOLS = {"<": "<", ">": ">", "<=": "≤", ">=": "≥"}


def _relation(bound: dict) -> str:
    return f"factor {SYMBOLS[bound['relation']]} {bound['factor']:.2f}"


def _factor(entry: dict) -> str:
    """'×0.87', '×2.00 (at the first logged step, so factor ≥ 2.00)', or 'not reached: factor < 0.80'."""
    bound = entry["bound"]
    if entry["factor"] is None:
        return f"not reached: {_relation(bound)}"
    return f"×{entry['factor']:.2f}" + (f" (at the first logged step, so {_relation(bound)})" if bound else "")


def _reached(entry: dict) -> str:
    return "–" if entry["reached_at"] is None else f"{entry['reached_at']:.0f}"


def headline(label: str, summary: dict, direction: str) -> str:
    """One sentence: where one side first reaches the other's final value, and the factor.

    Example: headline("anm", summary, "baseline_reaches_arm") == "the baseline reaches the final value of
    anm, 0.175 at step 5000, at step 4330: ×0.87"
    """
    e = summary[direction]
    where = f"{e['value']:.4g} at step {e['step']}"
    if direction == "arm_reaches_baseline":
        subject, target = label, f"the baseline's final value, {where},"
    else:
        subject, target = "the baseline", f"the final value of {label}, {where},"
    if e["factor"] is None:
        return f"{subject} does not reach {target} within its logged steps: {_relation(e['bound'])}"
    return f"{subject} reaches {target} at step {_reached(e)}: {_factor(e)}"


def _seed_line(stats: dict, direction: str) -> str:
    what = {"arm_reaches_baseline": "the arm reaches the baseline's final value",
            "baseline_reaches_arm": "the baseline reaches the arm's final value"}[direction]
    line = f"{what} in {stats['reached']}/{stats['pairs']} seed pairs"
    if stats["mean"] is not None:
        line += f": ×{stats['mean']:.2f} mean (×{stats['min']:.2f}–×{stats['max']:.2f})"
    if stats["not_reached"]:
        line += "; not reached: " + ", ".join(f"seed {n['seed']} ({_relation(n['bound'])})"
                                               for n in stats["not_reached"])
    return line


TABLE_HEADS = {
    "arm_reaches_baseline": ("The arm reaches the baseline's value (factor = S / s)",
                             "| baseline step S | baseline value | arm reaches it at step s | factor |"),
    "baseline_reaches_arm": ("The baseline reaches the arm's value (factor = S / s)",
                             "| arm step s | arm value | baseline reaches it at step S | factor |"),
}


def _arm_section(arm: dict) -> list[str]:
    runs = ", ".join(f"{r['path']} (seed {r['seed']})" for r in arm["runs"])
    differs = ", ".join(f"{k} {v['baseline']!r} → {v['arm']!r}" for k, v in arm["differs"].items())
    lines = [f"## {arm['label']}", "", f"Runs: {runs}. Differs from the baseline in: {differs}.", ""]
    lines += [f"- {headline(arm['label'], arm['summary'], d)}." for d in DIRECTIONS]
    if arm["per_seed"]["seeds"]:
        lines += [f"- Per seed pair (seeds {', '.join(map(str, arm['per_seed']['seeds']))}): "
                  + "; ".join(_seed_line(arm["per_seed"]["summary"][d], d) for d in DIRECTIONS) + "."]
    for direction in DIRECTIONS:
        title, head = TABLE_HEADS[direction]
        lines += ["", f"### {title}", "", head, "|---|---|---|---|"]
        lines += [f"| {e['step']} | {e['value']:.4g} | {_reached(e)} | {_factor(e)} |" for e in arm[direction]]
    return lines + [""]


def markdown(result: dict) -> str:
    """speedup.md: what was compared, how, a summary line per arm and direction, and the full tables."""
    base = result["baseline"]
    order = "higher" if result["higher_is_better"] else "lower"
    lines = [f"# Speed-up in steps: {result['metric']} ({order} is better)", "",
             "Baseline: " + ", ".join(f"{r['path']} (seed {r['seed']})" for r in base["runs"]) + ".", "",
             "factor = baseline step / arm step: above 1 the arm needs fewer steps to a value, below 1 more. A step "
             "between two logged points is interpolated linearly in log(step); nothing is extrapolated: a value "
             "not reached within the logged steps gives a bound instead (the arm not reaching the baseline's value "
             "at S: factor < S / the arm's last step; the baseline not reaching the arm's value at s: factor > the "
             "baseline's last step / s). Rows at step 0 are not used (no log scale); empty cells are skipped. "
             "Several seeds: the tables compare the mean curves, at the steps all seeds of an arm logged.", ""]
    lines += [f"**Warning:** {w}" for w in result["warnings"]] + ([""] if result["warnings"] else [])
    for arm in result["arms"]:
        lines += _arm_section(arm)
    return "\n".join(lines)


#################################################################################
#                                   Outputs                                     #
#################################################################################


def plot_curves(grouping: Grouping, result: dict, path: str) -> None:
    """curves.png: the metric against steps (log axis), one line per arm (the mean), the seeds' min–max band."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in [grouping.baseline, *grouping.arms]:
        curves = list(arm.runs.values())
        mean = mean_curve([run.curve for run in curves])
        seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
        (line,) = ax.plot(mean.steps, mean.values, marker=".", label=f"{arm.label} ({seeds})")
        if len(curves) > 1:  # the band over the steps every seed logged
            stack = np.array([[run.curve.values[np.searchsorted(run.curve.steps, s)] for s in mean.steps]
                              for run in curves])
            ax.fill_between(mean.steps, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2)
    ax.set(xscale="log", xlabel="step (log scale)", ylabel=result["metric"],
           title=f"{result['metric']}: mean over seeds, min–max band")
    plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")  # 500, not 5×10²
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def check_out(out_dir: str, overwrite: bool) -> None:
    """UsageError, before anything is written, when ``out_dir`` cannot be written or holds an earlier comparison."""
    check_writable_path(out_dir, flag="--out")
    earlier = [name for name in OUTPUTS if os.path.exists(os.path.join(out_dir, name))]
    if earlier and not overwrite:
        raise UsageError(f"--out {out_dir} holds a previous comparison ({', '.join(earlier)}): pass --overwrite to "
                         "replace it, or choose another --out")


def write_outputs(grouping: Grouping, result: dict, out_dir: str) -> None:
    """speedup.json, speedup.md and curves.png in ``out_dir`` (created), each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "speedup.json")) as f:
        f.write(json.dumps(result, indent=1).encode())
    with atomic_write(os.path.join(out_dir, "speedup.md")) as f:
        f.write(markdown(result).encode())
    plot_curves(grouping, result, os.path.join(out_dir, "curves.png"))


def compare_run_folders(runs: list[str], baseline: list[str], metric: str, out_dir: str,
                        higher_is_better: bool = False, force: bool = False, overwrite: bool = False,
                        fid_settings: str | None = None) -> dict:
    """Read, check and group the run folders, compute every factor, then write the three outputs; returns
    speedup.json's content. Every refusal (UsageError) comes before anything is written. ``fid_settings``:
    the eval_log.csv settings group (digest) of a sample metric's post-training results."""
    check_out(out_dir, overwrite)
    grouping = group_arms([load_run(p, metric, fid_settings) for p in runs],
                          [load_run(p, metric, fid_settings) for p in baseline], metric, force)
    result = compare_arms(grouping, metric, higher_is_better)
    write_outputs(grouping, result, out_dir)
    return result
