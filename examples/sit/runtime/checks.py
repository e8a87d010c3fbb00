"""What train.py checks before it creates anything on disk, and when it resumes.

Every function raises :class:`cli.UsageError` with one line naming the problem and the fix:

- :func:`check_args`: numbers that make no sense (batch 0, ``--max-steps 0``, ...), an ``--exp-name`` that
  would write outside ``--results-dir``, a missing optional logger.
- :func:`check_ignored_flags`: flags the chosen data, or ``--no-anm``, would silently ignore.
- :func:`check_run_folder`: a rerun under an existing experiment name without ``--resume``.
- :func:`load_checkpoint` / :func:`newest_loadable_checkpoint`: an empty, truncated or foreign file.
- :func:`check_resume_compatible`: a checkpoint of another model, data set or batch size (and
  :func:`heldout_fix`: a data set that differs by the held-out items, naming ``--eval-every`` and
  ``--eval-data-path``).

Example:
    >>> from checks import check_exp_name
    >>> check_exp_name("SiT-B-4-latents-anm")
    >>> check_exp_name("../x")
    Traceback (most recent call last):
    ...
    cli.UsageError: --exp-name '../x' must be a plain folder name (no '/', '..' or absolute path): ...
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import re
from typing import Any

import torch

from runtime.checkpoint_weights import check_checkpoint_weights
from runtime.cli import UsageError

__all__ = ["check_args", "ema_warnings", "check_exp_name", "check_ignored_flags", "check_run_folder",
           "check_writable_path", "check_device", "checkpoint_paths", "read_checkpoint", "load_checkpoint",
           "newest_loadable_checkpoint", "check_resume_compatible", "heldout_fix", "CHECKPOINT_KEYS"]

# What a train.py checkpoint must hold to resume from it.
CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "epoch", "epoch_step", "rng", "world_size", "args",
                   "model_config")
# Settings that decide which sample a step sees: changing them mid-run would silently change the data
# stream (the saved position is a batch index, meaningless under another batch size or data set).
STREAM_SETTINGS = ("data", "data_size", "global_batch_size", "global_seed")
# Files that mark a folder as holding a run.
RUN_FILES = ("log.csv", "log.txt", "args.json")
MAX_DATA_SIZE = 10**8  # --data sinusoid: an epoch's shuffled index list of this length takes ~4 GB
MAX_NAME_BYTES = 255  # one path component on common file systems (ext4, xfs, btrfs, tmpfs)


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Argument problems that need no file: counts, divisibility, ignored flags, the experiment name."""
    positive = dict(global_batch_size=args.global_batch_size, max_steps=args.max_steps, epochs=args.epochs,
                    ckpt_every=args.ckpt_every, log_every=args.log_every, grad_accum_steps=args.grad_accum_steps,
                    eval_batch_size=args.eval_batch_size, sample_grid=args.sample_grid,
                    sample_num_steps=args.sample_num_steps, eval_samples=args.eval_samples)
    for name, value in positive.items():
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            hint = " (nothing to train)" if name in ("max_steps", "epochs") else ""
            raise UsageError(f"{flag} must be > 0, got {value}{hint}")
    for name in ("eval_every", "sample_every", "num_workers", "weight_decay"):
        if not 0 <= getattr(args, name) < math.inf:  # written so that NaN fails too
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (0 = never/none), got {getattr(args, name)}")
    for name in ("hidden_size", "depth", "num_heads", "image_size", "data_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.data_size is not None and args.data_size > MAX_DATA_SIZE:
        raise UsageError(f"--data-size must be <= {MAX_DATA_SIZE:,} (every epoch shuffles a list of that many "
                         f"indices in memory), got {args.data_size:,}")
    if not 0 <= args.global_seed < 2**32:
        raise UsageError(f"--global-seed must be in [0, 2**32), got {args.global_seed}")
    if not 0 < args.lr < math.inf:
        raise UsageError(f"--lr must be > 0 and finite, got {args.lr}")
    if not 0 <= args.ema_decay <= 1:
        raise UsageError(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if not 0 <= args.class_dropout_prob <= 1:
        raise UsageError(f"--class-dropout-prob must be in [0, 1], got {args.class_dropout_prob}")
    if not 0 <= args.sample_cfg_scale < math.inf:
        raise UsageError(f"--sample-cfg-scale must be a finite number >= 0 (1 = no guidance), got "
                         f"{args.sample_cfg_scale}")
    if args.sample_every > 0 and args.sample_cfg_scale > 1 and args.class_dropout_prob == 0:
        raise UsageError(f"--sample-cfg-scale {args.sample_cfg_scale} guides the grids with the null class, which "
                         "--class-dropout-prob 0 does not train: use --sample-cfg-scale 1 or a dropout > 0")
    if args.max_grad_norm is not None and not 0 < args.max_grad_norm < math.inf:
        raise UsageError(f"--max-grad-norm must be > 0 and finite, got {args.max_grad_norm} (leave it out to "
                         "not clip)")
    minutes = getattr(args, "ckpt_every_minutes", None)
    if minutes is not None and not 0 < minutes < math.inf:
        raise UsageError(f"--ckpt-every-minutes must be > 0 and finite, got {minutes} (leave it out for none)")
    sync = getattr(args, "stop_sync_seconds", 1.0)
    if not 0 < sync < math.inf:
        raise UsageError(f"--stop-sync-seconds must be > 0 and finite, got {sync}")
    if getattr(args, "keep_last", 0) < 0:
        raise UsageError(f"--keep-last must be >= 0 (0 = keep every checkpoint), got {args.keep_last}")
    if args.resume == "":
        raise UsageError("--resume '' names no checkpoint: pass a checkpoint path or 'auto', or drop the flag")
    if not args.results_dir:  # an unset shell variable: the run would land in the current folder
        raise UsageError("--results-dir '' names no folder: pass one (default: results), or '.' for this one")
    per_step = world_size * args.grad_accum_steps
    if args.global_batch_size % per_step:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} "
                         f"process(es) x --grad-accum-steps {args.grad_accum_steps}: use a multiple of {per_step}")
    check_exp_name(args.exp_name)
    check_loggers(args.report_to)


