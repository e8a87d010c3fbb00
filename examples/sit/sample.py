"""
Sample an image grid from a SiT checkpoint: one of ours (train.py) or an official one (SiT-XL-2-256x256.pt).

    python examples/sit/sample.py --ckpt results/SiT-T-4-sinusoid-anm/checkpoints/0002000.pt --out grid.png
    python examples/sit/sample.py --ckpt SiT-XL-2-256x256.pt --model SiT-XL/2 --vae /path/to/sd-vae-ft-ema \
        --cfg-scale 4.0 --mode sde --num-steps 250

Time convention (as the reference SiT): t=0 is pure noise, t=1 is data. ODE "--num-steps" counts integration
steps: Heun costs 2 network evaluations per step (the paper's 250 NFE = 125 Heun steps).
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from models import SiT, create_model, load_official_checkpoint
from PIL import Image
from samplers import Sampler
from torch import nn
from transport import create_transport

LATENT_SCALE = 0.18215  # SD-VAE latent scaling used by DiT/SiT


#################################################################################
#                                 Helpers                                       #
#################################################################################

def load_model(ckpt: str, device: torch.device, model_name: str | None = None, image_size: int = 256,
               num_classes: int = 1000, use_ema: bool = True) -> tuple[SiT, dict[str, Any]]:
    """A SiT in eval mode from a train.py checkpoint (config stored inside) or an official checkpoint
    (config from model_name / image_size / num_classes, latent space). Returns (model, info) with info
    holding latent (bool), vae (train.py's --vae, if latent) and the SiT config."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_config" in state:  # ours
        config = dict(state["model_config"])
        model = SiT(**config)
        model.load_state_dict(state["ema" if use_ema else "model"])
        info = dict(latent=bool(state["latent"]), vae=state.get("vae"), config=config, step=state.get("step"))
    else:
        if model_name is None:
            raise ValueError("an official checkpoint needs --model (e.g. SiT-XL/2)")
        config = dict(input_size=image_size // 8, num_classes=num_classes, learn_sigma=False)
        model = load_official_checkpoint(create_model(model_name, **config), state)
        info = dict(latent=True, vae=None, config=dict(config, in_channels=4), step=None)
    return model.to(device).eval(), info


def load_vae(name_or_path: str, device: torch.device | str = "cpu") -> nn.Module:
    """
    diffusers AutoencoderKL from a local directory (offline) or a hub id, frozen, in eval mode. A pipeline
    directory with a vae/ subfolder works too.

    >>> vae = load_vae("/models/sd-vae-ft-ema")  # doctest: +SKIP
    """
    from diffusers.models import AutoencoderKL

    subfolder = None
    if (
        os.path.isdir(name_or_path)
        and not os.path.exists(os.path.join(name_or_path, "config.json"))
        and os.path.exists(os.path.join(name_or_path, "vae", "config.json"))
    ):
        subfolder = "vae"
    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_to_uint8(x: torch.Tensor, vae: nn.Module | None = None, chunk: int = 32) -> np.ndarray:
    """Model samples (latents if vae is given, else pixels in [-1, 1]) -> uint8 (N, H, W, 3)."""
    if vae is not None:
        x = torch.cat([vae.decode(part / LATENT_SCALE).sample for part in x.split(chunk)])
    if x.shape[1] == 1:  # grayscale (Fashion-MNIST): 3 channels, as the ADM npz and PNG grids expect
        x = x.expand(-1, 3, -1, -1)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str, nrow: int | None = None, pad: int = 2) -> None:
    """uint8 (N, H, W, 3) images -> one PNG grid with `nrow` images per row (default: ~square)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


def make_sample_fn(transport, mode: str, method: str, num_steps: int,
                   last_step: str | None = "Mean") -> Callable:
    """fn(z, model_fn, generator=None, **model_kwargs) -> samples at t=1 (see samplers.py)."""
    sampler = Sampler(transport)
    if mode == "ode":
        return sampler.sample_ode(num_steps=num_steps, method=method)
    return sampler.sample_sde(num_steps=num_steps, method=method, last_step=last_step)


def guided_call(model: SiT, cfg_scale: float, cfg_channels: int = 3) -> tuple[Callable, Callable]:
    """(prepare, model_fn): prepare(z, y) -> (z', kwargs) doubles the batch for CFG when cfg_scale > 1;
    model_fn is what the sampler calls. Take the first half of the result when guided."""
    if cfg_scale <= 1.0:
        return (lambda z, y: (z, dict(y=y))), model.forward

    def prepare(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        null = torch.full_like(y, model.num_classes)
        return torch.cat([z, z]), dict(y=torch.cat([y, null]), cfg_scale=cfg_scale, cfg_channels=cfg_channels)

    return prepare, model.forward_with_cfg


@torch.no_grad()
def generate(model: SiT, z: torch.Tensor, y: torch.Tensor, sample_fn: Callable, cfg_scale: float = 1.0,
             cfg_channels: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the sampler from noise z with labels y (classifier-free guidance when cfg_scale > 1)."""
    prepare, model_fn = guided_call(model, cfg_scale, cfg_channels)
    z_in, kwargs = prepare(z, y)
    x = sample_fn(z_in, model_fn, generator=generator, **kwargs)
    return x[: len(z)]


#################################################################################
#                                  Sampling                                     #
#################################################################################

def main(args: argparse.Namespace) -> str:
    """Write a grid of samples to args.out; returns the path."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(args.ckpt, device, args.model, args.image_size, args.num_classes,
                             use_ema=not args.no_ema)
    vae = None
    if info["latent"]:
        vae_path = args.vae or info["vae"]
        if vae_path is None:
            raise ValueError("latent-space model: pass --vae (local directory or hub id)")
        vae = load_vae(vae_path, device)
    cfg = info["config"]
    num_classes = model.num_classes
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (4.0 if num_classes > 1 else 1.0)
    num_steps = args.num_steps or (125 if args.mode == "ode" else 250)

    gen = torch.Generator().manual_seed(args.seed)
    if args.class_labels:
        y = torch.tensor(args.class_labels)
    else:
        y = torch.randint(0, num_classes, (args.num_samples,), generator=gen)
    z = torch.randn(len(y), cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=gen)
    sample_fn = make_sample_fn(create_transport(), args.mode, args.method, num_steps)
    x = generate(model, z.to(device), y.to(device), sample_fn, cfg_scale, args.cfg_channels,
                 generator=torch.Generator(device).manual_seed(args.seed))
    save_grid(decode_to_uint8(x, vae), args.out, nrow=args.nrow)
    print(f"Saved {len(y)} samples ({args.mode} {args.method}, {num_steps} steps, cfg {cfg_scale}) "
          f"to {args.out}")
    return args.out


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load (shared with sample_ddp.py)."""
    parser.add_argument("--ckpt", type=str, required=True, help="train.py checkpoint or official .pt")
    parser.add_argument("--model", type=str, default=None,
                        help="config of an official checkpoint, e.g. SiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256, help="official checkpoints: image pixels")
    parser.add_argument("--num-classes", type=int, default=1000, help="official checkpoints")
    parser.add_argument("--vae", type=str, default=None,
                        help="VAE dir or hub id (default: the one trained with)")
    parser.add_argument("--no-ema", action="store_true", help="our checkpoints: raw weights instead of EMA")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--mode", choices=["ode", "sde"], default="ode")
    parser.add_argument("--method", choices=["euler", "heun"], default="heun")
    parser.add_argument("--num-steps", type=int, default=None, help="default: 125 (ODE heun) / 250 (SDE)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: 4.0 (1.0 if one class)")
    parser.add_argument("--cfg-channels", type=int, default=3, help="3: reference (DiT) guidance; 4: REPA")
    parser.add_argument("--class-labels", type=int, nargs="*", default=None, help="default: random labels")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--nrow", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default="sample.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
