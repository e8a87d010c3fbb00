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
--fid-every K adds FID-N, sFID, precision and recall of the EMA to log.csv every K steps (docs/sit.md, "Metrics
during and after training"); training is bit-identical with and without it.
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
import time
from copy import deepcopy
from typing import Any

import torch
from data.errors import DataError
from data.streams import cpu_seeded, seed_everything
from data.train_data import TrainData, load_data
from evaluation.during_training import TrainingFID
from evaluation.heldout import HeldoutSet, fm_loss
from modeling.ema import ema_parameters, update_ema
from modeling.generation import generate
from modeling.model_config import model_config
from modeling.models import SiT
from modeling.samplers import Sampler as FlowSampler
from modeling.transport import Transport, create_transport
from modeling.vae import decode_to_uint8, encode_images
from regularizers.dispersive import build_dispersive
from regularizers.repa_term import build_repa
from regularizers.terms import Terms
from runtime import train_args
from runtime.checkpoints import (
    WriteStats,
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
    when_written,
    write_stopped,
)
from runtime.checks import check_args, check_ignored_flags, checkpoint_paths, ema_warnings
from runtime.cli import UsageError, run
from runtime.distributed import DistContext, all_mean, any_rank, cleanup, setup_distributed
from runtime.images import save_grid
from runtime.preemption import (
    EXIT_PREEMPTED,
    StepAgreement,
    StopSignals,
    catches_stop_signals,
    exit_preempted,
)
from runtime.run_log import MetricLog, create_logger
from runtime.train_args import DEFAULT_MAX_STEPS
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import anm

RUNNING_SLOTS = 5  # loss sums between log rows: FM, ANM, grad norm, Dispersive, REPA

#################################################################################
#                             Training Helper Functions                         #
#################################################################################

def requires_grad(model: nn.Module, flag: bool = True) -> None:
    """Set requires_grad for all parameters of a model."""
    for p in model.parameters():
        p.requires_grad = flag


#################################################################################
#                                  Setup: model                                 #
#################################################################################

def anm_layers(spec: str) -> str | list[str]:
    """--anm-layers: 'auto', a glob, or a comma-separated list of globs."""
    return spec if "," not in spec else [part.strip() for part in spec.split(",") if part.strip()]


def build_models(args: argparse.Namespace, config: dict, ctx: DistContext, data: TrainData | None = None,
                 checkpoint: dict | None = None):
    """(bare SiT, its EMA, the ANM wrapper or None, the module to train (ANM/DDP/compile-wrapped), its DDP
    wrapper or None, AdamW (over the SiT and REPA's projector), the Dispersive and REPA terms). A resume's
    projector is loaded here, so that a checkpoint aligned to another encoder is refused before the run folder
    opens."""
    with cpu_seeded(args.global_seed):  # one initialisation for every rank and any number of processes
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
    # Their hooks go on the bare model, before DDP / compile too; REPA's encoder loads (and is checked) here.
    grid = config["input_size"] // config["patch_size"]
    terms = Terms(build_dispersive(args, raw),
                  build_repa(args, raw, config["hidden_size"], grid,
                             data.image_pixels if data is not None else config["input_size"], ctx.device))
    if checkpoint is not None:
        terms.load_state_dict(checkpoint.get("terms") or {})
    if ctx.world_size > 1:
        # The gradients become views of the all-reduce buckets: no copy from the buckets back into them.
        model = ddp = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW([*raw.parameters(), *terms.parameters()], lr=args.lr, weight_decay=args.weight_decay,
                            fused=ctx.device.type == "cuda")
    model.train()
    ema.eval()
    return raw, ema, anm_model, model, ddp, opt, terms


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
              raw: nn.Module, anm_model: anm.ANM | None, terms: Terms, warnings: list[str], notes: list[str]
              ) -> None:
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
    for line in terms.describe():
        logger.info(line)
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
                     anm_model: anm.ANM | None, terms: Terms, ctx: DistContext) -> dict[str, float]:
    """The log row of the steps since the last one: mean losses (over ranks), speed, grad norm, ANM stats, REPA's
    encoder time (this rank's, per step)."""
    fm, anm_term, grad_norm, disp, repa = (all_mean(running, ctx.world_size) / log_steps).tolist()
    row = dict(fm_loss=fm, anm_loss=anm_term, loss=fm + anm_term + disp + repa, steps_per_sec=log_steps / elapsed,
               img_per_sec=log_steps * args.global_batch_size / elapsed)
    if args.dispersive:
        row["dispersive_loss"] = disp
    if args.repa:
        row.update(repa_loss=repa, repa_encoder_ms=terms.encoder_ms(args.grad_accum_steps))
    if args.max_grad_norm is not None:
        row["grad_norm"] = grad_norm
    if anm_model is not None:
        row.update(anm_model.stats())  # anm/norm/<layer> etc., at this step
    return row


