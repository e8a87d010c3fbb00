"""
Sample an image grid from a SiT checkpoint: one of ours (train.py) or an official one (SiT-XL-2-256x256.pt).

    python examples/sit/sample.py --ckpt results/SiT-T-4-sinusoid-anm/checkpoints/0002000.pt --out grid.png
    python examples/sit/sample.py --ckpt SiT-XL-2-256x256.pt --model SiT-XL/2 --vae /path/to/sd-vae-ft-ema \\
        --cfg-scale 4.0 --mode sde --num-steps 250

Time convention (as the reference SiT): t=0 is pure noise, t=1 is data. ODE "--num-steps" counts integration
steps: Heun costs 2 network evaluations per step (the paper's 250 NFE = 125 Heun steps).
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from data.datasets import LATENT_SCALE
from modeling.models import SiT, SiT_models, create_model, load_official_checkpoint
from modeling.samplers import Sampler
from modeling.transport import PATHS, PREDICTIONS, create_transport
from PIL import Image
from runtime.atomic import atomic_write
from runtime.checks import read_checkpoint
from runtime.cli import UsageError, run
from torch import nn

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}
OFFICIAL_DEFAULTS = dict(image_size=256, num_classes=1000)  # flags that only describe official checkpoints


#################################################################################
#                             Checkpoint loading                                #
#################################################################################

def _load_error(path: str, error: Exception) -> UsageError:
    """A state_dict mismatch as one line: the first missing / unexpected / mis-sized keys."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
    detail = "; ".join(lines)
    detail = detail if len(detail) <= 240 else detail[:240] + "..."
    return UsageError(f"weights in checkpoint {path} do not fit the model ({detail}): the file is damaged or "
                      "from another model; choose another --ckpt")


def _build_ours(state: Mapping, path: str, use_ema: bool) -> tuple[SiT, dict[str, Any]]:
    weights = "ema" if use_ema else "model"
    missing = [key for key in ("model_config", weights, "latent") if key not in state]
    if missing:
        hint = " or pass --no-ema (it holds raw weights only)" if missing == ["ema"] and "model" in state else ""
        raise UsageError(f"checkpoint {path} lacks {', '.join(missing)}: not a complete train.py checkpoint; "
                         f"choose another --ckpt{hint}")
    config = dict(state["model_config"])
    try:
        model = SiT(**config)
    except (TypeError, ValueError) as error:
        raise UsageError(f"checkpoint {path} has an unusable model_config {config} ({error})") from error
    try:
        model.load_state_dict(state[weights])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise _load_error(path, error) from error
    run_args = state.get("args") or {}
    run_args = vars(run_args) if isinstance(run_args, argparse.Namespace) else dict(run_args)
    transport = dict(path_type=run_args.get("path_type", "Linear"), prediction=run_args.get("prediction", "velocity"))
    if transport["path_type"] not in PATHS or transport["prediction"] not in PREDICTIONS:
        raise UsageError(f"checkpoint {path} was trained with an unknown transport {transport}")
    info = dict(official=False, latent=bool(state["latent"]), vae=state.get("vae"), config=config,
                step=state.get("step"), transport=transport)
    return model, info


