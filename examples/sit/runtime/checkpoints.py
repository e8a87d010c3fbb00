"""A run's folder and its checkpoints: picking the checkpoint to resume from, creating the folder, loading
a checkpoint into the models, optimizer and RNG streams, and saving one (in the background, or at once for a
stop and the last step: runtime/checkpoint_writer.py). :func:`check_finite` stops the run before a NaN or
infinite loss or weight can reach a checkpoint.

Layout of a run: <results-dir>/<exp-name>/{args.json, checkpoints/<step>.pt, samples/, log.csv, log.txt},
and after a stop signal stopped.json (removed when the run starts again) and stops.jsonl (every stop, kept).

Rank 0 alone reads the checkpoints to pick one, creates the folder and writes the checkpoints; the other
ranks wait for it on the long-wait group (runtime/distributed.py), whose timeout no file system's pace
reaches, instead of in a collective that NCCL's watchdog ends.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import time
from collections.abc import Callable

import torch
from data.streams import rng_state, set_rng_state
from modeling.latent_scaling import LatentScaling
from modeling.latent_scaling import check_resume as check_resume_latents
from torch import nn

import anm
from runtime.atomic import atomic_write, pid_alive, remove_stale_temps
from runtime.checkpoint_writer import CheckpointWriter, WriteStats, to_host
from runtime.checks import (
    check_resume_compatible,
    check_run_folder,
    check_writable_path,
    checkpoint_paths,
    load_checkpoint,
    newest_loadable_checkpoint,
)
from runtime.cli import UsageError
from runtime.distributed import DistContext, all_mean, barrier, broadcast_object, gather_objects
from runtime.run_flags import adopt_saved_args, saved_args
from runtime.run_log import LOGGER_NAME

__all__ = ["experiment_name", "plan_resume", "remove_old_checkpoint_temps", "find_checkpoint", "open_experiment",
           "lock_run_folder", "restore", "restore_log_state", "check_finite", "save_checkpoint", "when_written",
           "WriteStats", "prune_checkpoints", "is_milestone", "write_stopped", "previous_stop", "STOPPED_FILE",
           "STOPS_FILE"]

STOPPED_FILE = "stopped.json"  # written when a signal stopped the run, removed when it starts again
STOPS_FILE = "stops.jsonl"  # one line per stop, appended, never removed: the run's history of stops
ROLLING_FILE = "rolling.json"  # the checkpoints --keep-last may delete, oldest first
_writer = CheckpointWriter()  # rank 0's checkpoint writes (at most one in the background)


def experiment_name(args: argparse.Namespace) -> str:
    """--exp-name, or <model>-<data>-<terms>: the terms on (anm, dispersive, repa, joined by '-') or 'baseline'.

    >>> experiment_name(argparse.Namespace(exp_name=None, model="SiT-B/4", data="latents", anm=True,
    ...                                    dispersive=False, repa=True))
    'SiT-B-4-latents-anm-repa'
    """
    terms = [name for name in ("anm", "dispersive", "repa") if getattr(args, name, False)]
    return args.exp_name or f"{args.model.replace('/', '-')}-{args.data}-{'-'.join(terms) or 'baseline'}"


def plan_resume(args: argparse.Namespace, experiment_dir: str) -> tuple[str | None, dict | None, list[str]]:
    """Check the run folder and pick the checkpoint to resume from: (path or None, its contents when
    they had to be read to pick it, warnings to log)."""
    check_writable_path(experiment_dir)  # args.json, the logs and the lock go here
    check_writable_path(os.path.join(experiment_dir, "checkpoints"))
    check_run_folder(experiment_dir, args.resume)
    if args.resume == "auto":
        return newest_loadable_checkpoint(os.path.join(experiment_dir, "checkpoints"))
    return args.resume, None, []


def remove_old_checkpoint_temps(checkpoint_dir: str) -> list[str]:
    """Delete `<step>.pt.tmp-<pid>` files of dead processes: the temp names of train.py before runtime/atomic.py."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.pt.tmp-*")):
        match = re.fullmatch(r"\d+\.pt\.tmp-(\d+)", os.path.basename(path))
        if match is None:
            continue
        if not pid_alive(int(match[1])):
            os.remove(path)
            removed.append(path)
    return removed


