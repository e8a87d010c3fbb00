"""The --fid-* flags of train.py (metrics during training) and evaluate_run.py (after training): the samples,
the reference batch, and sample_ddp.py's sampler and guidance flags under a ``--fid-`` prefix, with its
defaults (runtime/sampling_cli.py defines them once for all the scripts). Every key they add to args.json
starts with ``fid_``.

    >>> parser = argparse.ArgumentParser(); add_fid_args(parser)
    >>> args = parser.parse_args(["--fid-every", "5000", "--fid-ref", "ref.npz", "--fid-num-steps", "100"])
    >>> resolve_fid_sampler(args, in_channels=4, has_null_class=True)["sampler"]["num_steps"]
    100
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from modeling.generation import FIXED_STEP_METHODS, resolve_cfg_channels

from runtime.cli import UsageError
from runtime.sampling_cli import add_guidance_args, add_sampler_args, check_sampling_args, positive_int, resolve_sampler

__all__ = ["FID_DEFAULTS", "add_fid_args", "resolve_fid_sampler", "store_resolved", "check_given_without_cadence"]

# sample_ddp.py's defaults (--mode sde --sampling-method euler --num-steps 250 --per-proc-batch-size 32
# --global-seed 0 --precision fp32 --cfg-scale 1), so that a FID during training is the FID of sample_ddp.py's
# .npz of the same checkpoint; 10,000 samples: FID-10k.
FID_DEFAULTS = dict(mode="sde", method="euler", steps=dict(ode=250, sde=250), samples=10_000, per_proc_batch_size=32,
                    global_seed=0, precision="fp32")
# The sampler and guidance flags, as sampling_cli names them (train.py's are these with fid_ in front).
SAMPLER_KEYS = ("mode", "method", "sampling_method", "num_steps", "atol", "rtol", "diffusion_form", "diffusion_norm",
                "last_step", "last_step_size", "cfg_scale", "cfg_channels", "guidance_interval", "global_seed")


def add_fid_args(parser: argparse.ArgumentParser, cadence: bool = True) -> None:
    """The --fid-* flags; cadence adds --fid-every (train.py), evaluate_run.py evaluates checkpoints instead."""
    group = parser.add_argument_group("FID-N, sFID, precision, recall of the EMA's samples (as sample_ddp.py + "
                                      "evaluate.py)")
    if cadence:
        group.add_argument("--fid-every", type=int, default=0,
                           help="steps between evaluations (and the last step); 0 = never (default: 0)")
    group.add_argument("--fid-samples", type=positive_int, default=FID_DEFAULTS["samples"],
                       help="samples per evaluation: FID-N of N samples (default: %(default)s)")
    group.add_argument("--fid-ref", type=str, default=None,
                       help="ADM reference batch .npz (arr_0 + mu/sigma/mu_s/sigma_s) at the samples' resolution, e.g. "
                            "VIRTUAL_imagenet256_labeled.npz or build_reference.py's output (required with FID)")
    group.add_argument("--fid-per-proc-batch-size", type=positive_int, default=FID_DEFAULTS["per_proc_batch_size"],
                       help="samples per forward pass and process; does not change the samples (default: %(default)s)")
    group.add_argument("--fid-global-seed", type=int, default=FID_DEFAULTS["global_seed"],
                       help="seed of every sample's label and noise, as sample_ddp.py's --global-seed "
                            "(default: %(default)s)")
    group.add_argument("--fid-precision", choices=["fp32", "bf16"], default=FID_DEFAULTS["precision"],
                       help="bf16: the network under bf16 autocast while sampling (default: %(default)s)")
    add_sampler_args(parser, FID_DEFAULTS["mode"], FID_DEFAULTS["method"], prefix="fid-",
                     steps_help="fixed-step integration steps, as sample_ddp.py's --num-steps (default: 250)")
    add_guidance_args(parser, "guidance scale, 1 = none (default: 1.0)", prefix="fid-")


def _unprefixed(args: argparse.Namespace) -> argparse.Namespace:
    """The fid_* sampler flags under sampling_cli's names, with sample_ddp.py's default integrator."""
    return argparse.Namespace(default_method=FID_DEFAULTS["method"],
                              **{key: getattr(args, f"fid_{key}") for key in SAMPLER_KEYS})


def resolve_fid_sampler(args: argparse.Namespace, in_channels: int, has_null_class: bool) -> dict[str, Any]:
    """{sampler (sampling_cli.resolve_sampler's settings), cfg_scale, cfg_channels (None without guidance),
    guidance_interval} of the --fid-* flags, or cli.UsageError naming the --fid-* flag, as sample_ddp.py would
    name its own."""
    view = _unprefixed(args)
    try:
        check_sampling_args(view)
        sampler = resolve_sampler(view, FID_DEFAULTS["steps"])
        cfg_scale = 1.0 if view.cfg_scale is None else view.cfg_scale
        guided = cfg_scale > 1
        if not guided and view.cfg_channels is not None:
            raise UsageError(f"--cfg-channels is ignored without guidance (--cfg-scale {cfg_scale} <= 1): drop it")
        if not guided and view.guidance_interval is not None:
            raise UsageError(f"--guidance-interval is ignored without guidance (--cfg-scale {cfg_scale} <= 1): "
                             "drop it or raise --cfg-scale")
        if isinstance(view.cfg_channels, int) and view.cfg_channels > in_channels:
            raise UsageError(f"--cfg-channels {view.cfg_channels}: the model has {in_channels} channels")
    except UsageError as error:  # every flag these messages name is a sampler flag: --fid-<name> here
        raise UsageError(re.sub(r"--(?=[a-z])", "--fid-", str(error))) from error
    if guided and not has_null_class:
        raise UsageError(f"--fid-cfg-scale {cfg_scale} guides with the null class, which a model trained with "
                         "--class-dropout-prob 0 does not have: use --fid-cfg-scale 1")
    return dict(sampler=sampler, cfg_scale=cfg_scale,
                cfg_channels=resolve_cfg_channels(view.cfg_channels, in_channels) if guided else None,
                guidance_interval=list(view.guidance_interval) if view.guidance_interval else None)


def store_resolved(args: argparse.Namespace, resolved: dict[str, Any]) -> None:
    """Write the values used back into the fid_* flags (args.json then says what was computed, defaults
    included, and a resume that takes them from the checkpoint resolves them to the same)."""
    sampler = resolved["sampler"]
    method = sampler["method"]
    values = dict(mode=sampler["mode"], sampling_method=method, method=method if method in FIXED_STEP_METHODS else None,
                  num_steps=sampler["num_steps"], atol=sampler["atol"], rtol=sampler["rtol"],
                  diffusion_form=sampler["diffusion_form"], diffusion_norm=sampler["diffusion_norm"],
                  last_step=sampler["last_step"], last_step_size=sampler["last_step_size"],
                  cfg_scale=resolved["cfg_scale"], cfg_channels=resolved["cfg_channels"],
                  guidance_interval=resolved["guidance_interval"])
    if sampler["mode"] == "sde" and sampler["last_step"] is None:
        values["last_step"] = "None"  # the flag's spelling of "no last step"
    for key, value in values.items():
        setattr(args, f"fid_{key}", value)


def check_given_without_cadence(args: argparse.Namespace, given: list[str]) -> None:
    """--fid-* flags written on the command line of a run that never evaluates would be ignored: refused."""
    ignored = sorted(key for key in given if key.startswith("fid_") and key != "fid_every")
    if ignored and args.fid_every == 0:
        raise UsageError(f"--{ignored[0].replace('_', '-')} would be ignored without --fid-every K (0 = never, the "
                         "default): add --fid-every, or drop it")
