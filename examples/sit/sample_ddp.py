"""
Sample many images in parallel (e.g. 50,000 for FID) and pack them into an ADM-format .npz.

    torchrun --nproc_per_node 8 examples/sit/sample_ddp.py --ckpt SiT-XL-2-256x256.pt --model SiT-XL/2 \\
        --vae /path/to/sd-vae-ft-ema --cfg-scale 1.5 --mode sde --num-steps 250
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        examples/sit/sample_ddp.py ...   # and --node_rank 1 on the second machine; --sample-dir on shared storage
    python examples/sit/sample_ddp.py --ckpt results/run/checkpoints/0002000.pt --num-fid-samples 1000

Sample i draws its label, starting noise and SDE Brownian noise from generators seeded by (global seed, i)
alone, so the images do not depend on the number of processes or the per-process batch size.
Writes <sample-dir>/<folder>/{000000..}.png (encoded and written by --png-threads threads while sampling goes
on), <sample-dir>/<folder>/manifest.json and <sample-dir>/<folder>.npz (arr_0: uint8 N x H x W x 3), which
rank 0 packs from the PNGs after every rank is done and has left the process group (the others exit), reading
a chunk of PNGs at a time. The manifest records the checkpoint's SHA-256 and every setting that changes
the images (the sampler's options and the VAE factors included): rerunning the same command resumes
(finished PNGs are kept, only gaps are filled); a run whose checkpoint content or settings differ is refused
instead of mixing its samples with the old ones. An adaptive ODE solver (--sampling-method dopri5) picks its
steps from the error of a whole batch, so there the images depend on --per-proc-batch-size, which the
manifest then records too.
SIGTERM, SIGUSR1 or SIGINT (a preemption, a time limit) to any rank stop it after its current batch and every
other rank within about --stop-sync-seconds and one batch: exit status 75, and the same command resumes to the
same .npz.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from typing import Any

import numpy as np
import torch
from data.npz_stream import npz_writer
from evaluation.inception import file_sha256
from modeling.generation import describe_cfg_channels, make_sample_fn, resolve_cfg_channels
from modeling.latent_scaling import SD_SCALING, LatentScaling
from modeling.loading import OFFICIAL_DEFAULTS, load_model
from modeling.seeded_samples import sample_images, sample_inputs, sample_seed  # noqa: F401 (public here before)
from modeling.transport import create_transport
from PIL import Image
from runtime.atomic import atomic_write, remove_stale_temps
from runtime.cli import UsageError, run
from runtime.distributed import DistContext, broadcast_object, cleanup, setup_distributed
from runtime.png_writer import PngWriter
from runtime.preemption import (
    EXIT_PREEMPTED,
    SYNC_SECONDS,
    BatchAgreement,
    StopSignals,
    catches_stop_signals,
    exit_preempted,
)
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
from tqdm.auto import tqdm

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_STEPS = dict(ode=250, sde=250)
PACK_CHUNK = 1000  # PNGs read at a time while packing the .npz (196 MB at 256 px)

#################################################################################
#                                 Helpers                                       #
#################################################################################

def png_path(folder: str, index: int) -> str:
    """Sample index's PNG: the exact name, so temp files (.<name>.tmp-<pid>) never count as samples."""
    return os.path.join(folder, f"{index:06d}.png")