def ema_warnings(decay: float, max_steps: int) -> list[str]:
    """A warning when --ema-decay is too slow for the run's length: the EMA then still holds much of the
    initialisation at the end (decay ** max_steps of it), and its samples, grids and FID show little of
    the training. [] when the EMA forgets its start (decay ** steps <= 5%, i.e. (1 - decay) * steps >= ~3).

    >>> ema_warnings(0.9999, 400_000), len(ema_warnings(0.9999, 2000))
    ([], 1)
    """
    left = decay ** max_steps
    if left <= 0.05:
        return []
    return [f"--ema-decay {decay} over {max_steps:,} steps leaves {left:.0%} of the initial weights in the EMA at the "
            "end (decay ** steps): its samples, grids and FIDs would show mostly the initialisation; for a run this "
            f"short use --ema-decay {max(0.0, 1 - 3 / max_steps):.4g} or lower (1 - 3 / steps), or train longer"]


def check_exp_name(name: str | None) -> None:
    """An experiment name is one folder inside --results-dir: no separators, no '..', not absolute."""
    if name is None:
        return
    if name in ("", ".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise UsageError(f"--exp-name {name!r} must be a plain folder name (no '/', '..' or absolute path): "
                         "the run folder is <--results-dir>/<--exp-name>")
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise UsageError(f"--exp-name is {len(os.fsencode(name))} bytes long; file systems allow "
                         f"{MAX_NAME_BYTES} per folder name: choose a shorter one")


def check_ignored_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that the chosen data (or --no-anm) would silently ignore are refused: the user meant something.

    A flag counts as given when its value differs from the parser's default."""
    ignored: list[str] = []
    if args.data == "latents" and args.image_size is not None:
        ignored.append("--image-size (the latents' meta.json sets the size)")
    if args.data != "sinusoid" and args.data_size is not None:
        ignored.append(f"--data-size (only --data sinusoid generates images; --data {args.data} has its own size)")
    if args.data == "sinusoid" and args.data_path is not None:
        ignored.append("--data-path (--data sinusoid generates its images)")
    if args.data in ("sinusoid", "fashion-mnist") and args.eval_data_path is not None:
        ignored.append(f"--eval-data-path (--data {args.data} brings its own held-out set)")
    if not args.anm:
        ignored += [f"--{name.replace('_', '-')} (ANM is off: add --anm)" for name in sorted(vars(args))
                    if name.startswith("anm_") and getattr(args, name) != parser.get_default(name)]
    if not getattr(args, "dispersive", True):
        ignored += [f"--{name.replace('_', '-')} (Dispersive Loss is off: add --dispersive)"
                    for name in sorted(vars(args))
                    if name.startswith("dispersive_") and getattr(args, name) != parser.get_default(name)]
    if not getattr(args, "repa", True):
        ignored += [f"--{name.replace('_', '-')} (REPA is off: add --repa)" for name in sorted(vars(args))
                    if name.startswith("repa_") and getattr(args, name) != parser.get_default(name)]
    elif args.data != "latents" and args.repa_image_path is not None:
        ignored.append(f"--repa-image-path (--data {args.data} has its images in hand; it is for --data latents)")
    if ignored:
        raise UsageError(f"{ignored[0]} would be ignored: drop it")


