"""What the ablation runs: run budgets (model and run size) and arms (the baseline and each ANM setting).

The arms are the supplement's Tab. 3 alpha grid and Tab. 4 lambda grid, each at the raw alpha and at the
width-matched alpha (see modeling/alpha_scaling.py), plus a form study that changes one factor at a time from
the default (matched alpha = 70, lambda = 10, per-token hinge on the residual update, 10% warm-up), and Dispersive
Loss (regularizers/dispersive.py) alone and beside the default ANM arm. A named arm set (ARM_SETS, ablate.py
--search) adds the positive-control search: Dispersive Loss with one factor changed at a time (weight,
temperature, distance, block), from the paper's setting and from the cosine distance.

    >>> [arm.name for arm in build_arms()][:3]
    ['baseline', 'raw_a10_l10', 'raw_a50_l10']
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from modeling.alpha_scaling import PAPER_ALPHA, PAPER_HIDDEN, PAPER_LAMBDA, matched_alpha

__all__ = ["ALPHA_GRID", "LAMBDA_GRID", "DATASETS", "DEFAULT_ARM", "DISPERSIVE_ARM", "Budget", "BUDGETS", "Arm",
           "build_arms", "arm_name", "COSINE_ARM", "dispersive_search_arms", "all_search_arms", "ARM_SETS",
           "set_arm_names", "select_arms", "REPA_ARM", "repa_arms", "repa_projector_dim"]

ALPHA_GRID = (10.0, 50.0, 70.0, 100.0, 300.0)  # supplement Tab. 3 (lambda = 10)
LAMBDA_GRID = (2.0, 5.0, 10.0, 15.0, 20.0)  # supplement Tab. 4 (alpha = 70)
DATASETS = ("sinusoid", "fashion-mnist")
DEFAULT_WARMUP_FRAC = 0.1  # the paper's 2k steps of a 200k run is 1%; on runs this short 10% is used


#################################################################################
#                                 Budgets                                       #
#################################################################################


@dataclass(frozen=True)
class Budget:
    """Model and run size of one ablation: everything but the arms is part of a run's cache key."""

    name: str
    image_size: int
    patch_size: int
    hidden: int
    depth: int
    heads: int
    batch: int
    steps: int
    eval_every: int  # held-out evaluation every this many steps (and at the end)
    eval_n: int  # held-out images
    sample_n: int  # samples for the sinusoid metric at the end
    sample_steps: int  # Euler ODE steps of those samples
    seeds: tuple[int, ...]
    datasets: tuple[str, ...]
    lr: float
    workers: int = 1  # (dataset, seed) groups trained at once on CPU
    repa_encoder: str | None = None  # the REPA arms' encoder folder (ablate.py --repa-encoder)
    arms: tuple[str, ...] | None = None  # None: every arm of build_arms()

    def cache_key(self, uses_encoder: bool = True) -> dict:
        """The settings a cached run must match to be reused (not the arms, not the number of workers). An arm
        without REPA (``uses_encoder=False``) does not depend on the encoder, so its key holds none: a baseline
        trained beside REPA arms serves a search without them, and the other way round."""
        key = {k: v for k, v in asdict(self).items() if k not in ("name", "arms", "workers")}
        key.update(seeds=list(self.seeds), datasets=list(self.datasets), budget=self.name)
        if not uses_encoder:
            key["repa_encoder"] = None
        return key


# The CPU budget was sized from a measured ~67 ms per training step of one arm on a 2-core machine shared
# with other jobs (D=64, depth 3, 16 tokens, batch 32): 26 arms x 6 (dataset, seed) groups on 2 workers
# leave only 400 steps per arm (see docs/results.md). The lr is raised to 4e-4 so the baseline gets further
# in so few steps (same lr for every arm). The GPU budget is an estimate (never timed on a device).
BUDGETS: dict[str, Budget] = {
    "smoke": Budget("smoke", image_size=8, patch_size=4, hidden=32, depth=2, heads=2, batch=8, steps=12,
                    eval_every=4, eval_n=16, sample_n=16, sample_steps=4, seeds=(0,), datasets=("sinusoid",),
                    lr=2e-4, arms=("baseline", "matched_a70_l10")),
    "cpu": Budget("cpu", image_size=16, patch_size=4, hidden=64, depth=3, heads=4, batch=32, steps=400,
                  eval_every=40, eval_n=128, sample_n=128, sample_steps=16, seeds=(0, 1, 2), datasets=DATASETS,
                  lr=4e-4, workers=2),
    "gpu": Budget("gpu", image_size=32, patch_size=4, hidden=128, depth=4, heads=4, batch=128, steps=1500,
                  eval_every=100, eval_n=512, sample_n=512, sample_steps=32, seeds=(0, 1, 2), datasets=DATASETS,
                  lr=2e-4),
}