def save_sample_grid(experiment_dir: str, step: int, ema: nn.Module, transport: Transport, data: TrainData,
                     args: argparse.Namespace) -> str:
    """<experiment_dir>/samples/<step>.png: EMA samples from the run's fixed noise and labels (Heun ODE).

    Rank 0's alone, while the others wait in the next step's gradient all-reduce: work bounded by --sample-grid
    and --sample-num-steps, not by data or a disk (a grid far larger than the default may need a longer
    SIT_DIST_TIMEOUT_MINUTES)."""
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


def log_heldout(logger: logging.Logger, step: int, raw: nn.Module, ema: nn.Module, transport: Transport,
                heldout: HeldoutSet, args: argparse.Namespace, ctx: DistContext) -> dict[str, float]:
    """The held-out FM losses of this step, said in log.txt."""
    row = heldout_losses(raw, ema, transport, heldout, args, ctx)
    logger.info(f"(step={step:07d}) held-out FM loss {row['heldout_fm_loss']:.4f} "
                f"(EMA {row['heldout_fm_loss_ema']:.4f})")
    return row


def log_training(logger: logging.Logger, progress: tqdm, step: int, running: torch.Tensor, log_steps: int,
                 start_time: float, args: argparse.Namespace, anm_model: anm.ANM | None, terms: Terms,
                 ctx: DistContext) -> dict[str, float]:
    """The training row of the steps since the last one, said in log.txt and the progress bar."""
    row = training_metrics(running, log_steps, time.time() - start_time, args, anm_model, terms, ctx)
    disp = {name: f"{row[f'{name}_loss']:.4f}" for name in ("dispersive", "repa") if f"{name}_loss" in row}
    logger.info(f"(step={step:07d}) FM loss {row['fm_loss']:.4f}, ANM loss {row['anm_loss']:.4f}, "
                + "".join(f"{name} loss {value}, " for name, value in disp.items())
                + f"{row['steps_per_sec']:.2f} steps/s, {row['img_per_sec']:.1f} img/s"
                + (f" (REPA's encoder {row['repa_encoder_ms']:.1f} ms/step)" if "repa_encoder_ms" in row else ""))
    progress.set_postfix(fm=f"{row['fm_loss']:.4f}", anm=f"{row['anm_loss']:.4f}", **disp)
    return row


def log_state(running: torch.Tensor, log_steps: int, start_time: float, run_start: float) -> dict[str, Any]:
    """What a checkpoint keeps of the log window (loss sums, steps, seconds) for the first row after a resume."""
    return dict(running=running, log_steps=log_steps, log_seconds=time.time() - start_time,
                elapsed_s=time.time() - run_start)


def progress_bar(args: argparse.Namespace, ctx: DistContext, step: int, max_steps: int) -> tqdm:
    """The tqdm bar of rank 0 (with --progress), from the step a resume starts at."""
    return tqdm(total=max_steps, initial=step, disable=not (ctx.is_main and args.progress),
                desc=experiment_name(args), dynamic_ncols=True, position=args.progress_position)


def step_agreement(stop: StopSignals, ctx: DistContext, step: int, args: argparse.Namespace) -> StepAgreement:
    """How the ranks agree on a stop and on the --ckpt-every-minutes cadence, every --stop-sync-seconds."""
    return StepAgreement(stop, ctx.world_size, ctx.rank, ctx.device, step,
                         args.ckpt_every_minutes * 60 if args.ckpt_every_minutes else None, args.stop_sync_seconds)