def find_checkpoint(args: argparse.Namespace, ctx: DistContext
                    ) -> tuple[str, str | None, dict | None, list[str], list[str]]:
    """The run folder and the checkpoint to resume from (rank 0 decides, every rank follows), with ``args``
    made the saved run's (see run_flags.py). Returns (experiment dir, checkpoint path or None, checkpoint or
    None, warnings, notes on restored and changed flags). Creates nothing."""
    checkpoint, notes = None, []
    if args.resume not in (None, "auto"):  # the saved flags may name the folder (default --exp-name)
        checkpoint = load_checkpoint(args.resume)
        notes = adopt_saved_args(args, checkpoint["args"], args.resume)
    experiment_dir = os.path.join(args.results_dir, experiment_name(args))
    decision: tuple | str = ""
    loaded = None  # rank 0 read the checkpoint to pick it: not read twice
    if ctx.is_main:
        try:
            resume_path, loaded, warnings = plan_resume(args, experiment_dir)
            decision = (resume_path, warnings, previous_stop(experiment_dir))
        except UsageError as error:
            decision = str(error)
    decision = broadcast_object(decision, long_wait=True)  # rank 0 may have read several checkpoints
    if isinstance(decision, str):
        raise UsageError(decision)
    resume_path, warnings, stop_note = decision
    if args.resume == "auto" and resume_path is not None:
        checkpoint = loaded if loaded is not None else load_checkpoint(resume_path)
        notes = adopt_saved_args(args, checkpoint["args"], resume_path)
    return experiment_dir, resume_path, checkpoint, warnings, notes + ([stop_note] if stop_note else [])


def previous_stop(experiment_dir: str) -> str | None:
    """A log line on the stop that <experiment_dir>/stopped.json records, which a start removes (stops.jsonl
    keeps it); None when there is none."""
    try:
        with open(os.path.join(experiment_dir, STOPPED_FILE)) as f:
            record = json.load(f)
        when = f"after step {int(record['step']):,}" if record.get("checkpoint") else "before its first step"
        what = f"{record['signal']} {when}"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (f"This run was stopped by {what} ({STOPPED_FILE}); the marker is removed as the run goes on, "
            f"{STOPS_FILE} keeps every stop")


def open_experiment(args: argparse.Namespace, ctx: DistContext, experiment_dir: str, checkpoint: dict | None,
                    resume_path: str | None, config: dict, num_items: int, steps_per_epoch: int,
                    latent_scaling: LatentScaling | None = None) -> list[str]:
    """Check the checkpoint against the model and data these arguments built (and the latents' VAE factors),
    then create the folder (locked), clear a previous stop's marker and write args.json. Returns warnings to
    log."""
    if checkpoint is not None:
        check_resume_compatible(checkpoint, resume_path, args, config, num_items, steps_per_epoch)
        check_resume_latents(checkpoint, resume_path, latent_scaling)
    failure, warnings = "", []
    if ctx.is_main:
        checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
        os.makedirs(experiment_dir, exist_ok=True)
        try:
            lock_run_folder(experiment_dir)
        except UsageError as error:  # every rank stops, instead of the others waiting at the barrier
            failure = str(error)
        if not failure:
            os.makedirs(checkpoint_dir, exist_ok=True)
            os.makedirs(os.path.join(experiment_dir, "samples"), exist_ok=True)
            stale = remove_stale_temps(checkpoint_dir) + remove_old_checkpoint_temps(checkpoint_dir)
            warnings += [f"removed {path} (left by a killed process)" for path in stale]
            with contextlib.suppress(FileNotFoundError):  # this run is under way again
                os.remove(os.path.join(experiment_dir, STOPPED_FILE))
            with atomic_write(os.path.join(experiment_dir, "args.json")) as f:
                f.write(json.dumps(saved_args(args), indent=1).encode())
    if broadcast_object(failure, long_wait=True):  # rank 0's folder work: a slow file system's pace
        raise UsageError(failure)
    barrier(long_wait=True)
    return warnings


_held_locks: dict[str, int] = {}  # run folder -> open lock file, held until this process exits