#################################################################################
#                                   Arms                                        #
#################################################################################


@dataclass(frozen=True)
class Arm:
    """One training configuration: the baseline (anm=False) or an ANM setting."""

    name: str
    anm: bool = True
    alpha: float = PAPER_ALPHA  # the paper's alpha (before width scaling)
    # "raw": alpha as is; "matched": alpha * sqrt(D / 1152); "rms": alpha / sqrt(1152) with reduce="rms"
    scaling: str = "matched"
    lam: float = PAPER_LAMBDA
    warmup_frac: float = DEFAULT_WARMUP_FRAC
    site: str = "update"
    objective: str = "hinge"
    granularity: str = "token"
    dispersive: bool = False  # add Dispersive Loss on one block's output
    disp_lambda: float = 0.5  # its weight (the paper's default)
    disp_tau: float = 0.5  # its temperature
    disp_distance: str = "l2"  # "l2" (InfoNCE-L2, the paper's default) or "cosine"
    disp_block: str | None = None  # None: the middle block; "0" the first, "-1" the last (dispersive_layers)
    repa: bool = False  # add REPA's alignment (regularizers/repa_term.py) to the budget's --repa-encoder
    repa_lambda: float = 0.5  # its weight (REPA's default)

    @property
    def reduce(self) -> str:
        """The norm ANM takes: "rms" for the rms scaling, else "l2"."""
        return "rms" if self.scaling == "rms" else "l2"

    def alpha_used(self, hidden: int) -> float:
        """The alpha handed to anm.ANM for a model of width ``hidden``."""
        if self.scaling == "raw":
            return self.alpha
        if self.scaling == "matched":
            return matched_alpha(self.alpha, hidden)
        return self.alpha / math.sqrt(PAPER_HIDDEN)  # rms: the per-feature RMS that alpha means at D=1152

    def warmup_steps(self, steps: int) -> int:
        """ANM warm-up of a run of ``steps`` steps."""
        return int(round(self.warmup_frac * steps))


def arm_name(scaling: str, alpha: float, lam: float) -> str:
    """'matched_a70_l10' and the like: the name of a grid arm."""
    return f"{scaling}_a{alpha:g}_l{lam:g}"


DEFAULT_ARM = arm_name("matched", PAPER_ALPHA, PAPER_LAMBDA)
DISPERSIVE_ARM = "dispersive"  # InfoNCE-L2, lambda 0.5, tau 0.5, middle block; "+anm": with DEFAULT_ARM too


def build_arms() -> list[Arm]:
    """Baseline, the Tab. 3 alpha grid and Tab. 4 lambda grid (raw and matched), and the form study.

    The form study varies one factor at a time from the default; arms that coincide are listed once.
    """
    arms = [Arm("baseline", anm=False)]
    for scaling in ("raw", "matched"):
        arms += [Arm(arm_name(scaling, a, PAPER_LAMBDA), alpha=a, scaling=scaling) for a in ALPHA_GRID]
        arms += [Arm(arm_name(scaling, PAPER_ALPHA, lam), lam=lam, scaling=scaling)
                 for lam in LAMBDA_GRID if lam != PAPER_LAMBDA]
    default = Arm(DEFAULT_ARM)
    arms += [
        replace(default, name=DEFAULT_ARM + "_site-output", site="output"),
        replace(default, name="rms_a70_l10", scaling="rms"),
        replace(default, name=DEFAULT_ARM + "_gran-sample", granularity="sample"),
        replace(default, name=DEFAULT_ARM + "_gran-batch", granularity="batch"),
        replace(default, name=DEFAULT_ARM + "_obj-exp", objective="exp"),
        replace(default, name=DEFAULT_ARM + "_wu0", warmup_frac=0.0),
        replace(default, name=DEFAULT_ARM + "_wu50", warmup_frac=0.5),
        Arm(DISPERSIVE_ARM, anm=False, dispersive=True),
        replace(default, name=DISPERSIVE_ARM + "+anm", dispersive=True),
    ]
    return arms


# The positive-control search: Dispersive Loss (lambda 0.5, tau 0.5, L2, middle block) with one factor changed.
DISP_LAMBDAS = (0.05, 0.1, 0.25)
DISP_TAUS = (1.0, 2.0)
DISP_BLOCKS = {"first": "0", "last": "-1"}


