"""
Train SiT (flow matching) with optional Activation-Norm Maximization (ANM), with PyTorch DDP.

    torchrun --nproc_per_node 8 examples/sit/train.py --data latents --data-path latents/ \\
        --model SiT-B/4 --anm
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/sit/train.py ...           # and --node_rank 1 on the other node
    python examples/sit/train.py --data sinusoid --model SiT-T/4 --max-steps 2000   # CPU, one process
    python examples/sit/train.py ... --global-batch-size 256 --grad-accum-steps 4   # batch 256 on fewer GPUs

Time convention (as the reference SiT): t=0 is pure noise, t=1 is data.
Layout of a run: <results-dir>/<exp-name>/{args.json, checkpoints/, samples/, log.csv, log.txt}.
A run resumes bit-exactly (weights, EMA, optimizer, RNG streams, data position, ANM warm-up) from a
checkpoint with --resume PATH, or --resume auto (newest loadable checkpoint of this experiment, if any);
it keeps the flags that define the run (left out, they come from the checkpoint; changed, they are refused).
SIGTERM, SIGUSR1 or SIGINT (SLURM preemption, time limit, Ctrl-C) stop every rank after one agreed step
with a checkpoint, a line in log.txt and <run>/stopped.json; the exit status is then 75 (requeue and rerun
with --resume auto). A signal during setup ends the run before its first step, saving nothing. See
docs/sit.md, "Preemption, SLURM and long jobs", and examples/sit/slurm/train.sbatch.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from copy import deepcopy
from typing import Any

import torch
from data.errors import DataError
from data.streams import seed_everything
from data.train_data import TrainData, load_data
from evaluation.heldout import HeldoutSet, fm_loss
from modeling.generation import generate
from modeling.hub import absolute_if_local
from modeling.models import SIT_SIZES, SiT
from modeling.samplers import Sampler as FlowSampler
from modeling.transport import Transport, create_transport
from modeling.vae import decode_to_uint8, encode_images
from runtime.checkpoints import (
    check_finite,
    experiment_name,
    find_checkpoint,
    is_milestone,
    lock_run_folder,
    open_experiment,
    prune_checkpoints,
    restore,
    restore_log_state,
    save_checkpoint,
    write_stopped,
)
from runtime.checks import check_args, check_ignored_flags, checkpoint_paths
from runtime.cli import HelpFormatter, UsageError, run
from runtime.distributed import DistContext, all_mean, any_rank, cleanup, setup_distributed
from runtime.images import save_grid
from runtime.preemption import (
    EXIT_PREEMPTED,
    SYNC_SECONDS,
    StepAgreement,
    StopSignals,
    catches_stop_signals,
    exit_preempted,
)
from runtime.run_flags import GIVEN_KEY, given_flags
from runtime.run_log import MetricLog, create_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import anm

DEFAULT_MAX_STEPS = 400_000  # the paper's SiT-XL/2 schedule
DEFAULT_SINUSOIDS = 100_000  # images of --data sinusoid


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


#################################################################################
#                                  Setup: model                                 #
#################################################################################

def parse_model_name(name: str) -> tuple[str, int]:
    """'SiT-XL/2' -> ('XL', 2)."""
    match = re.fullmatch(r"SiT-(\w+)/(\d+)", name)
    if match is None or match.group(1) not in SIT_SIZES or int(match.group(2)) <= 0:
        raise UsageError(f"unknown model {name!r}: use SiT-<{'|'.join(SIT_SIZES)}>/<patch size>, e.g. SiT-XL/2")
    return match.group(1), int(match.group(2))


def model_config(args: argparse.Namespace, in_channels: int, input_size: int, num_classes: int) -> dict:
    """Keyword arguments for SiT(...): the named size, with --depth/--hidden-size/--num-heads overrides."""
    size, patch_size = parse_model_name(args.model)
    depth, hidden_size, num_heads = SIT_SIZES[size]
    config = dict(
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
    if input_size % patch_size:
        raise UsageError(f"{args.model}: the {input_size}x{input_size} input does not split into {patch_size}x"
                         f"{patch_size} patches; choose a patch size dividing {input_size}")
    if config["hidden_size"] % config["num_heads"]:
        raise UsageError(f"hidden size {config['hidden_size']} is not divisible by {config['num_heads']} heads: "
                         "change --hidden-size or --num-heads")
    if config["hidden_size"] % 4:
        raise UsageError(f"hidden size {config['hidden_size']} is not a multiple of 4, which the 2-D sin-cos "
                         "position embedding needs: change --hidden-size")
    return config


def anm_layers(spec: str) -> str | list[str]:
    """--anm-layers: 'auto', a glob, or a comma-separated list of globs."""
    return spec if "," not in spec else [part.strip() for part in spec.split(",") if part.strip()]


def build_models(args: argparse.Namespace, config: dict, ctx: DistContext):
    """(bare SiT, its EMA, the ANM wrapper or None, the module to train (ANM/DDP/compile-wrapped), its DDP
    wrapper or None, AdamW)."""
    with torch.random.fork_rng(devices=[]):  # one initialisation for every rank and any number of processes
        torch.manual_seed(args.global_seed)
        raw = SiT(**config).to(ctx.device)  # the bare model: its state_dict is what checkpoints hold
    ema = deepcopy(raw).to(ctx.device)  # an exact copy, made before ANM hooks exist on `raw`
    requires_grad(ema, False)
    raw.grad_checkpointing = args.grad_checkpointing  # non-reentrant checkpoint of each block's body
    anm_model, model, ddp = None, raw, None
    if args.anm:
        # Before DDP / compile: hooks must exist before the first (compiled) call. Non-finite norms
        # propagate into the loss, which the loop checks, naming the steps.
        anm_model = anm.ANM(raw, alpha=args.anm_alpha, lam=args.anm_lambda, warmup=args.anm_warmup,
                            site=args.anm_site, layers=anm_layers(args.anm_layers), reduce=args.anm_reduce,
                            objective=args.anm_objective, granularity=args.anm_granularity, nonfinite="propagate")
        model = anm_model
    if ctx.world_size > 1:
        model = ddp = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=ctx.device.type == "cuda")
    return raw, ema, anm_model, model, ddp, opt


def total_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: --max-steps, or --epochs if that ends sooner, else the default."""
    limits = [args.max_steps] if args.max_steps is not None else []
    if args.epochs is not None:
        limits.append(args.epochs * steps_per_epoch)
    return min(limits) if limits else DEFAULT_MAX_STEPS