def later_setting_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings added to the manifest after its first release, with the value the scripts used before they
    existed: a manifest without them is read as holding these, and they enter a folder name's digest only
    when they differ (so the same command still names, and resumes, the same folder)."""
    sde = settings.get("mode") == "sde"
    return dict(
        sampling_atol=None, sampling_rtol=None, adaptive_batch_size=None,
        diffusion_form="sigma" if sde else None, diffusion_norm=1.0 if sde else None,
        last_step="Mean" if sde else None, last_step_size=0.04 if sde else None,
        latent_scaling=SD_SCALING.record() if settings.get("vae") is not None else None,
    )


def run_settings(args: argparse.Namespace, info: dict[str, Any], cfg_scale: float, cfg_channels: int,
                 device: torch.device, ckpt_sha256: str, sampler: dict[str, Any] | None = None,
                 scaling: LatentScaling | None = None) -> dict[str, Any]:
    """Everything that changes the images: a resumed run must match all of it (the number of processes and
    the batch size do not change them and are left out, except for an adaptive ODE solver, whose steps
    follow the error of the whole batch)."""
    official = info["official"]
    sampler = sampler or dict(mode=args.mode, method=args.method, num_steps=args.num_steps)
    adaptive = sampler["mode"] == "ode" and sampler["num_steps"] is None
    return dict(
        version=MANIFEST_VERSION,
        checkpoint_sha256=ckpt_sha256,
        model=args.model if official else None,
        image_size=(args.image_size or OFFICIAL_DEFAULTS["image_size"]) if official else None,
        num_classes=(args.num_classes or OFFICIAL_DEFAULTS["num_classes"]) if official else None,
        weights="ema" if not args.no_ema else "raw",
        vae=(args.vae or info["vae"]) if info["latent"] else None,
        path_type=info["transport"]["path_type"],
        prediction=info["transport"]["prediction"],
        mode=sampler["mode"],
        method=sampler["method"],
        num_steps=sampler["num_steps"],
        sampling_atol=sampler.get("atol"),
        sampling_rtol=sampler.get("rtol"),
        adaptive_batch_size=args.per_proc_batch_size if adaptive else None,
        diffusion_form=sampler.get("diffusion_form"),
        diffusion_norm=sampler.get("diffusion_norm"),
        last_step=sampler.get("last_step"),
        last_step_size=sampler.get("last_step_size"),
        latent_scaling=scaling.record() if scaling is not None else None,
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels if cfg_scale > 1 else None,
        guidance_interval=list(args.guidance_interval) if args.guidance_interval else None,
        global_seed=args.global_seed,
        precision=args.precision,
        tf32=args.tf32 if device.type == "cuda" else None,  # TF32 only exists on CUDA
        compile=args.compile,
        device=device.type,
    )


def default_folder_name(args: argparse.Namespace, step: int | None, settings: dict[str, Any]) -> str:
    """Readable settings plus a digest of all of them (checkpoint content included): new weights or any
    other setting give a new folder."""
    name = os.path.splitext(os.path.basename(args.ckpt))[0]
    if step is not None:
        name = f"{os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))))}-{name}"
    defaults = later_setting_defaults(settings)
    digested = {key: value for key, value in settings.items() if key not in defaults or value != defaults[key]}
    digest = hashlib.sha256(json.dumps(digested, sort_keys=True).encode()).hexdigest()[:8]
    return (f"{name}-{settings['weights']}-{args.mode}-{args.method}-{args.num_steps}"
            f"-cfg{settings['cfg_scale']}-seed{args.global_seed}-{digest}")


def check_folder_name(name: str) -> None:
    """--folder-name must be one plain folder name inside --sample-dir."""
    if not name or name in (".", "..") or os.path.isabs(name) or os.path.basename(name) != name or "/" in name:
        raise UsageError(f"--folder-name {name!r} must be a plain folder name inside --sample-dir "
                         "(no '/', '..' or absolute path), e.g. --folder-name run1")


def settings_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old there, new now' for every setting that differs."""
    def short(value: Any) -> str:
        return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)

    return [f"{key} {short(old.get(key))} there, {short(new.get(key))} now"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def prepare_folder(folder: str, npz_path: str, settings: dict[str, Any], ckpt: str) -> str | None:
    """Create the sample folder with its manifest, or check a previous run's manifest (rank 0 only).
    Returns an error message instead of raising, so that every rank can stop together."""
    manifest_path = os.path.join(folder, MANIFEST)
    fix = f"pass a new --folder-name, or delete {folder} (and {npz_path}) to start over"
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a sample folder: {fix}"
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as f:
                old = json.load(f)["settings"]
            if not isinstance(old, dict):
                raise TypeError(f"settings is a {type(old).__name__}")
            old = {**later_setting_defaults(old), **old}
        except (ValueError, KeyError, TypeError):
            return f"{manifest_path} is unreadable, so its samples cannot be trusted: {fix}"
        differences = settings_differences(old, settings)
        if differences:
            return f"{folder} holds samples of other settings ({'; '.join(differences)}): {fix}"
        remove_stale_temps(folder)
        return None
    if os.path.isdir(folder) and os.listdir(folder):
        return (f"{folder} is not empty and has no {MANIFEST}: its files cannot be proven to come from this "
                f"checkpoint and settings; {fix}")
    if os.path.exists(npz_path):
        return f"{npz_path} exists from an earlier run: pass a new --folder-name, or delete {npz_path}"
    os.makedirs(folder, exist_ok=True)
    with atomic_write(manifest_path) as f:
        f.write(json.dumps(dict(checkpoint=os.path.abspath(ckpt), settings=settings), indent=1).encode())
    return None


def read_sample(folder: str, index: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Sample index's PNG as uint8 H x W x 3; one that does not decode, or whose size differs from shape (a
    PNG replaced by hand), raises cli.UsageError naming it."""
    path = png_path(folder, index)
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise UsageError(f"sample {path} is unreadable ({error}): delete it and rerun the same command to "
                         "regenerate it") from error
    if shape is not None and array.shape != shape:
        raise UsageError(f"sample {path} is {array.shape[1]}x{array.shape[0]} pixels, sample 0 is {shape[1]}x"
                         f"{shape[0]}: delete the odd one and rerun the same command to regenerate it")
    return array


def pack_samples(folder: str, num: int, npz_path: str, chunk: int = PACK_CHUNK) -> str:
    """Samples 0..num-1 into the ADM .npz at npz_path (arr_0: uint8 N x H x W x 3), read and written chunk PNGs
    at a time: memory holds one chunk, not the whole array (9.8 GB for 50k samples at 256 px). An unreadable or
    odd-sized PNG raises cli.UsageError naming it, and no .npz is left. Returns npz_path."""
    shape = read_sample(folder, 0).shape
    with npz_writer(npz_path) as npz, npz.stream("arr_0", (num, *shape), np.uint8) as arr_0:
        for start in range(0, num, chunk):
            arr_0.write(np.stack([read_sample(folder, i, shape) for i in range(start, min(num, start + chunk))]))
    return npz_path


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that are wrong before anything is loaded; returns the sampler settings (sampling_cli.resolve_sampler)."""
    check_sampling_args(args)
    sampler = resolve_sampler(args, DEFAULT_STEPS)
    if args.folder_name is not None:
        check_folder_name(args.folder_name)
    if not 0 < args.stop_sync_seconds < math.inf:
        raise UsageError(f"--stop-sync-seconds must be > 0 and finite, got {args.stop_sync_seconds}")
    if args.png_threads < 0:
        raise UsageError(f"--png-threads must be >= 0 (0: write in the sampling loop), got {args.png_threads}")
    if not args.sample_dir:
        raise UsageError("--sample-dir '' names no folder: pass one (default: samples), or '.' for this one")
    if os.path.exists(args.sample_dir) and not os.path.isdir(args.sample_dir):
        raise UsageError(f"--sample-dir {args.sample_dir} is a file: choose a folder")
    return sampler


#################################################################################
#                                  Sampling                                     #
#################################################################################

def sample_all(args: argparse.Namespace, ctx: DistContext, model, vae, sample_fn, shape: tuple[int, ...],
               folder: str, cfg_scale: float, cfg_channels: int, stop: StopSignals,
               scaling: LatentScaling | None = None) -> bool:
    """This rank's share of the missing PNGs. Batch k holds samples [k*B, (k+1)*B); rank r takes batches
    r, r+W, r+2W, ... A stop signal to any rank ends it after the current batch's PNGs are written (on the
    other ranks within about --stop-sync-seconds); returns whether it was stopped, the same on every rank.
    The PNGs are encoded and written by --png-threads threads while the next batch samples (at most two
    batches queued); all of this rank's are on disk before the ranks' last check."""
    agreement = BatchAgreement(stop, ctx.world_size, ctx.device, args.stop_sync_seconds)
    batch = args.per_proc_batch_size
    my_batches = range(ctx.rank, math.ceil(args.num_fid_samples / batch), ctx.world_size)
    with PngWriter(args.png_threads, max_pending=2 * batch, sync_every=batch) as writer:
        # disable=None: a bar only on a terminal (tqdm checks its stderr), never in a log file.
        for k in tqdm(my_batches, disable=None if ctx.is_main else True, desc="sampling"):
            indices = range(k * batch, min((k + 1) * batch, args.num_fid_samples))
            todo = [i for i in indices if not os.path.exists(png_path(folder, i))]
            if not todo:
                continue  # finished by an earlier run (not counted: the sync interval follows batches that work)
            if agreement.poll():
                break
            images = sample_images(model, indices, args.global_seed, shape, sample_fn, ctx.device, cfg_scale,
                                   cfg_channels, args.guidance_interval, args.precision, vae, scaling)
            for i, image in zip(indices, images, strict=True):
                if i in todo:
                    writer.submit(image, png_path(folder, i))
        writer.flush()  # this rank's PNGs on disk, the stopped batch's too
    return agreement.finish()  # every rank waits here for the others to stop or finish


@catches_stop_signals
def main(args: argparse.Namespace, stop: StopSignals) -> str:
    """Sample args.num_fid_samples images; returns the .npz path. SIGTERM, SIGUSR1 or SIGINT to any rank stop
    every rank after a batch (its PNGs complete; the others within --stop-sync-seconds): no .npz, exit status
    75, and the same command resumes."""
    sampler = check_args(args)
    ctx = setup_distributed()
    try:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32  # faster, slightly less exact
        model, info = load_model(args.ckpt, ctx.device, args.model,
                                 args.image_size or OFFICIAL_DEFAULTS["image_size"],
                                 args.num_classes or OFFICIAL_DEFAULTS["num_classes"], use_ema=not args.no_ema)
        cfg_scale = 1.0 if args.cfg_scale is None else args.cfg_scale
        check_model_args(args, model, info, cfg_scale)
        cfg_channels = resolve_cfg_channels(args.cfg_channels, model.in_channels)
        try:
            sample_fn = make_sample_fn(create_transport(**info["transport"]), **sampler_kwargs(sampler))
        except (ValueError, ImportError) as error:  # an SDE with an infinite score; dopri5 without torchdiffeq
            raise UsageError(f"{describe_sampler(sampler)}: {error}") from error
        vae, scaling = load_checked_vae(args, info, ctx.device, announce=ctx.is_main)

        # Rank 0 hashes the checkpoint and owns the folder; the others follow its verdict, so that a
        # refused run stops every rank instead of leaving them waiting at a barrier. They wait for it on the
        # long-wait group: hashing 10 GB on a network file system outlasts NCCL's timeout.
        verdict = None
        if ctx.is_main:
            settings = run_settings(args, info, cfg_scale, cfg_channels, ctx.device, file_sha256(args.ckpt), sampler,
                                    scaling)
            name = args.folder_name or default_folder_name(args, info["step"], settings)
            folder = os.path.join(args.sample_dir, name)
            try:
                verdict = (folder, prepare_folder(folder, f"{folder}.npz", settings, args.ckpt))
            except (UsageError, OSError) as error:  # e.g. a full disk: stop the other ranks too
                verdict = (folder, f"cannot prepare {folder} ({error}): free space or fix the permissions, or "
                                   "choose another --sample-dir")
        folder, error = broadcast_object(verdict, long_wait=True)
        if error is not None:
            raise UsageError(error)
        npz_path = f"{folder}.npz"

        cfg = info["config"]
        shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
        if args.compile:
            model.forward = torch.compile(model.forward)  # forward_with_cfg calls it: both halves compiled
        if ctx.is_main:
            guidance = (f", cfg {cfg_scale} on {describe_cfg_channels(cfg_channels, model.in_channels)}"
                        if cfg_scale > 1 else "")
            print(f"Sampling {args.num_fid_samples:,} images ({describe_sampler(sampler)}{guidance}) into {folder} on "
                  f"{ctx.world_size} process(es)")
        if sample_all(args, ctx, model, vae, sample_fn, shape, folder, cfg_scale, cfg_channels, stop, scaling):
            done = sum(os.path.exists(png_path(folder, i)) for i in range(args.num_fid_samples))
            exit_preempted("sample_ddp.py", f"stopped by {stop.first or 'a signal to another rank'}: {done:,} of "
                           f"{args.num_fid_samples:,} samples are in {folder}; exit status {EXIT_PREEMPTED}: rerun "
                           "the same command to finish them", ctx.is_main)
        # Every rank's PNGs are on disk (sample_all's last check waited for all ranks). Rank 0 packs them alone,
        # which takes minutes for 50k samples: after leaving the process group, so that no rank waits for it in
        # a collective (NCCL's watchdog ends a wait longer than the group's timeout); the others are done.
        cleanup(ctx)
        if ctx.is_main:
            pack_samples(folder, args.num_fid_samples, npz_path)  # ADM format: arr_0, uint8 NxHxWx3
            print(f"Saved {npz_path}")
        return npz_path
    finally:
        cleanup(ctx)


def get_parser() -> argparse.ArgumentParser:
    """The command line of sample_ddp.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    add_sampler_args(parser, mode="sde", method="euler",
                     steps_help="fixed-step integration steps; SDE: 250 = 250 NFE; ODE heun: 2 NFE per step; "
                                "adaptive solvers choose their own (default: 250)")
    add_guidance_args(parser, "guidance scale, 1 = none; 1.5 for the paper's FID (default: 1.0)")
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000,
                        help="images to sample (default: %(default)s)")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=32,
                        help="images per forward pass and process; does not change the images (default: %(default)s)")
    parser.add_argument("--global-seed", type=int, default=0,
                        help="seed of every sample's label and noise (default: %(default)s)")
    parser.add_argument("--sample-dir", type=str, default="samples",
                        help="where the sample folder and .npz go (default: %(default)s)")
    parser.add_argument("--folder-name", type=str, default=None,
                        help="sample folder inside --sample-dir (default: from checkpoint and settings, with a "
                             "digest of all settings)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on CUDA: faster, slightly less exact (default: on)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the network under bf16 autocast (faster on GPUs; images differ slightly) "
                             "(default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (default: off)")
    parser.add_argument("--png-threads", type=int, default=4,
                        help="threads that encode and write the PNGs while sampling goes on; 0 writes them in the "
                             "sampling loop; the images are the same (default: %(default)s)")
    parser.add_argument("--stop-sync-seconds", type=float, default=SYNC_SECONDS,
                        help="seconds between the ranks' checks for a stop signal: every rank stops within this "
                             "plus one batch of a signal to any rank (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed flags of sample_ddp.py."""
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