def check_loggers(report_to: list[str]) -> None:
    """The optional loggers of --report-to must be installed before the run starts."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in report_to:
        if name in packages and importlib.util.find_spec(packages[name]) is None:
            raise UsageError(f"--report-to {name} needs the {packages[name]} package: "
                             f"pip install {packages[name]} (or drop --report-to {name}; log.csv is always written)")


def check_writable_path(path: str, flag: str = "--results-dir") -> None:
    """Raise now if ``path`` (a folder, maybe not yet created) could not be created and written."""
    from runtime.atomic import check_writable

    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot create {path}: {existing} is a file, not a folder; choose another {flag}")
    check_writable(existing)


def check_device(name: str, flag: str = "--device", allowed: tuple[str, ...] = ("cpu", "cuda")) -> torch.device:
    """``torch.device(name)``, or UsageError when it is no device, not one of ``allowed``, or not here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"{flag} {name!r} is not a device: use {' or '.join(allowed)}") from error
    if device.type not in allowed:
        raise UsageError(f"{flag} {name}: this script runs on {' or '.join(allowed)} only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: CUDA is not available here; use {flag} cpu")
    return device


def checkpoint_paths(checkpoint_dir: str) -> list[str]:
    """train.py checkpoints (``<step>.pt``) in a folder, newest (highest step) first."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.pt"))
             if re.fullmatch(r"\d+\.pt", os.path.basename(p))]
    return sorted(paths, key=lambda p: int(os.path.basename(p)[:-3]), reverse=True)


def check_run_folder(experiment_dir: str, resume: str | None) -> None:
    """Refuse to start a second run in a folder that holds one: the two would overwrite and mix.

    ``--resume auto`` continues the folder's own run; ``--resume PATH`` may continue it from one of its own
    checkpoints, or branch another run's checkpoint into a new folder.
    """
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    if resume == "auto" or not os.path.isdir(experiment_dir):
        return
    if resume is not None and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(checkpoint_dir):
        return
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(experiment_dir, name))]
    checkpoints = checkpoint_paths(checkpoint_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s)")
    if found:
        raise UsageError(f"{experiment_dir} already holds a run ({', '.join(found)}): continue it with "
                         "--resume auto, or start a new one under another --exp-name")


def read_checkpoint(path: str, flag: str = "--ckpt") -> Any:
    """``torch.load(path)`` on the CPU, weights only and memory-mapped; UsageError naming the file (and
    ``flag``) when it is missing, a folder, empty, truncated, corrupt or not a PyTorch checkpoint.

    Memory-mapped (``mmap=True``): the tensors are read from the file as they are copied into a model or an
    optimizer, through the page cache that every rank of a node shares, instead of each rank holding a private
    copy of the whole file (SiT-XL/2's 10.8 GB checkpoint on 8 ranks was 86 GB of host memory). A file in
    torch's legacy (pre-zip) format cannot be mapped and is read whole."""
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} does not exist: check {flag}")
    if os.path.isdir(path):
        raise UsageError(f"checkpoint {path} is a folder: pass the .pt file, e.g. <run>/checkpoints/0400000.pt")
    if os.path.getsize(path) == 0:
        raise UsageError(f"checkpoint {path} is empty (0 bytes): copy it again or choose another {flag}")
    try:
        # weights_only keeps loading safe; train.py's checkpoints may also hold an argparse Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # not a zip: no mapping
    except Exception as error:  # noqa: BLE001 — arbitrary bytes make the unpickler raise almost anything
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint "
                         f"({reason[:200]}); copy it again or choose another {flag}") from error