COSINE_ARM = DISPERSIVE_ARM + "_cos"  # InfoNCE-cosine, else the paper's setting


def dispersive_search_arms(distance: str = "l2") -> list[Arm]:
    """Dispersive Loss with one factor at a time changed from the ``dispersive`` arm (``distance="l2"``): its
    weight λ ('dispersive_l0.1'), temperature τ ('dispersive_t1'), the cosine distance ('dispersive_cos') and
    the block ('dispersive_first', 'dispersive_last'); with ``distance="cosine"`` the same changes of λ, τ and
    block from the cosine arm ('dispersive_cos_l0.1', ...). Not in build_arms(): chosen by name or ARM_SETS.

    >>> [a.name for a in dispersive_search_arms()][:2], dispersive_search_arms("cosine")[0].name
    (['dispersive_l0.05', 'dispersive_l0.1'], 'dispersive_cos_l0.05')
    """
    base = Arm(DISPERSIVE_ARM, anm=False, dispersive=True)
    if distance != "l2":
        base = replace(base, name=COSINE_ARM, disp_distance=distance)
    arms = [replace(base, name=f"{base.name}_l{lam:g}", disp_lambda=lam) for lam in DISP_LAMBDAS]
    arms += [replace(base, name=f"{base.name}_t{tau:g}", disp_tau=tau) for tau in DISP_TAUS]
    if distance == "l2":
        arms.append(replace(base, name=COSINE_ARM, disp_distance="cosine"))
    arms += [replace(base, name=f"{base.name}_{where}", disp_block=block) for where, block in DISP_BLOCKS.items()]
    return arms


def all_search_arms() -> list[Arm]:
    """Every arm of the searches and REPA's (not in build_arms())."""
    return dispersive_search_arms() + dispersive_search_arms("cosine") + repa_arms()


# Named arm sets (ablate.py --search NAME): the baseline and the arms of one search. "dispersive-cos" is the
# second round: the same changes from the cosine arm, the one that came closest in the first round.
ARM_SETS: dict[str, tuple[str, ...]] = {
    "dispersive": ("baseline", DISPERSIVE_ARM, *(a.name for a in dispersive_search_arms())),
    "dispersive-cos": ("baseline", DISPERSIVE_ARM, COSINE_ARM, *(a.name for a in dispersive_search_arms("cosine"))),
}


REPA_ARM = "repa"  # REPA, lambda 0.5, the block repa_depth picks, a width-matched projector; "+anm": with DEFAULT_ARM


def repa_arms() -> list[Arm]:
    """REPA alone, beside the default ANM arm and beside Dispersive Loss, and at a tenth of its weight. They need
    an encoder (ablate.py --repa-encoder), so they are in no arm list but ARM_SETS["repa"].

    >>> [a.name for a in repa_arms()]
    ['repa', 'repa+anm', 'repa+dispersive', 'repa_l0.05']
    """
    base = Arm(REPA_ARM, anm=False, repa=True)
    return [base, replace(Arm(DEFAULT_ARM), name=REPA_ARM + "+anm", repa=True),
            replace(base, name=REPA_ARM + "+dispersive", dispersive=True),
            replace(base, name=REPA_ARM + "_l0.05", repa_lambda=0.05)]


def repa_projector_dim(hidden: int) -> int:
    """REPA's projector width (2048 at SiT-XL's 1152) scaled with the model's width, as alpha is matched.

    >>> repa_projector_dim(1152), repa_projector_dim(64)
    (2048, 114)
    """
    return max(1, round(2048 * hidden / PAPER_HIDDEN))


ARM_SETS["repa"] = ("baseline", DISPERSIVE_ARM, DEFAULT_ARM, *(a.name for a in repa_arms()))


def set_arm_names(search: str) -> tuple[str, ...]:
    """The arm names of the arm set ``search``; ValueError names the known sets."""
    if search not in ARM_SETS:
        raise ValueError(f"unknown arm set {search!r}; known: {sorted(ARM_SETS)}")
    return ARM_SETS[search]


def select_arms(names: tuple[str, ...] | list[str] | None) -> list[Arm]:
    """The arms called ``names``, in build_arms() order and then the search arms' (build_arms() for None);
    ValueError names unknown ones."""
    arms = build_arms()
    if not names:
        return arms
    arms += all_search_arms()
    unknown = sorted(set(names) - {a.name for a in arms})
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {[a.name for a in arms]}")
    return [a for a in arms if a.name in names]