#################################################################################
#                          Pieces of the training loop                          #
#################################################################################

def log_setup(logger: logging.Logger, experiment_dir: str, ctx: DistContext, data: TrainData, config: dict,
              raw: nn.Module, anm_model: anm.ANM | None, warnings: list[str], notes: list[str]) -> None:
    """The first lines of log.txt: where, on what, which model, anything found wrong on disk, and the flags
    a resume restored or changed."""
    logger.info(f"Experiment directory: {experiment_dir}  (rank {ctx.rank}/{ctx.world_size}, device {ctx.device})")
    for warning in warnings:
        logger.warning(f"warning: {warning}")
    for note in notes:
        logger.info(note)
    logger.info(f"Data: {len(data.dataset):,} items, {data.sampler.steps_per_epoch:,} steps/epoch; "
                f"SiT {config}: {sum(p.numel() for p in raw.parameters()):,} parameters; "
                + (f"ANM {anm_model.extra_repr()}" if anm_model is not None else "no ANM"))
    logger.info(f"Held-out set: {data.heldout_source}"
                + (f"; latents: {data.scaling.describe()}" if data.scaling is not None else ""))


def sample_grid_inputs(args: argparse.Namespace, data: TrainData,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed starting noise and labels of every sample grid of the run."""
    gen = torch.Generator().manual_seed(args.global_seed)
    noise = torch.randn(args.sample_grid, data.in_channels, data.input_size, data.input_size, generator=gen)
    labels = torch.randint(0, data.num_classes, (args.sample_grid,), generator=gen)
    return noise.to(device), labels.to(device)


def training_metrics(running: torch.Tensor, log_steps: int, elapsed: float, args: argparse.Namespace,
                     anm_model: anm.ANM | None, ctx: DistContext) -> dict[str, float]:
    """The log row of the steps since the last one: mean losses (over ranks), speed, grad norm, ANM stats."""
    fm, anm_term, grad_norm = (all_mean(running, ctx.world_size) / log_steps).tolist()
    row = dict(fm_loss=fm, anm_loss=anm_term, loss=fm + anm_term, steps_per_sec=log_steps / elapsed,
               img_per_sec=log_steps * args.global_batch_size / elapsed)
    if args.max_grad_norm is not None:
        row["grad_norm"] = grad_norm
    if anm_model is not None:
        row.update(anm_model.stats())  # anm/norm/<layer> etc., at this step
    return row


def save_sample_grid(experiment_dir: str, step: int, ema: nn.Module, transport: Transport, data: TrainData,
                     args: argparse.Namespace) -> str:
    """<experiment_dir>/samples/<step>.png: EMA samples from the run's fixed noise and labels (Heun ODE)."""
    noise, labels = sample_grid_inputs(args, data, next(ema.parameters()).device)
    path = os.path.join(experiment_dir, "samples", f"{step:07d}.png")
    fn = FlowSampler(transport).sample_ode(num_steps=args.sample_num_steps, method="heun")
    with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        images = generate(ema, noise, labels, fn, cfg_scale=args.sample_cfg_scale)
    save_grid(decode_to_uint8(images.float(), data.vae, scaling=data.scaling), path)
    return path


def heldout_losses(raw: nn.Module, ema: nn.Module, transport: Transport, heldout: HeldoutSet,
                   args: argparse.Namespace, ctx: DistContext) -> dict[str, float]:
    """Held-out FM loss of the model and of its EMA."""
    return {key: fm_loss(net, transport, heldout, args.eval_batch_size, ctx.rank, ctx.world_size)
            for key, net in (("heldout_fm_loss", raw), ("heldout_fm_loss_ema", ema))}


def gradient_sync(ddp: DDP | None, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces the gradients on the last micro-batch of a step only (no_sync on the others)."""
    return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()


def close_run(metrics: MetricLog, anm_model: anm.ANM | None, ctx: DistContext) -> None:
    """Flush the loggers, remove the ANM hooks (the returned model is the bare SiT), leave the process group."""
    metrics.close()
    if anm_model is not None:
        anm_model.close()
    cleanup(ctx)


def batches(loader: DataLoader):
    """The loader's batches; a data file found corrupt mid-run stops the run with its name, not a traceback."""
    try:
        yield from loader
    except DataError as error:  # from a worker, the message carries the worker's traceback: keep its last line
        raise UsageError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from error


def micro_batches(tensors: tuple[torch.Tensor, ...], k: int):
    """The k equal micro-batches of a batch, as tuples of tensors."""
    return zip(*(t.chunk(k) for t in tensors), strict=True)


def log_pruned(logger: logging.Logger, ctx: DistContext, saved: str, step: int, total: int,
               args: argparse.Namespace) -> None:
    """--keep-last: rank 0 removes rolling checkpoints (time cadence, stops) beyond the newest K, after the new
    one is on disk; the step cadence's and the last step's stay."""
    if ctx.is_main:
        rolling = not (is_milestone(step, args.ckpt_every) or step == total)
        for path in prune_checkpoints(os.path.dirname(saved), saved, rolling, args.keep_last):
            logger.info(f"Removed {path} (--keep-last {args.keep_last})")


def finish_stopped(logger: logging.Logger, stop: StopSignals, ctx: DistContext, experiment_dir: str, step: int,
                   checkpoint: str | None, metrics: MetricLog, anm_model: anm.ANM | None, saved: bool = True) -> None:
    """After a stop signal's checkpoint (saved), or before this process's first step (not saved: checkpoint is
    the one resumed from, or None): say so in log.txt and stopped.json, end the run with exit status 75."""
    done = (f"after step {step:,}; saved {checkpoint}" if saved else
            f"before step {step + 1:,}, with no step to save" + (f" ({checkpoint} stays the newest checkpoint)"
                                                                 if checkpoint else ""))
    message = (f"stopped by {signal_name(stop)} {done}; exit status {EXIT_PREEMPTED}: rerun with --resume auto to "
               "continue")
    logger.info(message[0].upper() + message[1:])
    if stop.later():
        why = "the checkpoint was completed first" if saved else "the first one had stopped the run"
        logger.info(f"Ignored {', '.join(stop.later())} during the stop: {why}")
    if ctx.is_main:
        write_stopped(experiment_dir, signal_name(stop), step, checkpoint, EXIT_PREEMPTED)
    close_run(metrics, anm_model, ctx)
    exit_preempted("train.py", message, ctx.is_main)


def signal_name(stop: StopSignals) -> str:
    """The signal this process got first; the ranks agree on a stop, so one may have got none."""
    return stop.first or "a signal to another rank"


def stop_in_setup(stop: StopSignals, ctx: DistContext, experiment_dir: str, step: int, resume_path: str | None,
                  anm_model: anm.ANM | None) -> None:
    """A stop signal during setup (the folder scan, the VAE load, the held-out encoding), before the run folder
    is opened: exit status 75 at once, with no checkpoint and no run files, so the same command starts again.
    Only <run>/stopped.json is written (unless another process holds the folder), for a requeue script that
    lost the exit status."""
    message = (f"stopped by {signal_name(stop)} during setup, before step {step + 1:,}; nothing to save; exit "
               f"status {EXIT_PREEMPTED}: rerun the same command")
    if ctx.is_main:
        # Not in a folder another run holds (its marker is not ours), nor past a disk error: the stop goes on.
        with contextlib.suppress(UsageError, OSError):
            os.makedirs(experiment_dir, exist_ok=True)
            lock_run_folder(experiment_dir)
            write_stopped(experiment_dir, signal_name(stop), step, resume_path, EXIT_PREEMPTED)
    if anm_model is not None:
        anm_model.close()
    cleanup(ctx)
    exit_preempted("train.py", message, ctx.is_main)


#################################################################################
#                                  Training Loop                                #
#################################################################################

@catches_stop_signals  # SIGTERM/SIGUSR1/SIGINT stop the run after a step with a checkpoint, or before the first
def main(args: argparse.Namespace, stop: StopSignals) -> dict[str, Any]:
    """Train; returns final metrics, paths and the (unwrapped) model and EMA. A stop signal ends the run
    after a checkpoint with :class:`Preempted` (exit status 75); one during setup, before the first step and
    without one."""
    ctx = setup_distributed()
    check_args(args, ctx.world_size)
    experiment_dir, resume_path, checkpoint, warnings, notes = find_checkpoint(args, ctx)  # adopts saved flags
    if checkpoint is not None:
        check_args(args, ctx.world_size)
    if args.resume is not None:  # left to here by parse_args: with the checkpoint's flags, or a new run's own
        check_ignored_flags(args, build_parser())
    seed = args.global_seed * ctx.world_size + ctx.rank
    generator = seed_everything(seed, ctx.device)

    # Everything is validated before the run folder is created: data, model, ANM flags, resume checkpoint.
    data = load_data(args, ctx, seed)
    steps_per_epoch = data.sampler.steps_per_epoch
    max_steps = total_steps(args, steps_per_epoch)
    config = model_config(args, data.in_channels, data.input_size, data.num_classes)
    raw, ema, anm_model, model, ddp, opt = build_models(args, config, ctx)
    if any_rank(stop.requested, ctx):  # a signal during the setup so far: no step to save, no folder yet
        stop_in_setup(stop, ctx, experiment_dir, checkpoint["step"] if checkpoint else 0, resume_path, anm_model)
    warnings += open_experiment(args, ctx, experiment_dir, checkpoint, resume_path, config, len(data.dataset),
                                steps_per_epoch, data.scaling)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    logger = create_logger(experiment_dir, ctx.rank, console=args.console_log)
    log_setup(logger, experiment_dir, ctx, data, config, raw, anm_model, [*warnings, *data.notes], notes)
    train_steps, epoch, epoch_step = restore(checkpoint, raw, ema, opt, anm_model, generator, ctx, seed, logger)
    running, log_steps, log_seconds, elapsed = restore_log_state(checkpoint, ctx.device)
    metrics = MetricLog(args, experiment_dir, train_steps if checkpoint is not None else None, ctx.rank)
    del checkpoint
    model.train()
    ema.eval()

    transport = create_transport(args.path_type, args.prediction)
    t0, t1 = transport.interval()
    autocast = dict(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    if data.heldout is not None and train_steps == 0:
        metrics.write(dict(step=0, epoch=0, **heldout_losses(raw, ema, transport, data.heldout, args, ctx)))
    last = dict(step=train_steps)
    if any_rank(stop.requested, ctx):  # a signal since the folder was opened, before this process's first step
        finish_stopped(logger, stop, ctx, experiment_dir, train_steps, resume_path, metrics, anm_model, saved=False)

    logger.info(f"Training for {max_steps - train_steps:,} more steps ...")
    progress = tqdm(total=max_steps, initial=train_steps, disable=not (ctx.is_main and args.progress),
                    desc=experiment_name(args), dynamic_ncols=True, position=args.progress_position)
    k = args.grad_accum_steps
    # running: FM loss, ANM loss, grad norm summed since the last log row (restored on resume, as log_steps)
    checked_step, start_time, run_start = train_steps, time.time() - log_seconds, time.time() - elapsed
    agreement = StepAgreement(stop, ctx.world_size, ctx.rank, ctx.device, train_steps,
                              args.ckpt_every_minutes * 60 if args.ckpt_every_minutes else None,
                              args.stop_sync_seconds)
    stopped = False
    while train_steps < max_steps and not stopped:
        data.sampler.set_position(epoch, epoch_step)
        batches_this_epoch = 0
        for batch in batches(data.loader):
            batches_this_epoch += 1
            x, y, noise, u = (tensor.to(ctx.device, non_blocking=True) for tensor in batch)
            t = t0 + u * (t1 - t0)  # each item's time, drawn with its noise (see SeededItems)
            if data.encode:
                with torch.no_grad():  # posterior *sample*, as the reference
                    x = encode_images(data.vae, x, data.scaling, generator=generator)
            opt.zero_grad(set_to_none=True)
            for i, (xs, ys, ns, ts) in enumerate(micro_batches((x, y, noise, t), k)):
                with gradient_sync(ddp, last=i == k - 1), torch.autocast(**autocast):
                    fm = transport.training_losses(model, xs, dict(y=ys), t=ts, noise=ns)["loss"].mean()
                    anm_loss = fm.new_zeros(()) if anm_model is None else anm_model.loss(step=train_steps)
                    ((fm + anm_loss) / k).backward()
                running[:2] += torch.stack([fm.detach().float(), anm_loss.detach().float()]) / k
            if args.max_grad_norm is not None:
                running[2] += nn.utils.clip_grad_norm_(raw.parameters(), args.max_grad_norm).float()
            opt.step()
            update_ema(ema, raw, args.ema_decay)

            train_steps += 1
            epoch, epoch_step = (epoch + 1, 0) if epoch_step + 1 == steps_per_epoch else (epoch, epoch_step + 1)
            log_steps += 1
            progress.update(1)

            row: dict[str, Any] = {}
            if train_steps % args.log_every == 0 or train_steps == max_steps:
                checked_step = check_finite(running, raw, ctx.world_size, checked_step, train_steps, checkpoint_dir)
                row.update(training_metrics(running, log_steps, time.time() - start_time, args, anm_model, ctx))
                logger.info(f"(step={train_steps:07d}) FM loss {row['fm_loss']:.4f}, ANM loss {row['anm_loss']:.4f}, "
                            f"{row['steps_per_sec']:.2f} steps/s, {row['img_per_sec']:.1f} img/s")
                progress.set_postfix(fm=f"{row['fm_loss']:.4f}", anm=f"{row['anm_loss']:.4f}")
                running.zero_()
                log_steps, start_time = 0, time.time()
            if data.heldout is not None and (train_steps % args.eval_every == 0 or train_steps == max_steps):
                row.update(heldout_losses(raw, ema, transport, data.heldout, args, ctx))
                logger.info(f"(step={train_steps:07d}) held-out FM loss {row['heldout_fm_loss']:.4f} "
                            f"(EMA {row['heldout_fm_loss_ema']:.4f})")
            if row:
                row = dict(step=train_steps, epoch=epoch, **row, elapsed_s=time.time() - run_start)
                metrics.write(row)
                last.update(row)
            if args.sample_every > 0 and train_steps % args.sample_every == 0 and ctx.is_main:
                last["sample_grid"] = save_sample_grid(experiment_dir, train_steps, ema, transport, data, args)
            stopped, time_due = agreement.poll(train_steps)  # the same verdict on every rank
            stopped = stopped and train_steps < max_steps  # a signal at the last step: the run is done anyway
            if is_milestone(train_steps, args.ckpt_every) or train_steps == max_steps or time_due or stopped:
                checked_step = check_finite(running, raw, ctx.world_size, checked_step, train_steps, checkpoint_dir)
                log_state = dict(running=running, log_steps=log_steps, log_seconds=time.time() - start_time,
                                 elapsed_s=time.time() - run_start)
                last["checkpoint"] = save_checkpoint(checkpoint_dir, train_steps, epoch, epoch_step, raw, ema, opt,
                                                     anm_model, generator, args, config, len(data.dataset), ctx,
                                                     log_state=log_state, latent_scaling=data.scaling)
                agreement.saved()
                logger.info(f"Saved checkpoint to {last['checkpoint']}")
                log_pruned(logger, ctx, last["checkpoint"], train_steps, max_steps, args)
            if train_steps >= max_steps or stopped:
                break
        if batches_this_epoch == 0:  # a guard: an empty epoch would otherwise loop forever
            raise RuntimeError(f"epoch {epoch} from batch {epoch_step} yielded no batch")
    progress.close()
    last.setdefault("checkpoint", next(iter(checkpoint_paths(checkpoint_dir)), None))  # nothing left to train
    if stopped:
        finish_stopped(logger, stop, ctx, experiment_dir, train_steps, last["checkpoint"], metrics, anm_model)

    logger.info("Done!")
    close_run(metrics, anm_model, ctx)
    return dict(last, experiment_dir=experiment_dir, log_csv=os.path.join(experiment_dir, "log.csv"),
                model=raw, ema=ema, model_config=config)


#################################################################################
#                                  Command line                                 #
#################################################################################

def build_parser() -> argparse.ArgumentParser:
    """train.py's flags, in groups, each with its help text and default."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=["sinusoid", "fashion-mnist", "imagenet", "latents"], default="latents",
                       help="training data: procedural sinusoids, Fashion-MNIST, ImageNet images (encoded by "
                            "--vae each step) or extract_latents.py output")
    group.add_argument("--data-path", type=str, default=None,
                       help="ImageNet train folder (imagenet), extract_latents.py output (latents), or the "
                            "Fashion-MNIST folder (default: the Debian package's)")
    group.add_argument("--eval-data-path", type=str, default=None,
                       help="held-out set for imagenet/latents, e.g. the ImageNet val folder (or its latents) "
                            "(default: --eval-samples training items spread over the classes, excluded from "
                            "training)")
    group.add_argument("--data-size", type=int, default=None,
                       help=f"number of sinusoid images (default: {DEFAULT_SINUSOIDS:,})")
    group.add_argument("--image-size", type=int, default=None,
                       help="pixels (default: 32 sinusoid/fashion-mnist, 256 imagenet; latents: from the data)")
    group.add_argument("--vae", type=str, default=None,
                       help="diffusers AutoencoderKL hub id or local folder, any VAE: its config's scaling / "
                            "shift factors are used and recorded (imagenet: encodes every step; latents: decodes "
                            "the sample grids, loaded only with --sample-every > 0, checked against meta.json, "
                            "and recorded for sample.py) (default: latents: the VAE meta.json names; "
                            "imagenet: stabilityai/sd-vae-ft-ema)")
    group.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per rank")
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=str, default="SiT-XL/2", help=f"SiT-<{'|'.join(SIT_SIZES)}>/<patch size>")
    group.add_argument("--hidden-size", type=int, default=None, help="override the named size's width")
    group.add_argument("--depth", type=int, default=None, help="override the named size's depth")
    group.add_argument("--num-heads", type=int, default=None, help="override the named size's heads")
    group.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout (for CFG)")
    group.add_argument("--path-type", choices=["Linear", "GVP", "VP"], default="Linear", help="interpolant path")
    group.add_argument("--prediction", choices=["velocity", "noise", "score"], default="velocity",
                       help="what the model predicts")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--results-dir", type=str, default="results", help="folder holding one folder per run")
    group.add_argument("--exp-name", type=str, default=None,
                       help="the run's folder name (default: <model>-<data>-<anm|baseline>)")
    group.add_argument("--max-steps", type=int, default=None,
                       help=f"optimizer steps to train for (default: {DEFAULT_MAX_STEPS:,}, or --epochs)")
    group.add_argument("--epochs", type=int, default=None, help="stop after this many epochs (if before --max-steps)")
    group.add_argument("--global-batch-size", type=int, default=256,
                       help="images per optimizer step, over all processes and micro-batches")
    group.add_argument("--grad-accum-steps", type=int, default=1,
                       help="micro-batches per optimizer step: each process runs global batch / (K x processes)")
    group.add_argument("--global-seed", type=int, default=0, help="seed of the data order, init and noise")
    group.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--max-grad-norm", type=float, default=None,
                       help="clip the gradient norm to this value and log it (default: no clipping)")
    group.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="non-reentrant activation checkpointing of each block's body (block hooks, "
                            "ANM's, stay outside: --compile keeps one graph)")
    group.add_argument("--resume", type=str, default=None,
                       help="a checkpoint path, or 'auto': the newest loadable checkpoint of this experiment "
                            "(starts fresh if it has none); flags that define the run come from the checkpoint, "
                            "another value is refused (default: a new run; refused if the folder holds one)")
    group = parser.add_argument_group("ANM")
    group.add_argument("--anm", action=argparse.BooleanOptionalAction, default=False,
                       help="add the ANM term to the loss")
    group.add_argument("--anm-alpha", type=float, default=70.0, help="target norm (paper: 70 at D=1152, l2)")
    group.add_argument("--anm-lambda", type=float, default=10.0, help="weight of the ANM term")
    group.add_argument("--anm-warmup", type=int, default=2000, help="optimizer steps of linear weight ramp")
    group.add_argument("--anm-site", choices=["update", "output"], default="update",
                       help="block output - input (update) or block output")
    group.add_argument("--anm-layers", type=str, default="auto", help="'auto', a glob, or comma-separated globs")
    group.add_argument("--anm-reduce", choices=["l2", "rms"], default="l2", help="norm: l2, or rms = l2/sqrt(D)")
    group.add_argument("--anm-objective", choices=["hinge", "exp"], default="hinge", help="penalty shape")
    group.add_argument("--anm-granularity", choices=["token", "sample", "batch"], default="token",
                       help="where the penalty applies")
    group = parser.add_argument_group("logging, evaluation, checkpoints")
    group.add_argument("--log-every", type=int, default=100, help="steps between log lines / log.csv rows")
    group.add_argument("--ckpt-every", type=int, default=50_000,
                       help="steps between milestone checkpoints, all kept (and the last step)")
    group.add_argument("--ckpt-every-minutes", type=float, default=None,
                       help="also a rolling checkpoint every M minutes of rank 0's clock (default: none)")
    group.add_argument("--stop-sync-seconds", type=float, default=SYNC_SECONDS,
                       help="seconds between the ranks' checks for a stop signal and the time cadence: a stop "
                            "takes up to this plus one step and the save")
    group.add_argument("--keep-last", type=int, default=2,
                       help="rolling checkpoints kept (--ckpt-every-minutes, stops); those of --ckpt-every and the "
                            "last step always stay; 0 = keep all")
    group.add_argument("--eval-every", type=int, default=5_000, help="steps between held-out FM losses; 0 = never")
    group.add_argument("--eval-samples", type=int, default=1024,
                       help="held-out set size (imagenet/latents without --eval-data-path: items spread over the "
                            "classes, removed from training)")
    group.add_argument("--eval-batch-size", type=int, default=128, help="batch of the held-out evaluation")
    group.add_argument("--sample-every", type=int, default=10_000, help="steps between EMA sample grids; 0 = never")
    group.add_argument("--sample-grid", type=int, default=16, help="images per grid")
    group.add_argument("--sample-num-steps", type=int, default=50, help="Heun steps for the grids")
    group.add_argument("--sample-cfg-scale", type=float, default=1.0, help="CFG scale for the grids")
    group.add_argument("--report-to", nargs="+", choices=["csv", "tensorboard", "wandb"], default=["csv"],
                       help="metric loggers; log.csv is always written (wandb: WANDB_MODE=offline works offline)")
    group.add_argument("--no-tensorboard", dest="report_to", action="store_const", const=["csv"],
                       help="deprecated, the default now: same as --report-to csv")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="tqdm progress bar, drawn on stderr (default: on when stderr is a terminal)")
    group.add_argument("--progress-position", type=int, default=0, help="tqdm line (parallel runs)")
    group.add_argument("--console-log", action=argparse.BooleanOptionalAction, default=True,
                       help="log lines on the console too (always in log.txt)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of train.py (see --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setattr(args, GIVEN_KEY, given_flags(parser, argv))  # a resume takes the others from its checkpoint
    if args.resume is None:  # a resume checks them once its checkpoint's flags are in (main)
        check_ignored_flags(args, parser)
    if args.data == "sinusoid" and args.data_size is None:
        args.data_size = DEFAULT_SINUSOIDS
    if args.progress is None:
        args.progress = sys.stderr.isatty()  # where tqdm draws: a bar in a log file is a line of \r-frames
    args.vae = absolute_if_local(args.vae)  # args.json and checkpoints are read from other folders (sample.py)
    return args


if __name__ == "__main__":
    run(main, parse_args)