def load_checkpoint(path: str) -> dict[str, Any]:
    """A train.py checkpoint, or UsageError naming the file if it is missing, unreadable or incomplete."""
    checkpoint = read_checkpoint(path, flag="--resume (or use --resume auto)")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError(f"checkpoint {path} lacks {', '.join(missing)}: not a train.py checkpoint (or an "
                         "incomplete one); resume from another one")
    return checkpoint


def newest_loadable_checkpoint(checkpoint_dir: str) -> tuple[str | None, dict | None, list[str]]:
    """(path of the newest checkpoint that loads, its contents, warnings naming the newer ones that do not).

    (None, None, []) when the folder holds no checkpoint; UsageError when it holds some but none loads.
    """
    warnings: list[str] = []
    paths = checkpoint_paths(checkpoint_dir)
    for path in paths:
        try:
            return path, load_checkpoint(path), warnings
        except UsageError as error:
            warnings.append(f"skipping {error}")
    if paths:
        raise UsageError(f"none of the {len(paths)} checkpoint(s) in {checkpoint_dir} loads ({warnings[0]}): "
                         "resume from a good copy with --resume PATH, or start a new --exp-name")
    return None, None, warnings


def check_resume_compatible(checkpoint: dict, path: str, args: argparse.Namespace, model_config: dict,
                            num_items: int, steps_per_epoch: int) -> None:
    """The checkpoint's model and data stream must be the ones these arguments build."""
    saved_config = checkpoint["model_config"]
    differing = [f"{key}={saved_config.get(key)!r} (now {value!r})" for key, value in model_config.items()
                 if saved_config.get(key) != value]
    if differing:
        raise UsageError(f"checkpoint {path} is another model: {', '.join(differing)}; resume with the flags it "
                         "was trained with (its args are stored inside), or start a new --exp-name")
    saved_args = checkpoint["args"]
    differing = [f"--{key.replace('_', '-')} {saved_args.get(key)!r} (now {getattr(args, key)!r})"
                 for key in STREAM_SETTINGS if key in saved_args and saved_args.get(key) != getattr(args, key)]
    saved_items = checkpoint.get("num_items")
    fix = ("resume with those settings (--grad-accum-steps and the number of processes may change), or start a "
           "new --exp-name")
    if saved_items is not None and saved_items != num_items:
        differing.append(f"a data set of {saved_items} items (now {num_items})")
        fix = heldout_fix(saved_args, saved_items, args, num_items) or fix
    elif not 0 <= checkpoint["epoch_step"] < steps_per_epoch:  # checkpoints that predate num_items
        differing.append(f"batch {checkpoint['epoch_step']} of an epoch (now {steps_per_epoch} batches per epoch)")
    if differing:
        raise UsageError(f"checkpoint {path} was trained with {', '.join(differing)}: its data position only "
                         f"means something with the same data and global batch; {fix}")
    check_checkpoint_weights(checkpoint, path, model_config)


def heldout_fix(saved_args: dict[str, Any], saved_items: int, args: argparse.Namespace, num_items: int) -> str | None:
    """What to pass when the training set's length differs from the checkpoint's by exactly the held-out items.

    With --data imagenet / latents, ``--eval-every > 0`` without ``--eval-data-path`` removes ``--eval-samples``
    items from training (data/train_data.py), so these two operational and location flags change the data
    set. A checkpoint of a run on the whole set (``--eval-every 0``, ``--eval-data-path``, or one saved before
    held-out items were removed) and a run that holds items out then differ by ``--eval-samples`` items.
    None when the difference is something else."""
    if args.data not in ("imagenet", "latents"):
        return None
    n = args.eval_samples
    if args.eval_every > 0 and args.eval_data_path is None and saved_items - num_items == n:
        return (f"the checkpoint trained on the whole set, while --eval-every {args.eval_every} without "
                f"--eval-data-path holds --eval-samples {n} of its items out of training: resume with --eval-every 0 "
                "or --eval-data-path (a held-out set of its own, e.g. the ImageNet validation folder)")
    if num_items - saved_items == n and not (args.eval_every > 0 and args.eval_data_path is None):
        why = " and ".join(([f"--eval-data-path {args.eval_data_path}"] if args.eval_data_path is not None else [])
                           + (["--eval-every 0"] if args.eval_every == 0 else []))
        every = saved_args.get("eval_every") or "N > 0"
        return (f"the checkpoint held --eval-samples {n} items out of training for its held-out loss, while "
                f"{why} trains on all of them: resume with --eval-every {every} and without --eval-data-path")
    return None
