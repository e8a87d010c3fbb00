"""Which of train.py's flags define a run, and how a resumed run takes them from its checkpoint.

A resumed run is the same run. Every flag of train.py is in exactly one class (tests check this):

- :data:`RUN_DEFINING`: what the run is (data, model, objective, ANM and all its settings, optimizer, EMA,
  precision, batch, seed, held-out set). Left out on a resume, it comes from the checkpoint; given with
  another value, the resume is refused, naming each flag and its saved value.
- :data:`LOCATIONS`: where the run's inputs are (``--data-path``, ``--eval-data-path``, ``--vae``). Left
  out, they come from the checkpoint; given, they may point elsewhere (the same data moved), and log.txt
  says so. The data set's length is still checked against the checkpoint.
- :data:`OPERATIONAL`: how this stretch of the run is carried out (logging and checkpoint cadences, workers,
  ``--max-steps``, loggers, results folder, ...). They may change; log.txt lists the changes.
- :data:`METRIC`: the ``--fid-*`` flags of the FID during training. Left out, they come from the checkpoint (a
  requeued job keeps evaluating); given, they are kept and log.txt lists the changes. The settings that change
  the numbers are then checked as a whole (evaluation/during_training.py): once a run has them (args.json's
  ``fid_settings``), a resume with others is refused, so that log.csv's fid column is one metric; the cadence
  (``--fid-every``), the batch size and the reference's path (not its content) may change.

"Given" means written on the command line, not equal to the default: :func:`given_flags` parses the
command line again with every default suppressed.
"""
from __future__ import annotations

import argparse
from typing import Any

from runtime.cli import UsageError

__all__ = ["RUN_DEFINING", "LOCATIONS", "OPERATIONAL", "METRIC", "GIVEN_KEY", "given_flags", "saved_args",
           "adopt_saved_args"]

RUN_DEFINING = frozenset({
    "data", "data_size", "image_size",
    "model", "hidden_size", "depth", "num_heads", "class_dropout_prob", "path_type", "prediction",
    "global_batch_size", "global_seed", "lr", "weight_decay", "max_grad_norm", "ema_decay", "precision",
    "anm", "anm_alpha", "anm_lambda", "anm_warmup", "anm_site", "anm_layers", "anm_reduce", "anm_objective",
    "anm_granularity",
    "dispersive", "dispersive_lambda", "dispersive_tau", "dispersive_block", "dispersive_distance",
    "repa", "repa_depth", "repa_lambda", "repa_projector_dim", "repa_resolution",
    "eval_samples",  # the held-out set behind log.csv's held-out curve
})
LOCATIONS = frozenset({"data_path", "eval_data_path", "vae", "repa_encoder", "repa_image_path"})
OPERATIONAL = frozenset({
    "num_workers", "results_dir", "exp_name", "max_steps", "epochs", "grad_accum_steps", "compile",
    "grad_checkpointing", "deterministic", "resume", "log_every", "ckpt_every", "ckpt_every_minutes", "keep_last",
    "stop_sync_seconds", "eval_every",
    "eval_batch_size", "sample_every", "sample_grid", "sample_num_steps", "sample_cfg_scale", "report_to",
    "progress", "progress_position", "console_log",
})
METRIC = frozenset({
    "fid_every", "fid_samples", "fid_ref", "fid_per_proc_batch_size", "fid_global_seed", "fid_precision",
    "fid_mode", "fid_method", "fid_sampling_method", "fid_num_steps", "fid_atol", "fid_rtol", "fid_diffusion_form",
    "fid_diffusion_norm", "fid_last_step", "fid_last_step_size", "fid_cfg_scale", "fid_cfg_channels",
    "fid_guidance_interval",
})
GIVEN_KEY = "given_flags"  # the Namespace attribute listing the flags on the command line (never saved)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """The destinations of the flags written in argv (parsed again with every default suppressed)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:  # noqa: SLF001 — argparse offers no public list of its actions
        if isinstance(action, argparse._HelpAction):  # noqa: SLF001
            continue
        kwargs: dict[str, Any] = dict(dest=action.dest, default=argparse.SUPPRESS)
        if isinstance(action, argparse.BooleanOptionalAction):
            quiet.add_argument(*[s for s in action.option_strings if not s.startswith("--no-")],
                               action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(action, argparse._StoreConstAction):  # noqa: SLF001 (store_true/false, store_const)
            quiet.add_argument(*action.option_strings, action="store_const", const=action.const, **kwargs)
        else:
            quiet.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    return sorted(vars(quiet.parse_known_args(argv)[0]))


def saved_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as args.json and checkpoints store them (without the list of given flags)."""
    return {key: value for key, value in vars(args).items() if key != GIVEN_KEY}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def adopt_saved_args(args: argparse.Namespace, saved: dict[str, Any], source: str) -> list[str]:
    """Make ``args`` the saved run's: run-defining, location and metric flags not given are taken from ``saved``;
    a given run-defining flag with another value raises UsageError naming each one and its saved value.
    Returns the log lines: what was restored, and each changed operational, location or metric flag.

    Without a list of given flags (a Namespace not made by train.parse_args) every flag counts as given."""
    given = set(getattr(args, GIVEN_KEY, vars(args)))
    refused, restored, changed = [], [], []
    for key in sorted(RUN_DEFINING | LOCATIONS | METRIC):
        if key not in saved:  # a flag newer than the checkpoint: its value now is kept
            continue
        now = getattr(args, key, None)
        if key not in given:
            if now != saved[key]:
                restored.append(f"{_flag(key)} {saved[key]!r}")
            setattr(args, key, saved[key])
        elif now != saved[key]:
            (refused if key in RUN_DEFINING else changed).append((key, saved[key], now))
    if refused:
        listed = ", ".join(f"{_flag(key)} {now!r} (saved: {old!r})" for key, old, now in refused)
        raise UsageError(f"{source} is another run: {listed}; a resumed run keeps the settings that define it. "
                         "Leave these flags out (they come from the checkpoint) or pass the saved values, or "
                         "start a new run under another --exp-name")
    changed += [(key, saved[key], getattr(args, key)) for key in sorted(OPERATIONAL - {"resume", "progress"})
                if key in saved and saved[key] != getattr(args, key)]
    lines = [f"restored from {source}: {', '.join(restored)}"] if restored else []
    if changed:
        lines.append("changed on resume: " + ", ".join(f"{_flag(key)} {old!r} -> {now!r}" for key, old, now in changed))
    return lines