def lock_run_folder(experiment_dir: str) -> None:
    """Hold <experiment_dir>/.lock exclusively for the rest of this process, or raise UsageError if another
    process holds it: two trainings in one folder would overwrite each other's checkpoints and logs.

    The kernel drops the lock when the process ends, even on kill -9. A file system without locks (some
    network mounts) leaves the run unprotected rather than refusing it."""
    key = os.path.realpath(experiment_dir)
    if key in _held_locks:  # main() run again in this process (tests, demo.py): the lock is already ours
        return
    fd = os.open(os.path.join(experiment_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{experiment_dir} is in use by another train.py process (it holds {experiment_dir}/.lock): "
                         "wait for it to end, or start this run under another --exp-name") from None
    except OSError:
        os.close(fd)
        return
    _held_locks[key] = fd


def restore(checkpoint: dict | None, raw: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
            anm_model: anm.ANM | None, generator: torch.Generator, ctx: DistContext, seed: int,
            logger: logging.Logger) -> tuple[int, int, int]:
    """Load a checkpoint (if any) into the models, optimizer and RNGs; returns (step, epoch, batch in epoch).
    Its "terms" (REPA's projector) were loaded when they were built (train.build_models)."""
    if checkpoint is None:
        return 0, 0, 0
    raw.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    opt.load_state_dict(checkpoint["opt"])  # after creating the optimizer (a reference bug otherwise)
    if anm_model is not None and checkpoint.get("anm") is not None:
        anm_model.load_anm_state_dict(checkpoint["anm"])
    step = checkpoint["step"]
    if checkpoint["world_size"] == ctx.world_size:
        set_rng_state(checkpoint["rng"][ctx.rank], generator, ctx.device)
    else:  # the data, noise and t of each step do not depend on the world size; label dropout is reseeded
        logger.info(f"world size changed ({checkpoint['world_size']} -> {ctx.world_size}): reseeding RNGs")
        generator.manual_seed(seed + step)
        torch.manual_seed(seed + step)
    logger.info(f"Resumed at step {step} (epoch {checkpoint['epoch']}, batch {checkpoint['epoch_step']})")
    return step, checkpoint["epoch"], checkpoint["epoch_step"]


def check_finite(running: torch.Tensor, raw: nn.Module, world_size: int, checked_step: int, step: int,
                 checkpoint_dir: str) -> int:
    """Stop the run if a loss since the last check (at checked_step), or a weight, is NaN or infinite (one
    device sync, at log and checkpoint steps only); returns step, the new last checked step."""
    if checked_step == step:  # a log step that is also a checkpoint step: checked a moment ago
        return step
    weights_finite = torch.stack([torch.isfinite(p).all() for p in raw.parameters()]).all()
    finite = torch.isfinite(running).all() & weights_finite
    if all_mean(finite.float(), world_size).item() == 1.0:
        return step
    _writer.wait()  # a checkpoint still being written is of a checked step: name it once it is on disk
    newest = checkpoint_paths(checkpoint_dir)
    kept = f"the newest checkpoint, {newest[0]}, is from before" if newest else "no checkpoint was saved"
    raise UsageError(f"the loss became NaN or infinite between steps {checked_step + 1} and {step}; {kept}. Lower --lr "
                     "(or --max-grad-norm), check the data, and resume with --resume auto")


def save_checkpoint(checkpoint_dir: str, step: int, epoch: int, epoch_step: int, raw: nn.Module, ema: nn.Module,
                    opt: torch.optim.Optimizer, anm_model: anm.ANM | None, generator: torch.Generator,
                    args: argparse.Namespace, config: dict, num_items: int, ctx: DistContext,
                    log_state: dict | None = None, latent_scaling: LatentScaling | None = None,
                    background: bool = False, terms: dict | None = None) -> str:
    """Write <checkpoint_dir>/<step>.pt: everything an exact resume needs (every rank's RNG streams
    included), atomically and durably. Returns its path.

    log_state (``running``: this rank's loss sums since the last log row, ``log_steps``, ``log_seconds``,
    ``elapsed_s``) lets the first log row after a resume average the same steps as a straight run's.

    terms: the state of the representation terms (REPA's projector), left out of what sample.py loads.

    background: rank 0 copies the state to host memory and writes it in a thread while training goes on
    (:func:`when_written` runs code once it is on disk); otherwise the checkpoint is on disk when this returns
    (a stop's, the last step's). Rank 0 first ends its write in flight: it completes it, or abandons a rolling
    one for a synchronous save, which supersedes it; that write's failure (a full disk) stops every rank
    here."""
    path = os.path.join(checkpoint_dir, f"{step:07d}.pt")
    rng = gather_objects(rng_state(generator, ctx.device), ctx.world_size)
    if log_state is not None:  # every rank's own sums (world x slots): their mean would round otherwise
        log_state = dict(log_state, running=torch.stack(gather_objects(log_state["running"].cpu(), ctx.world_size)))
    failure = ""
    if ctx.is_main:
        failure, abandoned = _writer.wait(abandon_rolling=not background)
        if abandoned is not None:
            logging.getLogger(LOGGER_NAME).info(f"Abandoned the background write of {abandoned}: the checkpoint "
                                                f"of step {step} supersedes it")
    if ctx.is_main and not failure:
        state = {
            "model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "step": step, "epoch": epoch, "epoch_step": epoch_step, "num_items": num_items,  # data position
            "rng": rng, "world_size": ctx.world_size,
            "anm": anm_model.anm_state_dict() if anm_model is not None else None,
            "args": saved_args(args), "model_config": config,  # sample.py rebuilds the model from these
            "latent": args.data in ("imagenet", "latents"),
            "vae": args.vae if args.data in ("imagenet", "latents") else None,
            "latent_scaling": latent_scaling.record() if latent_scaling is not None else None,  # decode with these
            "log_state": log_state,
            "terms": terms or {},
        }
        try:
            if background:
                copy_start = time.monotonic()
                host = to_host(state)  # training changes the weights in place from the next step on
                _writer.submit(path, host, rolling=not is_milestone(step, args.ckpt_every))
                logging.getLogger(LOGGER_NAME).info(f"Writing checkpoint {path} in the background (state copied "
                                                    f"to host memory in {time.monotonic() - copy_start:.1f} s)")
            else:
                _writer.write_now(path, state)
        except UsageError as error:  # a full disk: every rank stops with the message instead of waiting
            failure = str(error)
        except OSError as error:
            failure = f"cannot write checkpoint {path} ({error}): fix the folder and resume with --resume auto"
    if broadcast_object(failure, long_wait=True):  # however long rank 0's write took
        raise UsageError(failure)
    return path


def when_written(path: str, fn: Callable[[WriteStats | None], None]) -> None:
    """Run fn(stats) once the checkpoint at path, just saved, is on disk: at once, or (a background write on
    this rank) in the writer thread when its write ends; stats gives its size and write time when known.
    Nothing runs for a background write that fails or is abandoned."""
    _writer.after(path, fn)


def restore_log_state(checkpoint: dict | None, device: torch.device, rank: int = 0, world_size: int = 1
                      ) -> tuple[torch.Tensor, int, float, float]:
    """(this rank's loss sums since the last log row, steps they cover, seconds since that row, run time so far)
    saved with the checkpoint; zeros for a new run or a checkpoint that predates them.

    The checkpoint holds every rank's sums, so that the first log row after a resume averages the very numbers
    a straight run's does, bit for bit. With another number of ranks each takes their mean (the row's value up
    to rounding), as from a checkpoint that saved the mean only."""
    state = (checkpoint or {}).get("log_state")
    if state is None:
        return torch.zeros(3, device=device), 0, 0.0, 0.0
    running = state["running"]
    if running.dim() == 2:
        running = running[rank] if len(running) == world_size else running.mean(0)
    return running.to(device), state["log_steps"], state["log_seconds"], state["elapsed_s"]


def is_milestone(step: int, ckpt_every: int) -> bool:
    """A checkpoint of the step cadence (a multiple of --ckpt-every): never removed by --keep-last."""
    return step % ckpt_every == 0


def prune_checkpoints(checkpoint_dir: str, saved: str, rolling: bool, keep_last: int) -> list[str]:
    """Record the checkpoint just saved in <checkpoint_dir>/rolling.json if it is a rolling one (the time
    cadence or a stop), then delete the recorded rolling ones older than the newest
    ``keep_last`` (0 keeps all). Only checkpoints this file lists are ever deleted: milestones, and files of
    runs before it, stay whatever --ckpt-every says later. Returns the removed paths."""
    index = os.path.join(checkpoint_dir, ROLLING_FILE)
    names: list[str] = []
    if os.path.exists(index):
        with contextlib.suppress(ValueError, OSError), open(index) as f:
            names = [name for name in json.load(f) if isinstance(name, str)]
    name = os.path.basename(saved)
    if not rolling and name not in names:
        return []  # a milestone: nothing to record (the index is only written once a rolling one exists)
    names = [n for n in names if n != name] + ([name] if rolling else [])
    names.sort(key=lambda n: int(n[:-3]) if n[:-3].isdigit() else -1)
    saved_step = int(name[:-3])
    # Past the saved step: a run resumed from an older checkpoint; those files are not this run's history.
    older = [n for n in names if n[:-3].isdigit() and int(n[:-3]) <= saved_step]
    doomed = older[:-keep_last] if keep_last > 0 else []
    removed = []
    for n in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(checkpoint_dir, n))
            removed.append(os.path.join(checkpoint_dir, n))
    names = [n for n in names if n not in doomed]
    with atomic_write(index) as f:
        f.write(json.dumps(names).encode())
    return removed


def write_stopped(experiment_dir: str, signal_name: str, step: int, checkpoint: str | None, exit_status: int) -> str:
    """<experiment_dir>/stopped.json: which signal stopped the run at which step, and its checkpoint (None: a
    stop before the first step of a new run). A requeue script tests it where the exit status is lost
    (torchrun's agent exits 1 after a signal); the next start removes it. The same record, with the time, is
    appended to <experiment_dir>/stops.jsonl, which stays: every stop of the run, oldest first."""
    path = os.path.join(experiment_dir, STOPPED_FILE)
    record = dict(signal=signal_name, step=step, checkpoint=checkpoint, exit_status=exit_status)
    with atomic_write(path) as f:
        f.write(json.dumps(record, indent=1).encode())
    stamped = dict(record, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with open(os.path.join(experiment_dir, STOPS_FILE), "a") as f:  # a torn last line is skipped by readers
        f.write(json.dumps(stamped) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path
