"""
Train SiT (flow matching) with optional Activation-Norm Maximization (ANM), with PyTorch DDP.

    torchrun --nproc_per_node 8 examples/sit/train.py --data latents --data-path latents/ \
        --model SiT-B/4 --anm
    python examples/sit/train.py --data sinusoid --model SiT-T/4 --max-steps 2000   # CPU, one process

Time convention (as the reference SiT): t=0 is pure noise, t=1 is data.
Layout of a run: <results-dir>/<exp-name>/{checkpoints/, samples/, log.csv, log.txt}.
A run resumes bit-exactly (weights, EMA, optimizer, RNG streams, data position, ANM warm-up) from a
checkpoint with --resume PATH, or --resume auto (latest checkpoint of this experiment, if any).
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import logging
import math
import os
import random
import re
import time
from collections import OrderedDict
from copy import deepcopy
from glob import glob
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from data import build_dataset
from models import SIT_SIZES, SiT
from sample import decode_to_uint8, generate, load_vae, save_grid
from samplers import Sampler as FlowSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm
from transport import create_transport

import anm

LATENT_SCALE = 0.18215  # SD-VAE latent scaling used by DiT/SiT

# (depth, hidden size, heads): the official SiT sizes plus two tiny ones that are not in the paper,
# "T" for the CPU demo and "N" for tests. --depth/--hidden-size/--num-heads override any of them.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {**SIT_SIZES, "T": (4, 64, 4), "N": (2, 32, 2)}


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """Step the EMA model towards the current model: ema = decay * ema + (1 - decay) * model."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    """Set requires_grad for all parameters of a model."""
    for p in model.parameters():
        p.requires_grad = flag


class TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def create_logger(logging_dir: str | None, rank: int, console: bool = True) -> logging.Logger:
    """A logger that writes to the console and <logging_dir>/log.txt on rank 0 and is silent elsewhere."""
    logger = logging.getLogger("sit-train")
    for handler in logger.handlers:  # main() may run several times in one process (tests, demo.py)
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0 and logging_dir is not None:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [logging.FileHandler(os.path.join(logging_dir, "log.txt"))]
        if console:
            handlers.append(TqdmHandler())
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file, then rename: a crash mid-write never leaves a truncated checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX within one file system
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """Path of the highest-step checkpoint in a directory, or None."""
    paths = [p for p in glob(os.path.join(checkpoint_dir, "*.pt"))
             if re.fullmatch(r"\d+\.pt", os.path.basename(p))]
    return max(paths, key=lambda p: int(os.path.basename(p)[:-3])) if paths else None


def parse_model_name(name: str) -> tuple[str, int]:
    """'SiT-XL/2' -> ('XL', 2)."""
    match = re.fullmatch(r"SiT-(\w+)/(\d+)", name)
    if match is None or match.group(1) not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}: use SiT-<{'|'.join(MODEL_SIZES)}>/<patch>, e.g. SiT-XL/2")
    return match.group(1), int(match.group(2))


def model_config(args: argparse.Namespace, in_channels: int, input_size: int, num_classes: int) -> dict:
    """Keyword arguments for SiT(...): the named size, with --depth/--hidden-size/--num-heads overrides."""
    size, patch_size = parse_model_name(args.model)
    depth, hidden_size, num_heads = MODEL_SIZES[size]
    return dict(
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=args.hidden_size or hidden_size,
        depth=args.depth or depth,
        num_heads=args.num_heads or num_heads,
        num_classes=num_classes,
        class_dropout_prob=args.class_dropout_prob,
        learn_sigma=False,  # velocity only; official learn_sigma checkpoints are sliced on load
    )


def anm_layers(spec: str) -> str | list[str]:
    """--anm-layers: 'auto', a glob, or a comma-separated list of globs."""
    return spec if "," not in spec else [part.strip() for part in spec.split(",") if part.strip()]


def setup_distributed() -> tuple[int, int, int, torch.device, bool]:
    """Join the torchrun process group if launched by torchrun; else a single process. Returns
    (rank, local_rank, world_size, device, created) where created says whether we made the group."""
    created = False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        created = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, local_rank, world_size = 0, 0, 1
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return rank, local_rank, world_size, device, created


def all_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if world_size > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size
    return values


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """obj (tensors, containers, numbers) from every rank, in rank order (on every rank)."""
    if world_size == 1:
        return [obj]
    # Sent as torch.save bytes: all_gather_object's own pickling of tensors fails to load in some versions.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in out]


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Every random stream a training step draws from, for bit-exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_torch(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),  # noise and t of the flow-matching loss, VAE posterior samples
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _numpy_state_to_torch(state: tuple) -> tuple:
    # numpy's key array as a tensor, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Inverse of rng_state."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StreamSampler(Sampler):
    """DistributedSampler's shuffled per-rank order (drop_last), startable mid-epoch; yields
    (index, item seed) so that per-item augmentations replay identically after a resume."""

    def __init__(self, num_items: int, local_batch: int, rank: int, world_size: int, seed: int) -> None:
        self.order = DistributedSampler(range(num_items), world_size, rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.local_batch, self.seed = local_batch, seed
        self.steps_per_epoch = len(self.order) // local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {num_items} items is too small for a global batch of "
                             f"{local_batch * world_size}: lower --global-batch-size")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        """Next iteration yields epoch `epoch` from its `start_step`-th batch on."""
        self.epoch, self.start_step = epoch, start_step
        self.order.set_epoch(epoch)

    def __iter__(self):
        begin, end = self.start_step * self.local_batch, self.steps_per_epoch * self.local_batch
        for index in list(self.order)[begin:end]:
            yield index, ((self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + index) % 2**63

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch


class SeededItems(Dataset):
    """Wraps a dataset so each item is drawn with its own RNG seeded by the sampler (see StreamSampler)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.takes_generator = "generator" in inspect.signature(type(dataset).__getitem__).parameters

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if self.takes_generator:
            return self.dataset.__getitem__(index, generator=torch.Generator().manual_seed(seed))
        # Datasets that draw from the global RNGs (e.g. a random flip): seed them per item, then restore
        # the training process's own streams (with num_workers=0 this runs in the main process).
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class CSVLog:
    """CSV of logged metrics, one row per logged step. A row with new columns (e.g. ANM stats after the
    step-0 evaluation) rewrites the header; on resume, rows past the resumed step are dropped so the log
    matches the weights."""

    def __init__(self, path: str, resume_step: int | None) -> None:
        self.path, self.fields = path, None
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = reader.fieldnames
                rows = [row for row in reader if int(row["step"]) <= resume_step]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(rows)
        elif os.path.exists(path):
            os.remove(path)

    def write(self, row: dict) -> None:
        if self.fields is None or any(key not in self.fields for key in row):
            rows = []
            if self.fields is not None:
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.fields = list(self.fields or []) + [key for key in row if key not in (self.fields or [])]
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, restval="")
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)


