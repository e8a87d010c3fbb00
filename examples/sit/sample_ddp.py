"""
Sample many images in parallel (e.g. 50,000 for FID) and pack them into an ADM-format .npz.

    torchrun --nproc_per_node 8 examples/sit/sample_ddp.py --ckpt SiT-XL-2-256x256.pt --model SiT-XL/2 \
        --vae /path/to/sd-vae-ft-ema --cfg-scale 1.5 --mode sde --num-steps 250
    python examples/sit/sample_ddp.py --ckpt results/run/checkpoints/0002000.pt --num-fid-samples 1000

Sample i draws its label, starting noise and SDE Brownian noise from generators seeded by (global seed, i)
alone, so the images do not depend on the number of processes or the per-process batch size.
Finished PNGs are kept: rerunning the same command skips them and only fills the gaps.
Writes <sample-dir>/<folder>/{000000..}.png and <sample-dir>/<folder>.npz (arr_0: uint8 N x H x W x 3).
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from npz import save_npz
from PIL import Image
from sample import add_checkpoint_args, decode_to_uint8, generate, load_model, load_vae, make_sample_fn
from tqdm.auto import tqdm
from transport import create_transport

#################################################################################
#                                 Helpers                                       #
#################################################################################

def sample_seed(global_seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (global_seed, index, stream)."""
    state = np.random.SeedSequence([global_seed, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_inputs(indices: range, global_seed: int, num_classes: int, shape: tuple[int, ...]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and noise (N, *shape) of the given sample indices, each from its own generator."""
    labels, noise = [], []
    for i in indices:
        gen = torch.Generator().manual_seed(sample_seed(global_seed, i))
        labels.append(torch.randint(0, num_classes, (), generator=gen))
        noise.append(torch.randn(shape, generator=gen))
    return torch.stack(labels), torch.stack(noise)


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def save_png(image: np.ndarray, path: str) -> None:
    """Write via a temp file so an interrupted run never leaves a truncated PNG that resume would skip."""
    tmp = f"{path}.tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def default_folder_name(args: argparse.Namespace, step: int | None) -> str:
    name = os.path.splitext(os.path.basename(args.ckpt))[0]
    if step is not None:
        name = f"{os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))))}-{name}"
    return (f"{name}-{'ema' if not args.no_ema else 'raw'}-{args.mode}-{args.method}-{args.num_steps}"
            f"-cfg{args.cfg_scale}-seed{args.global_seed}")


#################################################################################
#                                  Sampling                                     #
#################################################################################

def main(args: argparse.Namespace) -> str:
    """Sample args.num_fid_samples images; returns the .npz path."""
    created = False
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # faster, slightly less exact

    model, info = load_model(args.ckpt, device, args.model, args.image_size, args.num_classes,
                             use_ema=not args.no_ema)
    vae = None
    if info["latent"]:
        if (args.vae or info["vae"]) is None:
            raise ValueError("latent-space model: pass --vae (local directory or hub id)")
        vae = load_vae(args.vae or info["vae"], device)
    cfg = info["config"]
    shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    sample_fn = make_sample_fn(create_transport(), args.mode, args.method, args.num_steps)
    if args.compile:
        model.forward = torch.compile(model.forward)  # forward_with_cfg calls it: both halves compiled

    folder = os.path.join(args.sample_dir, args.folder_name or default_folder_name(args, info["step"]))
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        print(f"Sampling {args.num_fid_samples:,} images into {folder} on {world_size} process(es)")
    if world_size > 1:
        dist.barrier()

    # Batch k holds samples [k*B, (k+1)*B); rank r takes batches r, r+W, r+2W, ...
    batch = args.per_proc_batch_size
    my_batches = range(rank, math.ceil(args.num_fid_samples / batch), world_size)
    for k in tqdm(my_batches, disable=rank != 0, desc="sampling"):
        indices = range(k * batch, min((k + 1) * batch, args.num_fid_samples))
        todo = [i for i in indices if not os.path.exists(png_path(folder, i))]
        if not todo:
            continue  # finished by an earlier run
        y, z = sample_inputs(indices, args.global_seed, model.num_classes, shape)
        # SDE Brownian noise from one generator per sample: independent of batch size and world size.
        sde_gens = [torch.Generator(device).manual_seed(sample_seed(args.global_seed, i, stream=1)) for i in indices]
        # bf16 autocast runs the network in bf16; the sampler's state x stays fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            x = generate(model, z.to(device), y.to(device), sample_fn, args.cfg_scale, args.cfg_channels, sde_gens)
        images = decode_to_uint8(x, vae)
        for i, image in zip(indices, images, strict=True):
            if i in todo:
                save_png(image, png_path(folder, i))

    if world_size > 1:
        dist.barrier()
    npz_path = f"{folder}.npz"
    if rank == 0:
        images = np.stack([np.array(Image.open(png_path(folder, i)).convert("RGB"))
                           for i in range(args.num_fid_samples)])
        save_npz(images, npz_path)  # ADM format: arr_0, uint8 N x H x W x 3
        print(f"Saved {npz_path}")
    if world_size > 1:
        dist.barrier()
    if created:
        dist.destroy_process_group()
    return npz_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--mode", choices=["ode", "sde"], default="sde")
    parser.add_argument("--method", choices=["euler", "heun"], default="euler")
    parser.add_argument("--num-steps", type=int, default=250, help="SDE: 250 = 250 NFE; ODE heun: 2 NFE/step")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="1.5 for the paper's FID")
    parser.add_argument("--cfg-channels", type=int, default=3, help="3: reference (DiT) guidance; 4: REPA")
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--folder-name", type=str, default=None, help="default: from checkpoint and settings")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the network under bf16 autocast (faster on GPUs; images differ slightly)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