def _build_official(state: Any, path: str, model_name: str | None, image_size: int,
                    num_classes: int) -> tuple[SiT, dict[str, Any]]:
    if not isinstance(state, Mapping):
        raise UsageError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict: choose another --ckpt")
    if model_name is None:
        raise UsageError(f"{path} is an official (config-less) checkpoint: pass --model, e.g. --model SiT-XL/2")
    if image_size % 8:
        raise UsageError(f"--image-size must be a multiple of 8 (the VAE's downsampling), got {image_size}")
    config = dict(input_size=image_size // 8, num_classes=num_classes, learn_sigma=False)
    try:
        model = load_official_checkpoint(create_model(model_name, **config), state)
    except (RuntimeError, ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"{_load_error(path, error)} or check --model, --image-size and --num-classes") from error
    info = dict(official=True, latent=True, vae=None, config=dict(config, in_channels=4), step=None,
                transport=dict(path_type="Linear", prediction="velocity"))
    return model, info


def load_model(ckpt: str, device: torch.device, model_name: str | None = None, image_size: int = 256,
               num_classes: int = 1000, use_ema: bool = True) -> tuple[SiT, dict[str, Any]]:
    """A SiT in eval mode from a train.py checkpoint (config stored inside) or an official checkpoint
    (config from model_name / image_size / num_classes, latent space). Returns (model, info) with info
    holding official (bool), latent (bool), vae (train.py's --vae, if latent), the SiT config, step and
    transport (the path_type / prediction it was trained with). Unusable files raise cli.UsageError."""
    state = read_checkpoint(ckpt)
    if isinstance(state, Mapping) and "model_config" in state:
        model, info = _build_ours(state, ckpt, use_ema)
    else:
        model, info = _build_official(state, ckpt, model_name, image_size, num_classes)
    return model.to(device).eval(), info


def load_vae(name_or_path: str, device: torch.device | str = "cpu") -> nn.Module:
    """
    diffusers AutoencoderKL from a local directory (offline) or a hub id, frozen, in eval mode. A pipeline
    directory with a vae/ subfolder works too. One that cannot be loaded raises cli.UsageError.

    >>> vae = load_vae("/models/sd-vae-ft-ema")  # doctest: +SKIP
    """
    from diffusers.models import AutoencoderKL

    local = os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local and not os.path.isdir(name_or_path):
        raise UsageError(f"VAE folder {name_or_path} does not exist: pass a local diffusers AutoencoderKL "
                         "directory (or a hub id) with --vae")
    subfolder = None
    if (
        os.path.isdir(name_or_path)
        and not os.path.exists(os.path.join(name_or_path, "config.json"))
        and os.path.exists(os.path.join(name_or_path, "vae", "config.json"))
    ):
        subfolder = "vae"
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load the VAE {name_or_path} ({reason}): pass a local diffusers AutoencoderKL "
                         "directory with --vae") from error
    return vae.to(device).eval().requires_grad_(False)


#################################################################################
#                                  Helpers                                      #
#################################################################################

