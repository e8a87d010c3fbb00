"""Does ANM speed up flow-matching training? The seed supplement's ablation (Tab. 3 / Tab. 4) at small scale.

One command trains, for every (dataset, seed), a baseline SiT and one ANM arm per grid point, all in
lockstep in one process: every arm starts from the same initial weights (one model per seed, deep-copied
per arm) and sees the same batches, times and noise. It writes per-arm curves (held-out flow-matching loss
on fixed noise and a fixed t grid, per-layer norms, fraction of tokens below alpha), the steps each arm
needs to reach the baseline's final held-out loss, tables shaped like the supplement's Tab. 3 / Tab. 4,
and plots.

    python examples/sit/ablate.py --budget cpu     # 2 workers on 2 CPU cores: 25 min measured (shared VM)
    python examples/sit/ablate.py --budget gpu     # one GPU, sized for ~10 min on an H100 (not timed yet)
    python examples/sit/ablate.py --budget smoke   # seconds; what the tests run

Results go to results/ablate/<budget>/: runs/<dataset>/seed<k>/<arm>.json (cached: a rerun only trains
what is missing), runs.csv, summary.json, tables.md, curves.png, grids.png, norms.png.

Alpha and width: with reduce="l2" a block's natural update norm grows like sqrt(D), so the paper's alpha=70
(SiT-XL/2, D=1152) is an RMS of 2.1 per feature but an RMS of 8.8 at D=64. Every grid is therefore run at
the raw alpha and at the matched alpha * sqrt(D / 1152); the form study also runs reduce="rms" once.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from data import FashionMNISTDataset, make_sinusoids
from models import SiT
from samplers import Sampler
from sinusoid_metric import SinusoidMetric
from transport import create_transport

import anm

PAPER_HIDDEN = 1152  # SiT-XL/2, where the paper's alpha=70 was chosen
PAPER_ALPHA, PAPER_LAMBDA = 70.0, 10.0
ALPHA_GRID = (10.0, 50.0, 70.0, 100.0, 300.0)  # supplement Tab. 3 (lambda = 10)
LAMBDA_GRID = (2.0, 5.0, 10.0, 15.0, 20.0)  # supplement Tab. 4 (alpha = 70)
DATASETS = ("sinusoid", "fashion-mnist")


#################################################################################
#                                 Budgets                                       #
#################################################################################

# Model and run size per budget. The CPU budget was sized from a measured ~67 ms per training step of one
# arm on a 2-core machine shared with other jobs (load average ~7; D=64, depth 3, 16 tokens, batch 32):
# 26 arms x 6 (dataset, seed) groups on 2 workers in ~40 minutes, which leaves only 400 steps per arm
# (the measured run took 24.6 minutes; see docs/results.md).
# The lr is raised to 4e-4 so the baseline gets further in so few steps (same lr for every arm). The GPU
# budget is an estimate (never timed on a device).
BUDGETS: dict[str, dict] = {
    "smoke": dict(
        image_size=8,
        patch_size=4,
        hidden=32,
        depth=2,
        heads=2,
        batch=8,
        steps=12,
        eval_every=4,
        eval_n=16,
        sample_n=16,
        sample_steps=4,
        seeds=(0,),
        datasets=("sinusoid",),
        lr=2e-4,
        workers=1,
        arms=("baseline", "matched_a70_l10"),
    ),
    "cpu": dict(
        image_size=16,
        patch_size=4,
        hidden=64,
        depth=3,
        heads=4,
        batch=32,
        steps=400,
        eval_every=40,
        eval_n=128,
        sample_n=128,
        sample_steps=16,
        seeds=(0, 1, 2),
        datasets=DATASETS,
        lr=4e-4,
        workers=2,
        arms=None,
    ),
    "gpu": dict(
        image_size=32,
        patch_size=4,
        hidden=128,
        depth=4,
        heads=4,
        batch=128,
        steps=1500,
        eval_every=100,
        eval_n=512,
        sample_n=512,
        sample_steps=32,
        seeds=(0, 1, 2),
        datasets=DATASETS,
        lr=2e-4,
        workers=1,
        arms=None,
    ),
}
DEFAULT_WARMUP_FRAC = 0.1  # the paper's 2k steps of a 200k run is 1%; on runs this short 10% is used


#################################################################################
#                                   Arms                                        #
#################################################################################


@dataclass(frozen=True)
class Arm:
    """One training configuration: the baseline (anm=False) or an ANM setting."""

    name: str
    anm: bool = True
    alpha: float = PAPER_ALPHA  # the paper's alpha (before width scaling)
    scaling: str = (
        "matched"  # "raw": alpha as is; "matched": alpha*sqrt(D/1152); "rms": alpha/sqrt(1152), reduce=rms
    )
    lam: float = PAPER_LAMBDA
    warmup_frac: float = DEFAULT_WARMUP_FRAC
    site: str = "update"
    objective: str = "hinge"
    granularity: str = "token"

    @property
    def reduce(self) -> str:
        return "rms" if self.scaling == "rms" else "l2"

    def alpha_used(self, hidden: int) -> float:
        """The alpha handed to anm.ANM for a model of width ``hidden``."""
        if self.scaling == "raw":
            return self.alpha
        if self.scaling == "matched":
            return matched_alpha(self.alpha, hidden)
        return self.alpha / math.sqrt(PAPER_HIDDEN)  # rms: the per-feature RMS that alpha means at D=1152

    def warmup_steps(self, steps: int) -> int:
        return int(round(self.warmup_frac * steps))


def matched_alpha(alpha: float, hidden: int, ref_hidden: int = PAPER_HIDDEN) -> float:
    """The l2 alpha at width ``hidden`` that asks for the same per-feature RMS as ``alpha`` at ``ref_hidden``.

    Example: matched_alpha(70, 1152) == 70.0; matched_alpha(70, 64) ~= 16.5 (an RMS of 2.06 either way).
    """
    return alpha * math.sqrt(hidden / ref_hidden)


def build_arms() -> list[Arm]:
    """Baseline, the Tab. 3 alpha grid and Tab. 4 lambda grid (raw and matched), and the form study.

    The form study varies one factor at a time from the default (matched alpha=70, lambda=10, per-token
    hinge on the residual update, 10% warm-up); arms that coincide are listed once.
    """
    arms = [Arm("baseline", anm=False)]
    for scaling in ("raw", "matched"):
        arms += [Arm(arm_name(scaling, a, PAPER_LAMBDA), alpha=a, scaling=scaling) for a in ALPHA_GRID]
        arms += [
            Arm(arm_name(scaling, PAPER_ALPHA, lam), lam=lam, scaling=scaling)
            for lam in LAMBDA_GRID
            if lam != PAPER_LAMBDA
        ]
    default = Arm(arm_name("matched", PAPER_ALPHA, PAPER_LAMBDA))
    arms += [
        replace(default, name=default.name + "_site-output", site="output"),
        replace(default, name="rms_a70_l10", scaling="rms"),
        replace(default, name=default.name + "_gran-sample", granularity="sample"),
        replace(default, name=default.name + "_gran-batch", granularity="batch"),
        replace(default, name=default.name + "_obj-exp", objective="exp"),
        replace(default, name=default.name + "_wu0", warmup_frac=0.0),
        replace(default, name=default.name + "_wu50", warmup_frac=0.5),
    ]
    return arms


def arm_name(scaling: str, alpha: float, lam: float) -> str:
    return f"{scaling}_a{alpha:g}_l{lam:g}"


#################################################################################
#                                Data stream                                    #
#################################################################################


def load_fashion_mnist(image_size: int, split: str) -> torch.Tensor:
    """Fashion-MNIST as one (N, 1, S, S) float tensor in [-1, 1]."""
    ds = FashionMNISTDataset(split=split, image_size=image_size)
    return torch.from_numpy(np.ascontiguousarray(ds.images)).float().div(127.5).sub(1).unsqueeze(1)


class Stream:
    """Deterministic training batches (x, t, noise) and a fixed held-out set for one (dataset, seed)."""

    def __init__(self, dataset: str, seed: int, cfg: dict):
        self.dataset, self.batch, self.size = dataset, cfg["batch"], cfg["image_size"]
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        n = cfg["eval_n"]
        held_gen = torch.Generator().manual_seed(999)  # same held-out set for every seed and arm
        if dataset == "sinusoid":
            self.train = None
            self.heldout, _ = make_sinusoids(n, self.size, held_gen)
        elif dataset == "fashion-mnist":
            self.train = load_fashion_mnist(self.size, "train")
            self.heldout = load_fashion_mnist(self.size, "test")[:n]
        else:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
        self.channels = self.heldout.shape[1]
        # Fixed noise and a uniform midpoint t grid: the held-out FM loss has no sampling noise (cf. Tab. 2).
        self.heldout_noise = torch.randn(self.heldout.shape, generator=held_gen)
        self.heldout_t = (torch.arange(n, dtype=torch.float32) + 0.5) / n

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.generator
        if self.train is None:
            x, _ = make_sinusoids(self.batch, self.size, g)  # fresh draws: an unlimited training set
        else:
            x = self.train[torch.randint(len(self.train), (self.batch,), generator=g)]
        t = torch.rand(self.batch, generator=g)
        noise = torch.randn(x.shape, generator=g)
        return x, t, noise


#################################################################################
#                                  Metrics                                      #
#################################################################################


def steps_to_reach(steps: list[int], values: list[float], target: float) -> int | None:
    """The first logged step at which ``values`` is at or below ``target``; None if never.

    Example: steps_to_reach([0, 10, 20], [1.0, 0.5, 0.4], 0.5) == 10
    """
    for step, value in zip(steps, values, strict=True):
        if value is not None and math.isfinite(value) and value <= target:
            return step
    return None


def speedup_stats(arm_runs: dict[int, dict], base_runs: dict[int, dict]) -> dict:
    """Per-seed steps at which an arm reaches its seed's baseline final held-out loss, and the speed-up.

    speed-up = (steps the baseline needs to reach its own final loss) / (steps the arm needs); > 1 is faster.
    Seeds where the arm never gets there count as 'not reached' (no speed-up number for that seed). The
    reverse view works even then: 'equiv' = the steps the baseline needed to reach the arm's final loss,
    and equiv_ratio = equiv / the arm's steps (< 1: the arm is slower; None if the arm ends below the
    baseline's whole curve, i.e. it is ahead).
    """
    per_seed = {}
    for seed, run in arm_runs.items():
        base = base_runs.get(seed)
        if base is None:
            continue
        target = base["heldout"][-1]
        base_reach = steps_to_reach(base["steps"], base["heldout"], target)
        arm_reach = steps_to_reach(run["steps"], run["heldout"], target)
        speed = None if arm_reach is None else base_reach / max(arm_reach, 1)
        equiv = steps_to_reach(base["steps"], base["heldout"], run["heldout"][-1])
        ratio = None if equiv is None else equiv / max(run["steps"][-1], 1)
        per_seed[seed] = dict(
            steps=arm_reach, baseline_steps=base_reach, speedup=speed, equiv=equiv, equiv_ratio=ratio
        )
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


def checksum(tensors) -> float:
    """A float fingerprint of tensors (weights or batches), to check arms share them."""
    return float(
        sum(t.detach().double().abs().sum().item() + t.detach().double().sum().item() for t in tensors)
    )


@torch.no_grad()
def heldout_eval(net: SiT, stream: Stream, arm: Arm, alpha_used: float, device: torch.device) -> dict:
    """Held-out FM loss on fixed noise/t, per-layer mean norms (update and output, l2), and the fraction of
    tokens below the arm's alpha at its own site and reduction (baseline: the default form's alpha)."""
    transport = create_transport()
    was_training = net.training
    net.eval()
    losses, updates, outputs = [], [], []
    with (
        anm.ActivationCollector(net, site="update") as upd,
        anm.ActivationCollector(net, site="output") as out,
    ):
        for i in range(0, len(stream.heldout), 256):
            x = stream.heldout[i : i + 256].to(device)
            t, noise = stream.heldout_t[i : i + 256].to(device), stream.heldout_noise[i : i + 256].to(device)
            y = torch.zeros(len(x), dtype=torch.long, device=device)
            losses.append(transport.training_losses(net, x, dict(y=y), t=t, noise=noise)["loss"])
            updates.append(torch.stack(upd.norms()))  # (layers, B, tokens)
            outputs.append(torch.stack(out.norms()))
            upd.clear(), out.clear()
    net.train(was_training)
    updates, outputs = torch.cat(updates, 1), torch.cat(outputs, 1)
    norms = updates if arm.site == "update" else outputs
    if arm.reduce == "rms":
        norms = norms / math.sqrt(net.pos_embed.shape[-1])  # per-feature RMS, as reduce='rms' sees it
    return dict(
        heldout=float(torch.cat(losses).mean()),
        norm_update=updates.mean(dim=(1, 2)).tolist(),
        norm_output=outputs.mean(dim=(1, 2)).tolist(),
        frac_below=float((norms < alpha_used).float().mean()),
    )


#################################################################################
#                             Training one group                                #
#################################################################################


def make_model(cfg: dict, channels: int) -> SiT:
    # Unconditional (one class, no label dropout): label dropout would draw from torch's global RNG.
    return SiT(
        input_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_channels=channels,
        hidden_size=cfg["hidden"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        class_dropout_prob=0.0,
        num_classes=1,
    )


def run_path(out_dir: str, dataset: str, seed: int, arm: str) -> str:
    return os.path.join(out_dir, "runs", dataset, f"seed{seed}", f"{arm}.json")


def train_group(job: tuple) -> list[str]:
    """Train the given arms of one (dataset, seed) in lockstep on one shared stream; one JSON per arm."""
    cfg, dataset, seed, arms, out_dir, device_name = job
    torch.set_num_threads(1)  # one core per worker: several workers share the machine
    device = torch.device(device_name)
    start = time.time()
    stream = Stream(dataset, seed, cfg)
    torch.manual_seed(seed)
    base = make_model(cfg, stream.channels).to(device)
    init_sum = checksum(base.state_dict().values())
    transport = create_transport()
    steps, hidden = cfg["steps"], cfg["hidden"]

    states = []
    for arm in arms:
        net = copy.deepcopy(base)  # identical initial weights in every arm
        alpha_used = arm.alpha_used(hidden)  # the baseline's (default alpha) is where it counts norms below
        model = net
        if arm.anm:
            model = anm.ANM(
                net,
                alpha=alpha_used,
                lam=arm.lam,
                warmup=arm.warmup_steps(steps),
                site=arm.site,
                reduce=arm.reduce,
                objective=arm.objective,
                granularity=arm.granularity,
            )
        opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=0.0)
        log = dict(
            steps=[],
            heldout=[],
            norm_update=[],
            norm_output=[],
            frac_below=[],
            train_loss=[],
            anm_loss=[],
            init_checksum=checksum(net.state_dict().values()),
            data_checksum=0.0,
            diverged_at=None,
        )
        states.append(
            dict(arm=arm, net=net, model=model, opt=opt, alpha_used=alpha_used, log=log, acc=[0.0, 0.0, 0])
        )

    timing = dict(setup_s=time.time() - start, train_s=0.0, eval_s=0.0, sample_s=0.0)

    def evaluate(step: int) -> None:
        tick = time.time()
        for s in states:
            if s["log"]["diverged_at"] is not None:
                continue
            result = heldout_eval(s["net"], stream, s["arm"], s["alpha_used"], device)
            log, acc = s["log"], s["acc"]
            log["steps"].append(step)
            for key in ("heldout", "norm_update", "norm_output", "frac_below"):
                log[key].append(result[key])
            log["train_loss"].append(acc[0] / acc[2] if acc[2] else None)
            log["anm_loss"].append(acc[1] / acc[2] if acc[2] else None)
            s["acc"] = [0.0, 0.0, 0]
        timing["eval_s"] += time.time() - tick

    evaluate(0)
    for step in range(steps):
        tick = time.time()
        batch = stream.next()
        batch_sum = checksum(batch)  # on the host copy: no device syncs for it
        x, t, noise = (v.to(device) for v in batch)
        y = torch.zeros(len(x), dtype=torch.long, device=device)
        for s in states:  # every arm trains on exactly this batch
            if s["log"]["diverged_at"] is not None:
                continue
            fm = transport.training_losses(s["model"], x, dict(y=y), t=t, noise=noise)["loss"].mean()
            reg = s["model"].loss(step=step) if s["arm"].anm else torch.zeros((), device=device)
            fm_value, reg_value = torch.stack([fm.detach(), reg.detach()]).tolist()  # one sync per arm
            if not math.isfinite(fm_value + reg_value):
                s["log"]["diverged_at"] = step
                continue
            s["opt"].zero_grad(set_to_none=True)
            (fm + reg).backward()
            s["opt"].step()
            s["acc"][0] += fm_value
            s["acc"][1] += reg_value
            s["acc"][2] += 1
            s["log"]["data_checksum"] += batch_sum
        timing["train_s"] += time.time() - tick
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            evaluate(step + 1)

    # End of training only: samples for the sinusoid parameter metric (a cheap Euler ODE, few samples).
    metric = SinusoidMetric(image_size=cfg["image_size"], seed=1234) if dataset == "sinusoid" else None
    sample_fn = Sampler(transport).sample_ode(num_steps=cfg["sample_steps"], method="euler")
    z = torch.randn(
        cfg["sample_n"],
        stream.channels,
        cfg["image_size"],
        cfg["image_size"],
        generator=torch.Generator().manual_seed(777),
    ).to(device)
    written = []
    tick = time.time()
    for s in states:
        net, log = s["net"], s["log"]
        if metric is not None and log["diverged_at"] is None:
            net.eval()
            images = (
                sample_fn(z, net, y=torch.zeros(len(z), dtype=torch.long, device=device)).clamp(-1, 1).cpu()
            )
            log["sample_metric"] = {k: float(v) for k, v in metric(images).items()}
        if s["arm"].anm:
            s["model"].close()
    timing["sample_s"] = time.time() - tick
    for s in states:
        log = s["log"]
        record = dict(
            dataset=dataset,
            seed=seed,
            arm=asdict(s["arm"]),
            name=s["arm"].name,
            alpha_used=s["alpha_used"],
            reduce=s["arm"].reduce,
            warmup_steps=s["arm"].warmup_steps(steps) if s["arm"].anm else 0,
            base_init_checksum=init_sum,
            config=cfg,  # main() passes the cache key: the config without arms and workers
            **log,
        )
        record["group_wall_s"], record["timing"] = time.time() - start, timing
        path = run_path(out_dir, dataset, seed, s["arm"].name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written cache entry
        written.append(path)
    print(
        f"[ablate] {dataset} seed {seed}: {len(arms)} arms x {steps} steps in {time.time() - start:.0f}s "
        f"({', '.join(f'{k} {v:.0f}' for k, v in timing.items())})",
        flush=True,
    )
    return written


#################################################################################
#                                Aggregation                                    #
#################################################################################


def load_runs(out_dir: str, cfg: dict, arms: list[Arm]) -> dict:
    """runs[dataset][arm name][seed] = the cached record, for the runs that exist with this config."""
    runs: dict = {}
    for dataset in cfg["datasets"]:
        for arm in arms:
            for seed in cfg["seeds"]:
                record = read_cached(out_dir, dataset, seed, arm.name, cfg)
                if record is not None:
                    runs.setdefault(dataset, {}).setdefault(arm.name, {})[seed] = record
    return runs


def read_cached(out_dir: str, dataset: str, seed: int, arm: str, cfg: dict) -> dict | None:
    path = run_path(out_dir, dataset, seed, arm)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    wanted = json.loads(json.dumps(cfg))  # as stored: tuples became lists
    return record if record.get("config") == wanted else None  # a different budget/size: retrain


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
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
    if not pair or pair[0] is None:
        return "–"
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(summary: dict, dataset: str, names: list[str], label, steps: int) -> list[str]:
    rows = []
    for name in names:
        e = summary.get(dataset, {}).get(name)
        if e is None:
            continue
        speed = e.get("speed", {})
        reach = f"{speed.get('reached', 0)}/{speed.get('seeds', 0)}" if speed else "–"
        per = [v["steps"] for v in speed.get("per_seed", {}).values()] if speed else []
        reach_steps = ", ".join("–" if v is None else str(v) for v in per)
        sp = (
            "–"
            if not speed or speed.get("speedup_mean") is None
            else (f"{speed['speedup_mean']:.2f} ({speed['speedup_min']:.2f}–{speed['speedup_max']:.2f})")
        )
        rel = (
            "–"
            if name == "baseline"
            else (
                f"{e['rel_vs_baseline_pct'][0]:+.1f}% ± {e['rel_vs_baseline_pct'][1]:.1f}"
                if e["rel_vs_baseline_pct"][0] is not None
                else "–"
            )
        )
        equiv = ", ".join(
            "ahead" if v["equiv"] is None else str(v["equiv"]) for v in speed.get("per_seed", {}).values()
        )
        if speed and speed.get("equiv_ratio_mean") is not None:
            r = speed
            equiv += f" (×{r['equiv_ratio_mean']:.2f}, {r['equiv_ratio_min']:.2f}–{r['equiv_ratio_max']:.2f})"
        fd = fmt(e.get("sinusoid_frechet"), 2) if "sinusoid_frechet" in e else "n/a"
        # The baseline has no alpha: its frac < α is measured at the default arm's (matched) alpha.
        alpha = f"({e['alpha_used']:.3g})" if name == "baseline" else f"{e['alpha_used']:.3g}"
        rows.append(
            f"| {label(name)} | {steps} | {alpha} | {fmt(e['final_heldout'])} | {rel} | "
            f"{reach} [{reach_steps}] | {sp} | {equiv} | {fmt(e['final_frac_below'], 2)} | "
            f"{fmt(e['final_norm_update'], 1)} | {fd} |"
        )
    return rows


def write_tables(summary: dict, arms: list[Arm], cfg: dict, path: str) -> None:
    header = (
        "| arm | steps | α used | held-out FM loss ↓ | Δ vs baseline (paired) | reach baseline final "
        "[step per seed] | speed-up (min–max) | baseline-equivalent steps (ratio, min–max) | frac < α | "
        "mean ‖Δh‖ | sinusoid FD ↓ |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    by_name = {a.name: a for a in arms}

    def label(name: str) -> str:
        a = by_name[name]
        if not a.anm:
            return "baseline (no ANM)"
        return f"{name} (α={a.alpha:g}, λ={a.lam:g}, {a.scaling})"

    steps = cfg["steps"]
    alpha_names = [arm_name(s, a, PAPER_LAMBDA) for s in ("raw", "matched") for a in ALPHA_GRID]
    lam_names = [arm_name(s, PAPER_ALPHA, lam) for s in ("raw", "matched") for lam in LAMBDA_GRID]
    default = arm_name("matched", PAPER_ALPHA, PAPER_LAMBDA)
    form_names = [default] + [a.name for a in arms if a.name.startswith(default + "_") or a.scaling == "rms"]
    lines = [
        f"# ANM ablation tables ({cfg['budget']} budget)",
        "",
        f"SiT D={cfg['hidden']}, depth {cfg['depth']}, {cfg['image_size']}×{cfg['image_size']} images, "
        f"patch {cfg['patch_size']}, batch {cfg['batch']}, {steps} steps, AdamW lr {cfg['lr']}, seeds "
        f"{list(cfg['seeds'])}. Mean ± sample std over seeds. 'Δ vs baseline' is the per-seed relative "
        "change of the final held-out FM loss (negative = better). 'reach baseline final' counts seeds "
        "whose held-out FM loss reaches the same seed's baseline final value at a logged step (every "
        f"{cfg['eval_every']} steps); speed-up = baseline steps / arm steps over those seeds. "
        "'baseline-equivalent steps' = the step at which the "
        "same seed's baseline first reached the arm's final loss, and its ratio to the arm's steps (< 1 = "
        "slower; 'ahead' = below the whole baseline curve). frac < α and "
        "‖Δh‖ are held-out at the end (frac at the arm's own site/reduce/α). 'matched' = α·√(D/1152). "
        "sinusoid FD: Fréchet distance of the fitted sinusoid parameters of the samples vs real images "
        "(real-vs-real floor and validity rate in summary.json).",
        "",
    ]
    for dataset in summary:
        for title, names in (
            (f"Tab. 3 shape — effect of α (λ=10), {dataset}", ["baseline"] + alpha_names),
            (f"Tab. 4 shape — effect of λ (α=70), {dataset}", ["baseline"] + lam_names),
            (f"Form study (matched α=70, λ=10; one factor at a time), {dataset}", ["baseline"] + form_names),
        ):
            lines += [f"## {title}", "", header] + table_rows(summary, dataset, names, label, steps) + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_csv(runs: dict, summary: dict, path: str) -> None:
    fields = [
        "dataset",
        "seed",
        "arm",
        "alpha_used",
        "lam",
        "scaling",
        "site",
        "reduce",
        "objective",
        "granularity",
        "warmup_steps",
        "final_heldout",
        "rel_vs_baseline_pct",
        "steps_to_baseline",
        "speedup",
        "final_frac_below",
        "final_norm_update",
        "final_norm_output",
        "sinusoid_frechet",
        "sinusoid_validity",
        "diverged_at",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for dataset, by_arm in runs.items():
            base = by_arm.get("baseline", {})
            for name, seeds in by_arm.items():
                speed = summary[dataset][name].get("speed", {}).get("per_seed", {})
                for seed, r in sorted(seeds.items()):
                    a, metric = r["arm"], r.get("sample_metric", {})
                    rel = 100 * (r["heldout"][-1] / base[seed]["heldout"][-1] - 1) if seed in base else None
                    writer.writerow(
                        dict(
                            dataset=dataset,
                            seed=seed,
                            arm=name,
                            alpha_used=r["alpha_used"],
                            lam=a["lam"],
                            scaling=a["scaling"],
                            site=a["site"],
                            reduce=r["reduce"],
                            objective=a["objective"],
                            granularity=a["granularity"],
                            warmup_steps=r["warmup_steps"],
                            final_heldout=r["heldout"][-1],
                            rel_vs_baseline_pct=rel,
                            steps_to_baseline=speed.get(seed, {}).get("steps"),
                            speedup=speed.get(seed, {}).get("speedup"),
                            final_frac_below=r["frac_below"][-1],
                            final_norm_update=float(np.mean(r["norm_update"][-1])),
                            final_norm_output=float(np.mean(r["norm_output"][-1])),
                            sinusoid_frechet=metric.get("frechet"),
                            sinusoid_validity=metric.get("validity"),
                            diverged_at=r["diverged_at"],
                        )
                    )


def write_plots(runs: dict, summary: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(runs)
    default = arm_name("matched", PAPER_ALPHA, PAPER_LAMBDA)
    paths = []

    def band(ax, seeds: dict, key: str, label: str, reduce_layers: bool = False) -> None:
        steps = next(iter(seeds.values()))["steps"]
        curves = []
        for r in seeds.values():
            values = [float(np.mean(v)) if reduce_layers else v for v in r[key]]
            if len(values) == len(steps):
                curves.append(values)
        if not curves:
            return
        curves = np.array(curves, dtype=float)
        (line,) = ax.plot(steps, curves.mean(0), label=label)
        ax.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)

    # 1. Held-out FM loss curves, seed min-max bands.
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        by_arm = runs[dataset]
        ranked = sorted(
            (e["final_heldout"][0], n)
            for n, e in summary[dataset].items()
            if n != "baseline" and e["final_heldout"][0] is not None
        )
        # rms_a70_l10 is left out: it is the matched arm up to float rounding (same curve).
        show = ["baseline", arm_name("raw", PAPER_ALPHA, PAPER_LAMBDA), default, default + "_site-output"]
        show += [n for _, n in ranked[:2] if n not in show]  # the two best ANM arms by final loss
        for name in show:
            if name in by_arm:
                band(ax, by_arm[name], "heldout", name)
        ax.set(
            title=f"{dataset}: held-out FM loss (mean, seed min–max)",
            xlabel="step",
            ylabel="FM loss",
            yscale="log",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "curves.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 2. Final held-out loss vs alpha and vs lambda (raw and matched), baseline as a band.
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        s = summary[dataset]
        for ax, grid, param, make in (
            (row[0], ALPHA_GRID, "α (λ=10)", lambda sc, v: arm_name(sc, v, PAPER_LAMBDA)),
            (row[1], LAMBDA_GRID, "λ (α=70)", lambda sc, v: arm_name(sc, PAPER_ALPHA, v)),
        ):
            if "baseline" in s:
                m, sd = s["baseline"]["final_heldout"]
                ax.axhline(m, color="k", label="baseline")
                ax.axhspan(m - sd, m + sd, color="k", alpha=0.1)
            for scaling in ("raw", "matched"):
                xs = [v for v in grid if make(scaling, v) in s]
                ms = [s[make(scaling, v)]["final_heldout"] for v in xs]
                if xs:
                    ax.errorbar(
                        xs,
                        [m[0] for m in ms],
                        yerr=[m[1] for m in ms],
                        marker="o",
                        capsize=3,
                        label=f"{scaling} α" if scaling == "raw" else "matched α·√(D/1152)",
                    )
            ax.set(
                xscale="log" if grid is ALPHA_GRID else "linear",
                xlabel=param,
                ylabel="final held-out FM loss",
                title=dataset,
            )
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "grids.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 3. Mean residual-update norm and fraction of tokens below alpha over training.
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 7), squeeze=False)
    for col, dataset in enumerate(datasets):
        by_arm = runs[dataset]
        for name in [
            "baseline",
            arm_name("raw", PAPER_ALPHA, PAPER_LAMBDA),
            default,
            default + "_site-output",
            default + "_wu50",
        ]:
            if name in by_arm:
                band(axes[0][col], by_arm[name], "norm_update", name, reduce_layers=True)
                band(axes[1][col], by_arm[name], "frac_below", name)
        axes[0][col].set(title=f"{dataset}: mean held-out ‖Δh‖ (all layers)", xlabel="step", yscale="log")
        axes[1][col].set(title=f"{dataset}: fraction of tokens below the arm's α", xlabel="step")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "norms.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


#################################################################################
#                                   Main                                        #
#################################################################################


def main(args: argparse.Namespace) -> dict:
    cfg = dict(BUDGETS[args.budget], budget=args.budget)
    for key in ("steps", "eval_every", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.seeds is not None:
        cfg["seeds"] = tuple(args.seeds)
    if args.datasets is not None:
        cfg["datasets"] = tuple(args.datasets)
    arms = build_arms()
    wanted = args.arms or cfg["arms"]
    if wanted:
        unknown = set(wanted) - {a.name for a in arms}
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}; known: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in wanted]
    cfg["seeds"], cfg["datasets"] = list(cfg["seeds"]), list(cfg["datasets"])
    cfg_key = {k: v for k, v in cfg.items() if k not in ("arms", "workers")}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = args.out or os.path.join("results", "ablate", args.budget)
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()

    # One job per (dataset, seed) holding only the arms not cached yet; seeds outermost so a run cut short
    # still has complete seeds for both datasets.
    jobs = []
    for seed in cfg["seeds"]:
        for dataset in cfg["datasets"]:
            missing = [a for a in arms if read_cached(out_dir, dataset, seed, a.name, cfg_key) is None]
            if missing:
                jobs.append((cfg_key, dataset, seed, missing, out_dir, device))
    print(f"[ablate] {len(arms)} arms, {len(jobs)} (dataset, seed) groups to train -> {out_dir}", flush=True)
    workers = min(cfg["workers"], len(jobs)) if device == "cpu" else 1
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(train_group, jobs):
                pass
    else:
        for job in jobs:
            train_group(job)

    runs = load_runs(out_dir, cfg_key, arms)
    summary = summarize(runs, arms)
    meta = dict(
        budget=args.budget,
        config=cfg_key,
        device=device,
        torch=torch.__version__,
        arms=[asdict(a) for a in arms],
        wall_s_this_call=time.time() - start,
        group_wall_s={  # every arm of a (dataset, seed) group stores the group's wall time: read the first
            f"{d}/seed{s}": first_arm[s]["group_wall_s"]
            for d, first_arm in ((d, next(iter(runs[d].values()))) for d in runs)
            for s in cfg["seeds"]
            if s in first_arm
        },
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(meta=meta, summary=summary), f, indent=1, default=str)
    write_csv(runs, summary, os.path.join(out_dir, "runs.csv"))
    write_tables(summary, arms, cfg, os.path.join(out_dir, "tables.md"))
    if not args.no_plots and runs:
        write_plots(runs, summary, out_dir)
    print(f"[ablate] done in {time.time() - start:.0f}s: {out_dir}/tables.md", flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ANM ablation (supplement Tab. 3/4 + form study) at small scale."
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--out", type=str, default=None, help="default: results/ablate/<budget>")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's training steps")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
    parser.add_argument("--arms", nargs="+", default=None, help="only these arm names (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="parallel (dataset, seed) groups on CPU")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-plots", action="store_true")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
