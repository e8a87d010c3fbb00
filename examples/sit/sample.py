"""
Sample an image grid from a SiT checkpoint: one of ours (train.py) or an official one (SiT-XL-2-256x256.pt).

    python examples/sit/sample.py --ckpt results/SiT-T-4-sinusoid-anm/checkpoints/0002000.pt --out grid.png
    python examples/sit/sample.py --ckpt SiT-XL-2-256x256.pt --model SiT-XL/2 --vae /path/to/sd-vae-ft-ema \\
        --cfg-scale 4.0 --mode sde --num-steps 250

    python examples/sit/sample.py --ckpt ... --mode ode --sampling-method dopri5 --atol 1e-6 --rtol 1e-3
    python examples/sit/sample.py --ckpt ... --mode sde --sampling-method Euler --diffusion-form sigma \
        --diffusion-norm 1.0 --last-step Mean --last-step-size 0.04

Time convention (as the reference SiT): t=0 is pure noise, t=1 is data. ODE "--num-steps" counts integration
steps: Heun costs 2 network evaluations per step (the paper's 250 NFE = 125 Heun steps). Latents are decoded
with the VAE factors the checkpoint recorded (modeling/latent_scaling.py).
"""
from __future__ import annotations

import argparse
import os

import torch
from modeling.generation import (
    describe_cfg_channels,
    generate,
    has_null_class,
    make_sample_fn,
    resolve_cfg_channels,
)
from modeling.loading import OFFICIAL_DEFAULTS, load_model
from modeling.transport import create_transport
from modeling.vae import decode_to_uint8
from runtime.cli import UsageError, run
from runtime.images import IMAGE_FORMATS, image_format, save_grid
from runtime.sampling_cli import (
    add_checkpoint_args,
    add_guidance_args,
    add_sampler_args,
    check_model_args,
    check_sampling_args,
    describe_sampler,
    load_checked_vae,
    positive_int,
    resolve_sampler,
    sampler_kwargs,
)

DEFAULT_STEPS = dict(ode=125, sde=250)  # ODE Heun: 125 steps = the paper's 250 NFE

#################################################################################
#                                 Validation                                    #
#################################################################################

def check_out(args: argparse.Namespace) -> None:
    """--out must name a writable image file that does not exist yet (unless --overwrite)."""
    image_format(args.out)
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder: give a file name such as {args.out}/grid.png")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: choose another --out or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out}: cannot create files under {parent}; choose another --out")


def pick_labels(args: argparse.Namespace, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """--class-labels (checked against the model) or --num-samples random labels."""
    if args.class_labels is None:
        return torch.randint(0, num_classes, (args.num_samples,), generator=gen)
    if num_classes == 1:
        raise UsageError("--class-labels: this model has one class (unconditional): drop the flag")
    bad = [label for label in args.class_labels if not 0 <= label < num_classes]
    if bad:
        raise UsageError(f"--class-labels {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return torch.tensor(args.class_labels)


#################################################################################
#                                  Sampling                                     #
#################################################################################

def main(args: argparse.Namespace) -> str:
    """Write a grid of samples to args.out; returns the path."""
    check_sampling_args(args)
    settings = resolve_sampler(args, DEFAULT_STEPS)
    check_out(args)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(args.ckpt, device, args.model, args.image_size or OFFICIAL_DEFAULTS["image_size"],
                             args.num_classes or OFFICIAL_DEFAULTS["num_classes"], use_ema=not args.no_ema)
    num_classes = model.num_classes
    can_guide = num_classes > 1 and has_null_class(model)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (4.0 if can_guide else 1.0)
    check_model_args(args, model, info, cfg_scale)
    gen = torch.Generator().manual_seed(args.seed)
    y = pick_labels(args, num_classes, gen)
    try:
        sample_fn = make_sample_fn(create_transport(**info["transport"]), **sampler_kwargs(settings))
    except (ValueError, ImportError) as error:  # an SDE with an infinite score; dopri5 without torchdiffeq
        raise UsageError(f"{describe_sampler(settings)}: {error}") from error
    vae, scaling = load_checked_vae(args, info, device)

    cfg = info["config"]
    cfg_channels = resolve_cfg_channels(args.cfg_channels, model.in_channels)
    z = torch.randn(len(y), cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=gen)
    x = generate(model, z.to(device), y.to(device), sample_fn, cfg_scale, cfg_channels,
                 generator=torch.Generator(device).manual_seed(args.seed), guidance_interval=args.guidance_interval)
    save_grid(decode_to_uint8(x, vae, scaling=scaling), args.out, nrow=args.nrow)
    guidance = f" on {describe_cfg_channels(cfg_channels, model.in_channels)}" if cfg_scale > 1 else ""
    print(f"Saved {len(y)} samples ({describe_sampler(settings)}, cfg {cfg_scale}{guidance}) to {args.out}")
    return args.out


def get_parser() -> argparse.ArgumentParser:
    """The command line of sample.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    add_sampler_args(parser, mode="ode", method="heun",
                     steps_help="fixed-step integration steps (default: 125 for ODE = 250 Heun NFE, 250 for SDE; "
                                "adaptive solvers choose their own)")
    add_guidance_args(parser, "guidance scale, 1 = none (default: 4.0; 1.0 for a one-class model or one "
                              "trained without label dropout)")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="one sample per label (default: --num-samples random labels)")
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="random-label samples (default: 16; not with --class-labels)")
    parser.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: ~square)")
    parser.add_argument("--seed", type=int, default=0, help="seed of labels and noise (default: %(default)s)")
    parser.add_argument("--out", type=str, default="sample.png",
                        help=f"grid image ({', '.join(sorted(IMAGE_FORMATS))}) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed flags; --num-samples defaults to 16 when --class-labels is not given."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.class_labels is not None and args.num_samples is not None:
        parser.error("--num-samples is ignored when --class-labels lists the samples: drop one of them")
    args.num_samples = args.num_samples or 16
    return args


if __name__ == "__main__":
    run(main, parse_args)