@torch.no_grad()
def decode_to_uint8(x: torch.Tensor, vae: nn.Module | None = None, chunk: int = 32) -> np.ndarray:
    """Model samples (latents if vae is given, else pixels in [-1, 1]) -> uint8 (N, H, W, 3)."""
    if vae is not None:
        x = torch.cat([vae.decode(part / LATENT_SCALE).sample for part in x.split(chunk)])
    if x.shape[1] == 1:  # grayscale (Fashion-MNIST): 3 channels, as the ADM npz and PNG grids expect
        x = x.expand(-1, 3, -1, -1)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_format(path: str) -> str:
    """The PIL format that path's extension names; cli.UsageError for one this script cannot write."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise UsageError(f"--out {path}: unknown image extension {ext or '(none)'!r}; "
                         f"use one of {', '.join(sorted(IMAGE_FORMATS))}, e.g. --out grid.png")
    return IMAGE_FORMATS[ext]


def save_grid(images: np.ndarray, path: str, nrow: int | None = None, pad: int = 2) -> None:
    """uint8 (N, H, W, 3) images -> one image grid with `nrow` images per row (default: ~square), written
    atomically (a crash or full disk leaves no partial file)."""
    n, h, w, c = images.shape
    nrow = min(nrow or math.ceil(math.sqrt(n)), n)  # a wider --nrow would only add blank columns
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        Image.fromarray(grid).save(f, format=image_format(path))


def make_sample_fn(transport, mode: str, method: str, num_steps: int,
                   last_step: str | None = "Mean") -> Callable:
    """fn(z, model_fn, generator=None, **model_kwargs) -> samples at t=1 (see modeling/samplers.py)."""
    sampler = Sampler(transport)
    if mode == "ode":
        return sampler.sample_ode(num_steps=num_steps, method=method)
    return sampler.sample_sde(num_steps=num_steps, method=method, last_step=last_step)


def guided_call(model: SiT, cfg_scale: float, cfg_channels: int = 3,
                guidance_interval: tuple[float, float] | None = None) -> tuple[Callable, Callable]:
    """(prepare, model_fn): prepare(z, y) -> (z', kwargs) doubles the batch for CFG when cfg_scale > 1;
    model_fn is what the sampler calls. Take the first half of the result when guided. guidance_interval
    (t_lo, t_hi) guides only there (models.SiT.forward_with_cfg)."""
    if cfg_scale <= 1.0:
        return (lambda z, y: (z, dict(y=y))), model.forward

    def prepare(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        null = torch.full_like(y, model.num_classes)
        kwargs = dict(y=torch.cat([y, null]), cfg_scale=cfg_scale, cfg_channels=cfg_channels)
        if guidance_interval is not None:
            kwargs["guidance_interval"] = tuple(guidance_interval)
        return torch.cat([z, z]), kwargs

    return prepare, model.forward_with_cfg


@torch.no_grad()
def generate(model: SiT, z: torch.Tensor, y: torch.Tensor, sample_fn: Callable, cfg_scale: float = 1.0,
             cfg_channels: int = 3, generator: torch.Generator | list[torch.Generator] | None = None,
             guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Run the sampler from noise z with labels y (classifier-free guidance when cfg_scale > 1)."""
    prepare, model_fn = guided_call(model, cfg_scale, cfg_channels, guidance_interval)
    z_in, kwargs = prepare(z, y)
    x = sample_fn(z_in, model_fn, generator=generator, **kwargs)
    return x[: len(z)]


#################################################################################
#                                 Validation                                    #
#################################################################################

def check_sampling_args(args: argparse.Namespace) -> None:
    """Flags that are wrong whatever the model (shared with sample_ddp.py); raises cli.UsageError."""
    if args.num_steps is not None:
        least = 1 if args.mode == "ode" else 2
        if args.num_steps < least:
            raise UsageError(f"--num-steps must be >= {least} for --mode {args.mode}, got {args.num_steps}")
    if args.cfg_scale is not None and not 0 <= args.cfg_scale < math.inf:  # NaN fails too
        raise UsageError(f"--cfg-scale must be >= 0 and finite (1 = no guidance), got {args.cfg_scale}")
    seed_flag = "--seed" if hasattr(args, "seed") else "--global-seed"
    seed = getattr(args, seed_flag[2:].replace("-", "_"))
    if not 0 <= seed < 2**63:  # the range that torch and numpy seeding both accept
        raise UsageError(f"{seed_flag} must be in [0, 2**63), got {seed}")
    if args.cfg_channels is not None and args.cfg_channels < 1:
        raise UsageError(f"--cfg-channels must be >= 1, got {args.cfg_channels}")
    if args.guidance_interval is not None:
        lo, hi = args.guidance_interval
        if not 0 <= lo < hi <= 1:
            raise UsageError(f"--guidance-interval needs 0 <= LO < HI <= 1 (t=0 noise, t=1 data), got {lo} {hi}")


def has_null_class(model: SiT) -> bool:
    """Whether the label table has the null row that classifier-free guidance needs (label dropout > 0)."""
    return model.y_embedder.embedding_table.num_embeddings > model.num_classes


def check_model_args(args: argparse.Namespace, model: SiT, info: dict[str, Any], cfg_scale: float) -> None:
    """Flags that the loaded model would ignore or cannot honour (shared with sample_ddp.py)."""
    if not info["official"]:
        given = [f"--{name.replace('_', '-')}" for name in ("model", "image_size", "num_classes")
                 if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only for official checkpoints; {args.ckpt} stores its own "
                             "config: drop them")
    elif args.no_ema:
        raise UsageError(f"--no-ema: official checkpoint {args.ckpt} holds one set of weights; drop the flag")
    if not info["latent"] and args.vae is not None:
        raise UsageError(f"--vae: {args.ckpt} is a pixel-space model that uses no VAE; drop the flag")
    if info["latent"] and (args.vae or info["vae"]) is None:
        raise UsageError("latent-space model: pass --vae (a local diffusers AutoencoderKL directory or a hub id)")
    guided = cfg_scale > 1
    if guided and not has_null_class(model):
        raise UsageError(f"--cfg-scale {cfg_scale}: {args.ckpt} was trained without label dropout, so it has no "
                         "null class for guidance; use --cfg-scale 1")
    if not guided and args.cfg_channels is not None:
        raise UsageError(f"--cfg-channels is ignored without guidance (--cfg-scale {cfg_scale} <= 1): drop it")
    if not guided and args.guidance_interval is not None:
        raise UsageError(f"--guidance-interval is ignored without guidance (--cfg-scale {cfg_scale} <= 1): "
                         "drop it or raise --cfg-scale")
    if args.cfg_channels is not None and args.cfg_channels > model.in_channels:
        raise UsageError(f"--cfg-channels {args.cfg_channels}: the model has {model.in_channels} channels")


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
    vae = load_vae(args.vae or info["vae"], device) if info["latent"] else None

    cfg = info["config"]
    num_steps = args.num_steps or (125 if args.mode == "ode" else 250)
    cfg_channels = args.cfg_channels or min(3, model.in_channels)
    z = torch.randn(len(y), cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=gen)
    sample_fn = make_sample_fn(create_transport(**info["transport"]), args.mode, args.method, num_steps)
    x = generate(model, z.to(device), y.to(device), sample_fn, cfg_scale, cfg_channels,
                 generator=torch.Generator(device).manual_seed(args.seed), guidance_interval=args.guidance_interval)
    save_grid(decode_to_uint8(x, vae), args.out, nrow=args.nrow)
    print(f"Saved {len(y)} samples ({args.mode} {args.method}, {num_steps} steps, cfg {cfg_scale}) "
          f"to {args.out}")
    return args.out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load (shared with sample_ddp.py)."""
    parser.add_argument("--ckpt", type=str, required=True, help="train.py checkpoint or official .pt (required)")
    parser.add_argument("--model", type=str, default=None, choices=sorted(SiT_models), metavar="NAME",
                        help="official checkpoints only: their config, e.g. SiT-XL/2 (default: none)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"official checkpoints only: image pixels (default: {OFFICIAL_DEFAULTS['image_size']})")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help=f"official checkpoints only: classes (default: {OFFICIAL_DEFAULTS['num_classes']})")
    parser.add_argument("--vae", type=str, default=None,
                        help="latent models: VAE dir or hub id (default: the one the checkpoint was trained with)")
    parser.add_argument("--no-ema", action="store_true",
                        help="our checkpoints: raw weights instead of EMA (default: EMA)")


def add_guidance_args(parser: argparse.ArgumentParser, cfg_default_help: str) -> None:
    """Classifier-free guidance flags (shared with sample_ddp.py)."""
    parser.add_argument("--cfg-scale", type=float, default=None, help=cfg_default_help)
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="channels guided: 3 = reference (DiT), 4 = all (REPA) (default: 3, or fewer if the "
                             "model has fewer; needs --cfg-scale > 1)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only at LO <= t <= HI (t=0 noise, t=1 data; REPA's [lo, hi] is 1-hi 1-lo "
                             "here; needs --cfg-scale > 1) (default: every step)")


def get_parser() -> argparse.ArgumentParser:
    """The command line of sample.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--mode", choices=["ode", "sde"], default="ode", help="sampler (default: %(default)s)")
    parser.add_argument("--method", choices=["euler", "heun"], default="heun",
                        help="integrator (default: %(default)s)")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="integration steps (default: 125 for ODE = 250 Heun NFE, 250 for SDE)")
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