LOG_FIELDS = ["step", "epoch", "fm_loss", "anm_loss", "loss", "steps_per_sec", "img_per_sec",
              "heldout_fm_loss", "heldout_fm_loss_ema", "elapsed_s"]


def build_heldout(args: argparse.Namespace, train_set: Dataset, image_size: int, device: torch.device,
                  vae: nn.Module | None) -> dict[str, torch.Tensor]:
    """A fixed held-out batch for the FM-loss evaluation: data, labels, noise and a uniform t grid.

    sinusoid: fresh images from another seed; fashion-mnist: the test split; imagenet/latents: the
    dataset at --eval-data-path, else the last --eval-samples items of the training set (then it is
    a fixed monitoring set, not a held-out one)."""
    if args.data == "sinusoid":
        dataset = build_dataset("sinusoid", num_samples=args.eval_samples, image_size=image_size,
                                seed=args.global_seed + 1_000_003)[0]
    elif args.data == "fashion-mnist":
        dataset = build_dataset("fashion-mnist", root=args.data_path or "/usr/share/datasets/fashion-mnist",
                                split="test", image_size=image_size)[0]
    elif args.eval_data_path is not None:
        dataset = build_dataset(args.data, **data_kwargs(args, args.eval_data_path))[0]
    else:
        dataset = train_set
    n = min(args.eval_samples, len(dataset))
    start = len(dataset) - n if dataset is train_set else 0
    gen = torch.Generator().manual_seed(12345)  # fixed: every run sees the same held-out noise
    items = []
    for i in range(start, start + n):
        if "generator" in inspect.signature(type(dataset).__getitem__).parameters:
            items.append(dataset.__getitem__(i, generator=gen))
        else:
            items.append(dataset[i])
    x = torch.stack([item[0] for item in items]).to(device)
    y = torch.tensor([int(item[1]) for item in items], device=device)
    if vae is not None:
        with torch.no_grad():
            x = torch.cat([vae.encode(chunk).latent_dist.mean * LATENT_SCALE for chunk in x.split(32)])
    noise = torch.randn(x.shape, generator=gen).to(device)
    t = ((torch.arange(n, dtype=torch.float32) + 0.5) / n).to(device)  # uniform grid over (0, 1)
    return dict(x=x, y=y, noise=noise, t=t)


