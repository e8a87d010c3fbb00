"""
train.py's command line: the flags in groups (help text and default each), and the defaults that depend on
other flags. train.py passes its docstring as the description --help shows.
"""
from __future__ import annotations

import argparse
import os
import sys

from modeling.hub import absolute_if_local
from modeling.models import SIT_SIZES

from runtime.checks import check_ignored_flags
from runtime.cli import HelpFormatter
from runtime.fid_flags import add_fid_args
from runtime.preemption import SYNC_SECONDS
from runtime.run_flags import GIVEN_KEY, given_flags

DEFAULT_MAX_STEPS = 400_000  # the paper's SiT-XL/2 schedule
DEFAULT_SINUSOIDS = 100_000  # images of --data sinusoid


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags, in groups, each with its help text and default (description: train.py's docstring).

    >>> build_parser().parse_args(["--model", "SiT-B/4"]).model
    'SiT-B/4'
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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
    group.add_argument("--num-workers", type=int, default=4,
                       help="DataLoader worker processes per rank (started once per run, kept across epochs)")
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
    group.add_argument("--deterministic", action="store_true",
                       help="kernels that sum in a fixed order (deterministic algorithms, cuDNN, cuBLAS workspace, "
                            "Inductor), so that runs and resumes repeat bit for bit on GPUs; slower; an op without "
                            "a deterministic kernel raises (runtime/determinism.py)")
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
    group = parser.add_argument_group("Dispersive Loss (Wang & He 2025; regularizers/dispersive.py)")
    group.add_argument("--dispersive", action=argparse.BooleanOptionalAction, default=False,
                       help="add lambda * L_disp of one block's hidden states (repulsion within each rank's batch)")
    group.add_argument("--dispersive-lambda", type=float, default=0.5, help="weight of the dispersive term")
    group.add_argument("--dispersive-tau", type=float, default=0.5, help="temperature tau (> 0)")
    group.add_argument("--dispersive-block", type=str, default=None,
                       help="block index (negative from the end) or module glob (default: the middle block, "
                            "index depth // 2)")
    group.add_argument("--dispersive-distance", choices=["l2", "cosine"], default="l2",
                       help="InfoNCE-L2 (squared L2 per feature) or InfoNCE-cosine")
    group = parser.add_argument_group("REPA (Yu et al. 2024; regularizers/repa.py)")
    group.add_argument("--repa", action=argparse.BooleanOptionalAction, default=False,
                       help="add lambda * REPA's alignment of one block's hidden state to a frozen DINOv2's patch "
                            "tokens of the same images (needs --repa-encoder)")
    group.add_argument("--repa-encoder", type=str, default=None, metavar="PATH",
                       help="a local transformers DINOv2 folder (config.json + weights); nothing is downloaded")
    group.add_argument("--repa-depth", type=int, default=None, metavar="K",
                       help="align the hidden state after block K, counted from 1 (default: REPA's 8 for 24 or 28 "
                            "blocks (SiT-L, SiT-XL), else depth // 3 (4 for SiT-S and SiT-B), at least 1)")
    group.add_argument("--repa-lambda", type=float, default=0.5, help="weight of the alignment term")
    group.add_argument("--repa-projector-dim", type=int, default=2048,
                       help="hidden width of the 3-layer MLP projector")
    group.add_argument("--repa-resolution", type=int, default=None, metavar="PX",
                       help="the encoder's input size (default: REPA's 224 per 256 image pixels, rounded down to "
                            "whole encoder patches)")
    group.add_argument("--repa-image-path", type=str, default=None, metavar="PATH",
                       help="--data latents: the ImageFolder the latents were extracted from (default: the one "
                            "their meta.json records)")
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
    add_fid_args(parser)  # --fid-every, --fid-samples, --fid-ref and sample_ddp.py's sampler flags as --fid-*
    group = parser.add_argument_group("loggers, progress")
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


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The command line of train.py (see --help), with the defaults that depend on other flags filled in.

    >>> parse_args(["--data", "sinusoid"]).data_size
    100000
    """
    parser = build_parser(description)
    args = parser.parse_args(argv)
    setattr(args, GIVEN_KEY, given_flags(parser, argv))  # a resume takes the others from its checkpoint
    if args.resume is None:  # a resume checks them once its checkpoint's flags are in (main)
        check_ignored_flags(args, parser)
    if args.data == "sinusoid" and args.data_size is None:
        args.data_size = DEFAULT_SINUSOIDS
    if args.progress is None:
        args.progress = sys.stderr.isatty()  # where tqdm draws: a bar in a log file is a line of \r-frames
    args.repa_encoder, args.repa_image_path = (None if path is None else os.path.abspath(path)
                                               for path in (args.repa_encoder, args.repa_image_path))
    args.vae = absolute_if_local(args.vae)  # args.json and checkpoints are read from other folders (sample.py)
    return args