def gradient_sync(ddp: DDP | None, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces the gradients on the last micro-batch of a step only (no_sync on the others)."""
    return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()


def close_run(metrics: MetricLog, anm_model: anm.ANM | None, terms: Terms, ctx: DistContext) -> None:
    """Flush the loggers, remove every hook (the returned model is the bare SiT), leave the process group."""
    metrics.close()
    if anm_model is not None:
        anm_model.close()
    terms.close()
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


def forward_backward(model: nn.Module, ddp: DDP | None, anm_model: anm.ANM | None, transport: Transport,
                     batch: tuple[torch.Tensor, ...], step: int, running: torch.Tensor, autocast: dict,
                     args: argparse.Namespace, terms: Terms) -> None:
    """The gradients of one optimizer step, over --grad-accum-steps micro-batches of (x, y, noise, t, images):
    FM loss + ANM + Dispersive + REPA terms (each micro-batch's own, over this rank's share), each divided by the
    micro-batch count; their means are added to running[0, 1, 3, 4] (no host sync). REPA's projector, outside
    DDP, has its gradients averaged over the ranks after the last micro-batch."""
    k = args.grad_accum_steps
    for i, (xs, ys, ns, ts, images) in enumerate(micro_batches(batch, k)):
        with gradient_sync(ddp, last=i == k - 1), torch.autocast(**autocast):
            fm = transport.training_losses(model, xs, dict(y=ys), t=ts, noise=ns)["loss"].mean()
            anm_loss = fm.new_zeros(()) if anm_model is None else anm_model.loss(step=step)
            disp_loss, repa_loss = terms.losses(fm, images)  # fp32
            ((fm + anm_loss + disp_loss + repa_loss) / k).backward()
        # One add over every slot (the grad norm's gets 0): an index list would copy an index tensor to the
        # device, a host sync, on every micro-batch.
        values = (fm, anm_loss, fm.new_zeros(()), disp_loss, repa_loss)
        running += torch.stack([value.detach().float() for value in values]) / k
    terms.sync_gradients(torch.distributed.get_world_size() if ddp is not None else 1)


def restore_running(checkpoint: dict | None, ctx: DistContext) -> tuple[torch.Tensor, int, float, float]:
    """restore_log_state with its loss sums widened to RUNNING_SLOTS (a checkpoint from before the Dispersive and
    REPA terms has three or four: the missing sums start at zero)."""
    running, *rest = restore_log_state(checkpoint, ctx.device, ctx.rank, ctx.world_size)
    return (torch.cat([running, running.new_zeros(RUNNING_SLOTS - len(running))]), *rest)


def log_saved(logger: logging.Logger, ctx: DistContext, saved: str, step: int, total: int,
              args: argparse.Namespace) -> None:
    """Once the checkpoint is on disk (a background write's end: in its thread), say where it went, with its
    write rate; then --keep-last: rank 0 removes rolling checkpoints (time cadence, stops) beyond the newest K;
    the step cadence's and the last step's stay."""
    def on_disk(stats: WriteStats | None) -> None:
        logger.info(f"Saved checkpoint to {saved}" + (f" ({stats.describe()})" if stats is not None else ""))
        if ctx.is_main:
            rolling = not (is_milestone(step, args.ckpt_every) or step == total)
            for path in prune_checkpoints(os.path.dirname(saved), saved, rolling, args.keep_last):
                logger.info(f"Removed {path} (--keep-last {args.keep_last})")

    when_written(saved, on_disk)


def finish_stopped(logger: logging.Logger, stop: StopSignals, ctx: DistContext, experiment_dir: str, step: int,
                   checkpoint: str | None, metrics: MetricLog, anm_model: anm.ANM | None, terms: Terms,
                   saved: bool = True) -> None:
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
    close_run(metrics, anm_model, terms, ctx)
    exit_preempted("train.py", message, ctx.is_main)


def signal_name(stop: StopSignals) -> str:
    """The signal this process got first; the ranks agree on a stop, so one may have got none."""
    return stop.first or "a signal to another rank"


def stop_in_setup(stop: StopSignals, ctx: DistContext, experiment_dir: str, step: int, resume_path: str | None,
                  anm_model: anm.ANM | None, terms: Terms) -> None:
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
    terms.close()
    cleanup(ctx)
    exit_preempted("train.py", message, ctx.is_main)


def resolve_run(args: argparse.Namespace, ctx: DistContext) -> tuple[str, str | None, dict | None, list[str],
                                                                       list[str]]:
    """Check the flags, find the checkpoint to resume (adopting the flags it saved) and check them again:
    (run folder, resume path, checkpoint, warnings, notes)."""
    check_args(args, ctx.world_size)
    experiment_dir, resume_path, checkpoint, warnings, notes = find_checkpoint(args, ctx)
    if checkpoint is not None:
        check_args(args, ctx.world_size)
    if args.resume is not None:  # left to here by parse_args: with the checkpoint's flags, or a new run's own
        check_ignored_flags(args, build_parser())
    return experiment_dir, resume_path, checkpoint, warnings, notes


#################################################################################
#                                  Training Loop                                #
#################################################################################

@catches_stop_signals  # SIGTERM/SIGUSR1/SIGINT stop the run after a step with a checkpoint, or before the first
def main(args: argparse.Namespace, stop: StopSignals) -> dict[str, Any]:
    """Train; returns final metrics, paths and the (unwrapped) model and EMA. A stop signal ends the run after a
    checkpoint with :class:`Preempted` (exit status 75); one during setup, before the first step and without one."""
    ctx = setup_distributed()
    experiment_dir, resume_path, checkpoint, warnings, notes = resolve_run(args, ctx)  # adopts saved flags
    seed = args.global_seed * ctx.world_size + ctx.rank
    generator = seed_everything(seed, ctx.device, args.deterministic)  # and fixed-order kernels if asked

    # Everything is validated before the run folder is created: data, model, ANM flags, resume checkpoint.
    data = load_data(args, ctx, seed)
    steps_per_epoch, max_steps = data.sampler.steps_per_epoch, total_steps(args, data.sampler.steps_per_epoch)
    warnings += ema_warnings(args.ema_decay, max_steps)
    config = model_config(args, data.in_channels, data.input_size, data.num_classes)
    fid = TrainingFID.setup(args, ctx, data, checkpoint, stop, max_steps, warnings)  # refuses a bad --fid-ref here
    raw, ema, anm_model, model, ddp, opt, terms = build_models(args, config, ctx, data, checkpoint)
    if any_rank(stop.requested, ctx):  # a signal during the setup so far: no step to save, no folder yet
        stop_in_setup(stop, ctx, experiment_dir, checkpoint["step"] if checkpoint else 0, resume_path, anm_model, terms)
    warnings += open_experiment(args, ctx, experiment_dir, checkpoint, resume_path, config, len(data.dataset),
                                steps_per_epoch, data.scaling)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    logger = create_logger(experiment_dir, ctx.rank, console=args.console_log)
    log_setup(logger, experiment_dir, ctx, data, config, raw, anm_model, terms, [*warnings, *data.notes], notes)
    train_steps, epoch, epoch_step = restore(checkpoint, raw, ema, opt, anm_model, generator, ctx, seed, logger)
    running, log_steps, log_seconds, elapsed = restore_running(checkpoint, ctx)
    metrics = MetricLog(args, experiment_dir, train_steps if checkpoint is not None else None, ctx.rank)
    del checkpoint
    ema_params, raw_params = ema_parameters(ema, raw)  # once: the EMA update and the clipping take these lists
    clipped = [*raw_params, *terms.parameters()]  # REPA's projector is clipped with the model

    transport = create_transport(args.path_type, args.prediction)
    t0, t1 = transport.interval()
    autocast = dict(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    if data.heldout is not None and train_steps == 0:
        metrics.write(dict(step=0, epoch=0, **heldout_losses(raw, ema, transport, data.heldout, args, ctx)))
    fid.catch_up(train_steps, epoch, ema, metrics, logger)  # a resumed step whose FID a stop signal abandoned
    last = dict(step=train_steps)
    if any_rank(stop.requested, ctx):  # a signal since the folder was opened, before this process's first step
        finish_stopped(logger, stop, ctx, experiment_dir, train_steps, resume_path, metrics, anm_model, terms, False)

    logger.info(f"Training for {max_steps - train_steps:,} more steps ...")
    progress = progress_bar(args, ctx, train_steps, max_steps)
    # running: FM, ANM loss, grad norm, Dispersive loss summed since the last log row (restored, as log_steps)
    checked_step, start_time, run_start = train_steps, time.time() - log_seconds, time.time() - elapsed
    agreement = step_agreement(stop, ctx, train_steps, args)
    stopped = False
    while train_steps < max_steps and not stopped:
        data.sampler.set_position(epoch, epoch_step)
        batches_this_epoch = 0
        for batch in batches(data.loader):
            batches_this_epoch += 1
            x, y, noise, u, *pixels = (tensor.to(ctx.device, non_blocking=True) for tensor in batch)
            images = pixels[0] if pixels else x  # REPA's encoder: the latents' images (data/latent_images.py), or x
            t = t0 + u * (t1 - t0)  # each item's time, drawn with its noise (see SeededItems)
            if data.encode:
                with torch.no_grad():  # posterior *sample*, as the reference
                    x = encode_images(data.vae, x, data.scaling, generator=generator)
            opt.zero_grad(set_to_none=True)
            forward_backward(model, ddp, anm_model, transport, (x, y, noise, t, images), train_steps, running,
                             autocast, args, terms)
            if args.max_grad_norm is not None:
                running[2] += nn.utils.clip_grad_norm_(clipped, args.max_grad_norm).float()
            opt.step()
            update_ema(ema_params, raw_params, args.ema_decay)

            train_steps += 1
            epoch, epoch_step = (epoch + 1, 0) if epoch_step + 1 == steps_per_epoch else (epoch, epoch_step + 1)
            log_steps += 1
            progress.update(1)

            row: dict[str, Any] = {}
            if train_steps % args.log_every == 0 or train_steps == max_steps:
                checked_step = check_finite(running, raw, ctx.world_size, checked_step, train_steps, checkpoint_dir)
                row.update(log_training(logger, progress, train_steps, running, log_steps,
                                        start_time + fid.pop_seconds(), args, anm_model, terms, ctx))
                running.zero_()
                log_steps, start_time = 0, time.time()
            if data.heldout is not None and (train_steps % args.eval_every == 0 or train_steps == max_steps):
                row.update(log_heldout(logger, train_steps, raw, ema, transport, data.heldout, args, ctx))
            row.update(fid.evaluate_if_due(train_steps, ema, logger))  # --fid-every: log.csv's fid, sfid, ...
            if row:
                row = dict(step=train_steps, epoch=epoch, **row, elapsed_s=time.time() - run_start)
                metrics.write(row)
                last.update(row)
            if args.sample_every > 0 and train_steps % args.sample_every == 0 and ctx.is_main:
                last["sample_grid"] = save_sample_grid(experiment_dir, train_steps, ema, transport, data, args)
            stopped, time_due = agreement.poll(train_steps)  # the same verdict on every rank
            stopped = (stopped or fid.stopped) and train_steps < max_steps  # at the last step the run is done anyway
            if is_milestone(train_steps, args.ckpt_every) or train_steps == max_steps or time_due or stopped:
                checked_step = check_finite(running, raw, ctx.world_size, checked_step, train_steps, checkpoint_dir)
                last["checkpoint"] = save_checkpoint(
                    checkpoint_dir, train_steps, epoch, epoch_step, raw, ema, opt, anm_model, generator, args, config,
                    len(data.dataset), ctx, log_state=log_state(running, log_steps, start_time, run_start),
                    latent_scaling=data.scaling, background=not stopped and train_steps < max_steps,
                    terms=terms.state_dict())
                agreement.saved()
                log_saved(logger, ctx, last["checkpoint"], train_steps, max_steps, args)
            if train_steps >= max_steps or stopped:
                break
        if batches_this_epoch == 0:  # a guard: an empty epoch would otherwise loop forever
            raise RuntimeError(f"epoch {epoch} from batch {epoch_step} yielded no batch")
    progress.close()
    last.setdefault("checkpoint", next(iter(checkpoint_paths(checkpoint_dir)), None))  # nothing left to train
    if stopped:
        finish_stopped(logger, stop, ctx, experiment_dir, train_steps, last["checkpoint"], metrics, anm_model, terms)

    logger.info("Done!")
    close_run(metrics, anm_model, terms, ctx)
    return dict(last, experiment_dir=experiment_dir, log_csv=os.path.join(experiment_dir, "log.csv"),
                model=raw, ema=ema, model_config=config)


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags (runtime/train_args.py), with this docstring as --help's description."""
    return train_args.build_parser(__doc__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of train.py (see --help)."""
    return train_args.parse_args(argv, __doc__)


if __name__ == "__main__":
    run(main, parse_args)