@torch.no_grad()
def heldout_loss(model: nn.Module, transport, heldout: dict, batch_size: int, rank: int,
                 world_size: int) -> float:
    """Mean FM loss of `model` on the fixed held-out set (no RNG used); the set is split over ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=heldout["x"].device, dtype=torch.float64)
    indices = torch.arange(rank, heldout["x"].shape[0], world_size, device=heldout["x"].device)
    for chunk in indices.split(batch_size):
        out = transport.training_losses(model, heldout["x"][chunk], dict(y=heldout["y"][chunk]),
                                        t=heldout["t"][chunk], noise=heldout["noise"][chunk])
        total += torch.stack([out["loss"].double().sum(), total.new_tensor(float(len(chunk)))])
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def data_kwargs(args: argparse.Namespace, path: str | None) -> dict:
    """Keyword arguments of data.build_dataset for --data."""
    if args.data == "sinusoid":
        return dict(num_samples=args.data_size, image_size=args.image_size, seed=args.global_seed)
    if args.data == "fashion-mnist":
        return dict(root=path or "/usr/share/datasets/fashion-mnist", split="train",
                    image_size=args.image_size)
    if path is None:
        raise ValueError(f"--data {args.data} needs --data-path")
    if args.data == "imagenet":
        return dict(root=path, image_size=args.image_size)
    return dict(path=path)


#################################################################################
#                                  Training Loop                                #
#################################################################################

def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns final metrics, paths and the (unwrapped) model and EMA."""
    rank, local_rank, world_size, device, created_group = setup_distributed()
    assert args.global_batch_size % world_size == 0, "global batch size must be divisible by world size"
    local_batch = args.global_batch_size // world_size
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator = torch.Generator(device).manual_seed(seed)  # noise / t of the loss, VAE posterior samples
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference trains in fp32 with TF32
        torch.backends.cudnn.allow_tf32 = True

    # Experiment folder and resume point:
    kind = "anm" if args.anm else "baseline"
    exp_name = args.exp_name or f"{args.model.replace('/', '-')}-{args.data}-{kind}"
    experiment_dir = os.path.join(args.results_dir, exp_name)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    sample_dir = os.path.join(experiment_dir, "samples")
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        os.makedirs(sample_dir, exist_ok=True)
    if world_size > 1:
        dist.barrier()
    logger = create_logger(experiment_dir, rank, console=args.console_log)
    resume_path = latest_checkpoint(checkpoint_dir) if args.resume == "auto" else args.resume
    checkpoint = torch.load(resume_path, map_location="cpu", weights_only=True) if resume_path else None
    logger.info(f"Experiment directory: {experiment_dir}  (rank {rank}/{world_size}, device {device})")

    # Data:
    vae = load_vae(args.vae, device) if args.data == "imagenet" else None
    dataset, data_channels, data_size, num_classes = build_dataset(args.data,
                                                                   **data_kwargs(args, args.data_path))
    latent = args.data in ("imagenet", "latents")
    in_channels, input_size = (4, data_size // 8) if args.data == "imagenet" else (data_channels, data_size)
    sampler = StreamSampler(len(dataset), local_batch, rank, world_size, seed=args.global_seed)
    loader = DataLoader(
        SeededItems(dataset), batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # keeps the DataLoader off the global RNG
    )
    steps_per_epoch = sampler.steps_per_epoch
    max_steps = args.max_steps
    if args.epochs is not None:
        max_steps = min(max_steps or math.inf, args.epochs * steps_per_epoch)
    logger.info(f"Dataset {args.data}: {len(dataset):,} items, {steps_per_epoch:,} steps/epoch, "
                f"training for {max_steps:,} steps")

    # Model, EMA, ANM, optimizer:
    config = model_config(args, in_channels, input_size, num_classes)
    raw = SiT(**config).to(device)  # the bare model: its state_dict is what checkpoints hold
    ema = deepcopy(raw).to(device)  # copied before ANM hooks exist on `raw`
    requires_grad(ema, False)
    raw.grad_checkpointing = args.grad_checkpointing  # non-reentrant torch.utils.checkpoint per block
    anm_model = None
    model: nn.Module = raw
    if args.anm:
        # Before DDP / compile: hooks must exist before the first (compiled) call.
        anm_model = anm.ANM(raw, alpha=args.anm_alpha, lam=args.anm_lambda, warmup=args.anm_warmup,
                            site=args.anm_site, layers=anm_layers(args.anm_layers), reduce=args.anm_reduce,
                            objective=args.anm_objective, granularity=args.anm_granularity)
        model = anm_model
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    transport = create_transport(args.path_type, args.prediction)
    logger.info(f"SiT {config}: {sum(p.numel() for p in raw.parameters()):,} parameters"
                + (f"; ANM alpha={args.anm_alpha} lambda={args.anm_lambda} warmup={args.anm_warmup} "
                   f"site={args.anm_site} reduce={args.anm_reduce}" if args.anm else "; no ANM"))

    train_steps, epoch, epoch_step = 0, 0, 0
    if checkpoint is None:
        update_ema(ema, raw, decay=0)  # exact copy (already true after deepcopy; kept for clarity)
    else:
        raw.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        opt.load_state_dict(checkpoint["opt"])  # after creating the optimizer (a reference bug otherwise)
        train_steps, epoch, epoch_step = checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]
        if anm_model is not None and checkpoint.get("anm") is not None:
            anm_model.load_anm_state_dict(checkpoint["anm"])
        if checkpoint["world_size"] == world_size:
            set_rng_state(checkpoint["rng"][rank], generator, device)
        else:  # same data order per step, fresh random streams
            logger.info(f"world size changed ({checkpoint['world_size']} -> {world_size}): reseeding RNGs")
            generator.manual_seed(seed + train_steps)
            torch.manual_seed(seed + train_steps)
        logger.info(f"Resumed from {resume_path} at step {train_steps} (epoch {epoch}, batch {epoch_step})")
    del checkpoint
    model.train()
    ema.eval()

    # Held-out set and the fixed noise / labels of the sample grids:
    heldout = build_heldout(args, dataset, data_size, device, vae) if args.eval_every > 0 else None
    grid_gen = torch.Generator().manual_seed(args.global_seed)
    grid_noise = torch.randn(args.sample_grid, in_channels, input_size, input_size, generator=grid_gen)
    grid_noise = grid_noise.to(device)
    grid_labels = torch.randint(0, num_classes, (args.sample_grid,), generator=grid_gen).to(device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    csv_log = CSVLog(os.path.join(experiment_dir, "log.csv"), train_steps if resume_path else None) \
        if rank == 0 else None
    tb = None
    if rank == 0 and args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(experiment_dir, "tb"))
        except ImportError:
            logger.info("tensorboard not installed: logging to log.csv only")

    def log_row(row: dict) -> None:
        row = {k: row.get(k, "") for k in LOG_FIELDS} | {k: v for k, v in row.items() if k not in LOG_FIELDS}
        if csv_log is not None:
            csv_log.write(row)
        if tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float):
                    tb.add_scalar(key, value, row["step"])

    def evaluate(step: int) -> dict:
        losses = [heldout_loss(net, transport, heldout, args.eval_batch_size, rank, world_size)
                  for net in (raw, ema)]
        return dict(heldout_fm_loss=losses[0], heldout_fm_loss_ema=losses[1])

    def save_checkpoint(step: int) -> str:
        rng = gather_objects(rng_state(generator, device), world_size)  # every rank's streams
        path = os.path.join(checkpoint_dir, f"{step:07d}.pt")
        if rank == 0:
            atomic_save({
                "model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "epoch": epoch, "epoch_step": epoch_step,  # data position
                "rng": rng, "world_size": world_size,
                "anm": anm_model.anm_state_dict() if anm_model is not None else None,
                "args": vars(args), "model_config": config,  # sample.py rebuilds the model from these
                "latent": latent, "vae": args.vae if latent else None,
            }, path)
            logger.info(f"Saved checkpoint to {path}")
        if world_size > 1:
            dist.barrier()
        return path

    def sample_grid(step: int) -> str:
        fn = FlowSampler(transport).sample_ode(num_steps=args.sample_num_steps, method="heun")
        with torch.autocast(**autocast):
            images = generate(ema, grid_noise, grid_labels, fn, cfg_scale=args.sample_cfg_scale)
        path = os.path.join(sample_dir, f"{step:07d}.png")
        save_grid(decode_to_uint8(images.float(), vae if latent else None), path)
        return path

    if heldout is not None and train_steps == 0:
        log_row(dict(step=0, epoch=0, **evaluate(0)))
    last = dict(step=train_steps)

    # Training loop: every step is in plain sight here.
    logger.info(f"Training for {max_steps - train_steps:,} more steps ...")
    progress = tqdm(total=max_steps, initial=train_steps, disable=rank != 0 or not args.progress,
                    desc=exp_name, dynamic_ncols=True, position=args.progress_position)
    running = torch.zeros(2, device=device)  # FM loss, ANM loss summed since the last log
    log_steps, start_time, run_start = 0, time.time(), time.time()
    while train_steps < max_steps:
        sampler.set_position(epoch, epoch_step)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if vae is not None:
                with torch.no_grad():  # posterior *sample*, as the reference
                    x = vae.encode(x).latent_dist.sample(generator=generator) * LATENT_SCALE
            with torch.autocast(**autocast):
                fm_loss = transport.training_losses(model, x, dict(y=y), generator=generator)["loss"].mean()
                anm_loss = fm_loss.new_zeros(()) if anm_model is None else anm_model.loss(step=train_steps)
                loss = fm_loss + anm_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, raw, args.ema_decay)

            train_steps += 1
            epoch_step += 1
            if epoch_step == steps_per_epoch:
                epoch, epoch_step = epoch + 1, 0
            running += torch.stack([fm_loss.detach().float(), anm_loss.detach().float()])
            log_steps += 1
            progress.update(1)

            row: dict[str, Any] = {}
            if train_steps % args.log_every == 0 or train_steps == max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.time() - start_time
                avg = all_mean(running / log_steps, world_size).tolist()
                row.update(fm_loss=avg[0], anm_loss=avg[1], loss=avg[0] + avg[1],
                           steps_per_sec=log_steps / elapsed,
                           img_per_sec=log_steps * args.global_batch_size / elapsed)
                if anm_model is not None:
                    row.update(anm_model.stats())  # anm/norm/<layer> etc., at this step
                logger.info(f"(step={train_steps:07d}) FM loss {avg[0]:.4f}, ANM loss {avg[1]:.4f}, "
                            f"{row['steps_per_sec']:.2f} steps/s, {row['img_per_sec']:.1f} img/s")
                progress.set_postfix(fm=f"{avg[0]:.4f}", anm=f"{avg[1]:.4f}")
                running.zero_()
                log_steps, start_time = 0, time.time()
            if heldout is not None and (train_steps % args.eval_every == 0 or train_steps == max_steps):
                row.update(evaluate(train_steps))
                logger.info(f"(step={train_steps:07d}) held-out FM loss {row['heldout_fm_loss']:.4f} "
                            f"(EMA {row['heldout_fm_loss_ema']:.4f})")
            if row:
                row = dict(step=train_steps, epoch=epoch, **row, elapsed_s=time.time() - run_start)
                log_row(row)
                last.update(row)
            if args.sample_every > 0 and train_steps % args.sample_every == 0 and rank == 0:
                last["sample_grid"] = sample_grid(train_steps)
            if train_steps % args.ckpt_every == 0 or train_steps == max_steps:
                last["checkpoint"] = save_checkpoint(train_steps)
            if train_steps >= max_steps:
                break
    progress.close()
    last.setdefault("checkpoint", latest_checkpoint(checkpoint_dir))  # nothing left to train on resume

    logger.info("Done!")
    if tb is not None:
        tb.close()
    if anm_model is not None:
        anm_model.close()  # remove the hooks: the returned model is the bare SiT
    if created_group:
        dist.destroy_process_group()
    return dict(last, experiment_dir=experiment_dir, log_csv=os.path.join(experiment_dir, "log.csv"),
                model=raw, ema=ema, model_config=config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=["sinusoid", "fashion-mnist", "imagenet", "latents"],
                       default="latents")
    group.add_argument("--data-path", type=str, default=None,
                       help="ImageNet train folder (imagenet), extract_latents.py output (latents), "
                            "or the Fashion-MNIST folder")
    group.add_argument("--eval-data-path", type=str, default=None, help="held-out set for imagenet/latents")
    group.add_argument("--data-size", type=int, default=100_000, help="number of sinusoid images")
    group.add_argument("--image-size", type=int, default=None,
                       help="pixels (default: 32 sinusoid/fashion-mnist, 256 imagenet; latents: from data)")
    group.add_argument("--vae", type=str, default="stabilityai/sd-vae-ft-ema", help="hub id or local dir")
    group.add_argument("--num-workers", type=int, default=4)
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=str, default="SiT-XL/2", help=f"SiT-<{'|'.join(MODEL_SIZES)}>/<patch>")
    group.add_argument("--hidden-size", type=int, default=None, help="override the named size's width")
    group.add_argument("--depth", type=int, default=None, help="override the named size's depth")
    group.add_argument("--num-heads", type=int, default=None, help="override the named size's heads")
    group.add_argument("--class-dropout-prob", type=float, default=0.1)
    group.add_argument("--path-type", choices=["Linear", "GVP", "VP"], default="Linear")
    group.add_argument("--prediction", choices=["velocity", "noise", "score"], default="velocity")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--results-dir", type=str, default="results")
    group.add_argument("--exp-name", type=str, default=None, help="default: <model>-<data>-<anm|baseline>")
    group.add_argument("--max-steps", type=int, default=400_000)
    group.add_argument("--epochs", type=int, default=None, help="stop after this many epochs (if sooner)")
    group.add_argument("--global-batch-size", type=int, default=256)
    group.add_argument("--global-seed", type=int, default=0)
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--ema-decay", type=float, default=0.9999)
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    group.add_argument("--compile", action="store_true")
    group.add_argument("--grad-checkpointing", action="store_true", help="non-reentrant, per block")
    group.add_argument("--resume", type=str, default=None, help="checkpoint path, or 'auto' (latest, if any)")
    group = parser.add_argument_group("ANM")
    group.add_argument("--anm", action=argparse.BooleanOptionalAction, default=False)
    group.add_argument("--anm-alpha", type=float, default=70.0, help="target norm (paper: 70 at D=1152, l2)")
    group.add_argument("--anm-lambda", type=float, default=10.0)
    group.add_argument("--anm-warmup", type=int, default=2000)
    group.add_argument("--anm-site", choices=["update", "output"], default="update")
    group.add_argument("--anm-layers", type=str, default="auto",
                       help="'auto', a glob, or comma-separated globs")
    group.add_argument("--anm-reduce", choices=["l2", "rms"], default="l2")
    group.add_argument("--anm-objective", choices=["hinge", "exp"], default="hinge")
    group.add_argument("--anm-granularity", choices=["token", "sample", "batch"], default="token")
    group = parser.add_argument_group("logging, evaluation, checkpoints")
    group.add_argument("--log-every", type=int, default=100)
    group.add_argument("--ckpt-every", type=int, default=50_000)
    group.add_argument("--eval-every", type=int, default=5_000, help="held-out FM loss; 0 = never")
    group.add_argument("--eval-samples", type=int, default=1024)
    group.add_argument("--eval-batch-size", type=int, default=128)
    group.add_argument("--sample-every", type=int, default=10_000, help="EMA sample grid; 0 = never")
    group.add_argument("--sample-grid", type=int, default=16, help="images per grid")
    group.add_argument("--sample-num-steps", type=int, default=50, help="Heun steps for the grids")
    group.add_argument("--sample-cfg-scale", type=float, default=1.0, help="CFG scale for the grids")
    group.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    group.add_argument("--progress-position", type=int, default=0, help="tqdm line (parallel runs)")
    group.add_argument("--console-log", action=argparse.BooleanOptionalAction, default=True,
                       help="log lines on the console too (always in log.txt)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
