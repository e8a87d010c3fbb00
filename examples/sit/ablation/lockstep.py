"""Lock-step training of one (dataset, seed) group of ablation arms.

Every arm of a group starts from the same initial weights (one model per seed, deep-copied per arm) and
trains on the same batch, the same t and the same noise at every step; each arm's record stores a
checksum of its initial weights and of the data it consumed, so that this can be checked. At every
evaluation each arm is measured on one fixed held-out set (evaluation/heldout.py); at the end, sinusoid arms are
sampled for the sinusoid metric.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from data.fashion_mnist import FashionMNISTDataset
from data.sinusoids import make_sinusoids
from evaluation.heldout import HeldoutSet, make_heldout, measure
from evaluation.sinusoid_metric import SinusoidMetric
from modeling.models import SiT
from modeling.samplers import Sampler
from modeling.transport import create_transport
from regularizers.dispersive import DispersiveTerm, dispersive_layers
from regularizers.repa import load_encoder
from regularizers.repa_term import RepaTerm, repa_depth
from torch import nn

import anm
from ablation.arms import Arm, Budget, repa_projector_dim
from ablation.records import write_record

__all__ = ["Job", "Stream", "train_group", "checksum"]

HELDOUT_SEED = 999  # one held-out set for every seed and arm
SAMPLE_SEED = 777  # the starting noise of the metric's samples
METRIC_SEED = 1234  # the metric's real reference sets


@dataclass(frozen=True)
class Job:
    """One (dataset, seed) group: the arms still to train there, and where to write their records."""

    budget: Budget
    dataset: str
    seed: int
    arms: tuple[Arm, ...]
    out_dir: str
    device: str


#################################################################################
#                                Data stream                                    #
#################################################################################


def load_fashion_mnist(image_size: int, split: str) -> torch.Tensor:
    """Fashion-MNIST as one (N, 1, S, S) float tensor in [-1, 1]."""
    return FashionMNISTDataset(split=split, image_size=image_size).tensors()[0]


class Stream:
    """Deterministic training batches (x, t, noise) and a fixed held-out set for one (dataset, seed)."""

    def __init__(self, dataset: str, seed: int, budget: Budget):
        self.batch, self.size = budget.batch, budget.image_size
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        held_gen = torch.Generator().manual_seed(HELDOUT_SEED)
        if dataset == "sinusoid":
            self.train = None  # fresh draws every step: an unlimited training set
            images, _ = make_sinusoids(budget.eval_n, self.size, held_gen)
        elif dataset == "fashion-mnist":
            self.train = load_fashion_mnist(self.size, "train")
            images = load_fashion_mnist(self.size, "test")[: budget.eval_n]
        else:
            raise ValueError(f"unknown dataset {dataset!r}")
        self.heldout: HeldoutSet = make_heldout(images, generator=held_gen)
        self.channels = images.shape[1]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next training batch: images, times and noise."""
        g = self.generator
        if self.train is None:
            x, _ = make_sinusoids(self.batch, self.size, g)
        else:
            x = self.train[torch.randint(len(self.train), (self.batch,), generator=g)]
        t = torch.rand(self.batch, generator=g)
        noise = torch.randn(x.shape, generator=g)
        return x, t, noise


#################################################################################
#                                 Per-arm state                                 #
#################################################################################


@dataclass
class ArmLog:
    """What a record keeps of one arm: curves at every evaluation, checksums, divergence, sample metric."""

    steps: list[int] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    norm_update: list[list[float]] = field(default_factory=list)  # per block
    norm_output: list[list[float]] = field(default_factory=list)
    frac_below: list[float] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)  # mean since the previous evaluation
    anm_loss: list[float | None] = field(default_factory=list)
    init_checksum: float = 0.0
    data_checksum: float = 0.0
    diverged_at: int | None = None
    sample_metric: dict[str, float] | None = None


@dataclass
class LossMeans:
    """Running sums of the FM and ANM losses since the last evaluation."""

    fm: float = 0.0
    anm: float = 0.0
    count: int = 0

    def add(self, fm: float, reg: float) -> None:
        self.fm, self.anm, self.count = self.fm + fm, self.anm + reg, self.count + 1

    def pop(self) -> tuple[float | None, float | None]:
        """The means (None before any step), and a fresh start."""
        means = (self.fm / self.count, self.anm / self.count) if self.count else (None, None)
        self.fm, self.anm, self.count = 0.0, 0.0, 0
        return means


@dataclass
class ArmRun:
    """One arm in training: its bare network, the (ANM-wrapped) model it trains, optimizer and log."""

    arm: Arm
    net: SiT
    model: nn.Module
    opt: torch.optim.Optimizer
    alpha_used: float  # the baseline's is the default arm's: where its frac below alpha is counted
    log: ArmLog
    since_eval: LossMeans = field(default_factory=LossMeans)
    disp: DispersiveTerm | None = None  # the arm's Dispersive Loss, hooked on net
    repa: RepaTerm | None = None  # the arm's REPA term, hooked on net

    @property
    def active(self) -> bool:
        return self.log.diverged_at is None


#################################################################################
#                                  Helpers                                      #
#################################################################################


def checksum(tensors: Iterable[torch.Tensor]) -> float:
    """A float fingerprint of tensors (weights or batches), to check arms share them."""
    return float(sum(t.detach().double().abs().sum().item() + t.detach().double().sum().item() for t in tensors))


def make_model(budget: Budget, channels: int) -> SiT:
    """The ablation's SiT. Unconditional (one class, no label dropout: that would draw from torch's global RNG)."""
    return SiT(input_size=budget.image_size, patch_size=budget.patch_size, in_channels=channels,
               hidden_size=budget.hidden, depth=budget.depth, num_heads=budget.heads, class_dropout_prob=0.0,
               num_classes=1)


def start_repa(arm: Arm, net: SiT, budget: Budget, encoder: nn.Module | None) -> RepaTerm | None:
    """The arm's REPA term: the block repa_depth picks, a width-matched projector initialised the same in every
    arm, the encoder at the size it was made for (the stand-in's: the ablation's images)."""
    if not arm.repa:
        return None
    if encoder is None:
        raise ValueError(f"arm {arm.name!r} needs an encoder: ablate.py --repa-encoder PATH or stand-in")
    block = [name for name, _ in anm.find_blocks(net)][repa_depth(budget.depth) - 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        term = RepaTerm(net, block, encoder, budget.image_size // budget.patch_size, budget.hidden,
                        lam=arm.repa_lambda, projector_dim=repa_projector_dim(budget.hidden),
                        resolution=encoder.config.image_size)
    term.projector.to(next(net.parameters()).device)
    return term


def start_arm(arm: Arm, base: SiT, budget: Budget, encoder: nn.Module | None = None) -> ArmRun:
    """A copy of the shared initial model for ``arm``, wrapped in ANM if the arm uses it, its Dispersive and REPA
    terms, and its optimizer (over the REPA projector too)."""
    net = copy.deepcopy(base)  # identical initial weights in every arm
    alpha_used = arm.alpha_used(budget.hidden)
    model: nn.Module = net
    if arm.anm:
        model = anm.ANM(net, alpha=alpha_used, lam=arm.lam, warmup=arm.warmup_steps(budget.steps), site=arm.site,
                        reduce=arm.reduce, objective=arm.objective, granularity=arm.granularity)
    disp = (DispersiveTerm(net, dispersive_layers(net, arm.disp_block), lam=arm.disp_lambda, tau=arm.disp_tau,
                           distance=arm.disp_distance) if arm.dispersive else None)
    repa = start_repa(arm, net, budget, encoder)
    extra = [] if repa is None else list(repa.projector.parameters())
    opt = torch.optim.AdamW([*net.parameters(), *extra], lr=budget.lr, weight_decay=0.0)
    log = ArmLog(init_checksum=checksum(net.state_dict().values()))
    return ArmRun(arm=arm, net=net, model=model, opt=opt, alpha_used=alpha_used, log=log, disp=disp, repa=repa)


def evaluate(run: ArmRun, heldout: HeldoutSet, transport, step: int) -> None:
    """Append the held-out FM loss, mean norms per block, and the fraction of tokens below the arm's alpha
    at its own site and reduction, to the arm's log."""
    result = measure(run.net, transport, heldout, sites=("update", "output"))
    norms = result.norms[run.arm.site]
    if run.arm.reduce == "rms":
        norms = norms / math.sqrt(run.net.pos_embed.shape[-1])  # per-feature RMS, as reduce='rms' sees it
    log = run.log
    log.steps.append(step)
    log.heldout.append(result.fm_loss)
    log.norm_update.append(result.mean_per_block("update"))
    log.norm_output.append(result.mean_per_block("output"))
    log.frac_below.append(float((norms < run.alpha_used).float().mean()))
    train_loss, anm_loss = run.since_eval.pop()
    log.train_loss.append(train_loss)
    log.anm_loss.append(anm_loss)


def train_step(run: ArmRun, transport, batch: tuple[torch.Tensor, ...], step: int, batch_sum: float) -> None:
    """One optimizer step of one arm on the shared batch; a non-finite loss marks the arm diverged."""
    x, t, noise = batch
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    fm = transport.training_losses(run.model, x, dict(y=y), t=t, noise=noise)["loss"].mean()
    reg = run.model.loss(step=step) if run.arm.anm else torch.zeros((), device=x.device)
    if run.disp is not None:  # the regulariser column (anm_loss) then holds ANM + Dispersive + REPA
        reg = reg + run.disp.loss()
    if run.repa is not None:  # the images are the batch's x: the ablation trains on pixels
        reg = reg + run.repa.loss(x)
    fm_value, reg_value = torch.stack([fm.detach(), reg.detach()]).tolist()  # one sync per arm
    if not math.isfinite(fm_value + reg_value):
        run.log.diverged_at = step
        return
    run.opt.zero_grad(set_to_none=True)
    (fm + reg).backward()
    run.opt.step()
    run.since_eval.add(fm_value, reg_value)
    run.log.data_checksum += batch_sum


@torch.no_grad()
def sample_metric(run: ArmRun, metric: SinusoidMetric, sample_fn, z: torch.Tensor) -> dict[str, float]:
    """The sinusoid metric of the arm's samples from the starting noise ``z``."""
    run.net.eval()
    images = sample_fn(z, run.net, y=torch.zeros(len(z), dtype=torch.long, device=z.device)).clamp(-1, 1).cpu()
    return {k: float(v) for k, v in metric(images).items()}


def record_of(run: ArmRun, job: Job, base_init_checksum: float, wall_s: float, timing: dict) -> dict:
    """The JSON record of one trained arm."""
    log = {k: v for k, v in asdict(run.log).items() if not (k == "sample_metric" and v is None)}
    return dict(dataset=job.dataset, seed=job.seed, arm=asdict(run.arm), name=run.arm.name,
                alpha_used=run.alpha_used, reduce=run.arm.reduce,
                warmup_steps=run.arm.warmup_steps(job.budget.steps) if run.arm.anm else 0,
                base_init_checksum=base_init_checksum, config=job.budget.cache_key(run.arm.repa), **log,
                group_wall_s=wall_s, timing=timing)


#################################################################################
#                             Training one group                                #
#################################################################################


def train_group(job: Job) -> list[str]:
    """Train the arms of one (dataset, seed) in lockstep on one shared stream; one JSON record per arm."""
    torch.set_num_threads(1)  # one core per worker: several workers share the machine
    device = torch.device(job.device)
    budget, start = job.budget, time.time()
    stream = Stream(job.dataset, job.seed, budget)
    heldout = stream.heldout.to(device)
    torch.manual_seed(job.seed)
    base = make_model(budget, stream.channels).to(device)
    base_sum = checksum(base.state_dict().values())
    transport = create_transport()
    encoder = load_encoder(budget.repa_encoder).to(device) if any(arm.repa for arm in job.arms) else None
    runs = [start_arm(arm, base, budget, encoder) for arm in job.arms]
    timing = dict(setup_s=time.time() - start, train_s=0.0, eval_s=0.0, sample_s=0.0)

    def evaluate_all(step: int) -> None:
        tick = time.time()
        for run in filter(lambda r: r.active, runs):
            evaluate(run, heldout, transport, step)
        timing["eval_s"] += time.time() - tick

    evaluate_all(0)
    for step in range(budget.steps):
        tick = time.time()
        batch = stream.next()
        batch_sum = checksum(batch)  # on the host copy: no device syncs for it
        batch = tuple(v.to(device) for v in batch)
        for run in filter(lambda r: r.active, runs):  # every arm trains on exactly this batch
            train_step(run, transport, batch, step, batch_sum)
        timing["train_s"] += time.time() - tick
        if (step + 1) % budget.eval_every == 0 or step + 1 == budget.steps:
            evaluate_all(step + 1)

    # End of training only: samples for the sinusoid parameter metric (a cheap Euler ODE, few samples).
    tick = time.time()
    if job.dataset == "sinusoid":
        metric = SinusoidMetric(image_size=budget.image_size, seed=METRIC_SEED)
        sample_fn = Sampler(transport).sample_ode(num_steps=budget.sample_steps, method="euler")
        z = torch.randn(budget.sample_n, stream.channels, budget.image_size, budget.image_size,
                        generator=torch.Generator().manual_seed(SAMPLE_SEED)).to(device)
        for run in filter(lambda r: r.active, runs):
            run.log.sample_metric = sample_metric(run, metric, sample_fn, z)
    for run in runs:
        if run.arm.anm:
            run.model.close()
        for term in (run.disp, run.repa):
            if term is not None:
                term.close()
    timing["sample_s"] = time.time() - tick
    wall_s = time.time() - start
    written = [write_record(job.out_dir, record_of(run, job, base_sum, wall_s, timing)) for run in runs]
    print(f"[ablate] {job.dataset} seed {job.seed}: {len(runs)} arms x {budget.steps} steps in {wall_s:.0f}s "
          f"({', '.join(f'{k} {v:.0f}' for k, v in timing.items())})", flush=True)
    return written
