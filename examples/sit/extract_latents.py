"""
Encode an ImageFolder dataset with a diffusers VAE (SD's by default; any AutoencoderKL) once, storing the
posterior moments (mean, std) of each image and of its horizontal flip, so training reads latents instead of
running the encoder every step (fast-DiT reports +95% speed). LatentDataset (data/datasets.py) samples
mean + std * eps and a random flip at every access and applies the VAE's factors from meta.json, so training
sees the same distribution as with on-the-fly encoding.

Output folder:
    meta.json              sizes, VAE name, its scaling_factor / shift_factor, chunking (checked when resuming),
                           the image folder (image_root, absolute)
    labels.npy             int64 label of every image, in dataset order
    image_files.json       the path of every image relative to --data-path, in dataset order: training finds
                           the image behind each latent with it (--repa, data/latent_images.py)
    chunk_000000.npy ...   float16 moments (n, 2, 2, C, h, w): [no flip, flip] x [mean, std], unscaled

Work is split in chunks of consecutive images; chunk c belongs to rank c % world_size. Every chunk is
written to a temp file and renamed, so a killed run resumes by skipping the chunks that exist (even
with a different number of processes). SIGTERM, SIGUSR1 or SIGINT to any rank stop it after its current batch
and every other rank within about --stop-sync-seconds and one batch (an unfinished chunk is dropped, redone by
the rerun) with exit status 75.

    torchrun --nproc_per_node=8 examples/sit/extract_latents.py --data-path /data/imagenet/train \\
        --vae /models/sd-vae-ft-ema --out latents/imagenet256
    python examples/sit/extract_latents.py --data-path ... --vae stabilityai/sd-vae-ft-ema --out ...
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any cwd
from data.errors import DataError  # noqa: E402
from data.image_folder import IMAGE_ERRORS, ImageFolderDataset  # noqa: E402
from data.latent_images import IMAGE_FILES, first_difference, image_files, read_image_files  # noqa: E402
from data.latents import latent_chunk_path  # noqa: E402
from modeling.fingerprint import weights_sha256  # noqa: E402
from modeling.hub import absolute_if_local  # noqa: E402
from modeling.latent_scaling import of_vae  # noqa: E402
from modeling.vae import load_vae  # noqa: E402
from runtime.atomic import atomic_write, remove_stale_temps  # noqa: E402
from runtime.cli import UsageError, run  # noqa: E402
from runtime.distributed import barrier, cleanup, setup_distributed  # noqa: E402
from runtime.preemption import (  # noqa: E402
    EXIT_PREEMPTED,
    SYNC_SECONDS,
    BatchAgreement,
    StopSignals,
    catches_stop_signals,
    exit_preempted,
    ignore_stop_signals,
)

RESUME_KEYS = ("num_images", "image_size", "chunk_size", "latent_shape", "dtype", "classes", "vae_sha256",
               "scaling_factor", "shift_factor")
OPTIONAL_RESUME_KEYS = ("vae_sha256", "shift_factor")  # absent from folders written before they were recorded
# image_root is a record, not a resume key: the same images resume from wherever the folder is mounted now (its
# image_files.json, where the folder has one, checks that they are the same).

#################################################################################
#                                  Helpers                                      #
#################################################################################


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """
    Posterior moments of images in [-1, 1] (B, 3, H, W) and of their horizontal flips:
    (B, 2, 2, C, h, w) = [no flip, flip] x [mean, std].
    """
    both = torch.cat([images, images.flip(-1)])
    posterior = vae.encode(both).latent_dist
    mean, std = posterior.mean.float(), posterior.std.float()
    batch = len(images)
    return torch.stack(
        [torch.stack([mean[:batch], std[:batch]], 1), torch.stack([mean[batch:], std[batch:]], 1)], 1
    )


def write_atomic_npy(path: str, array: np.ndarray) -> None:
    """np.save through atomic.atomic_write: readers and resumes never see a half-written file."""
    with atomic_write(path) as f:
        np.save(f, array)


class CheckedImages(torch.utils.data.Dataset):
    """The ImageFolder items plus whether each decoded: a corrupt file becomes a flagged blank image, so the
    main process can name it in one line (an exception raised in a DataLoader worker arrives as a
    multi-line traceback)."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            image, label = self.dataset[index]
        except IMAGE_ERRORS:
            size = self.dataset.image_size
            return torch.zeros(3, size, size), self.dataset.labels[index], False
        return image, label, True


def decode_error(dataset: ImageFolderDataset, index: int, done: int, total: int) -> UsageError:
    """The one-line error for an image that does not decode, with PIL's reason."""
    try:
        dataset.load_array(index)
        reason = "unreadable"
    except IMAGE_ERRORS as error:
        if isinstance(error, DataError) and error.__cause__ is not None:
            error = error.__cause__  # PIL's reason, not the dataset's own sentence around it
        reason = str(error).replace(f" {dataset.paths[index]!r}", "") or type(error).__name__
    return UsageError(f"cannot decode image {dataset.paths[index]} ({reason}): replace it with a readable image "
                      f"and rerun to resume ({done} of {total} chunks are done and kept); removing it changes "
                      "the dataset and needs a new --out")


def load_dataset(args: argparse.Namespace) -> ImageFolderDataset:
    """The ImageFolder at --data-path; a missing or empty one raises cli.UsageError."""
    try:
        return ImageFolderDataset(args.data_path, args.image_size, random_flip=False)
    except DataError as error:
        raise UsageError(str(error)) from error


def check_args(args: argparse.Namespace) -> None:
    """Flags that are wrong before anything is read or created."""
    for name in ("image_size", "chunk_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.max_chunks is not None and args.max_chunks < 1:
        raise UsageError(f"--max-chunks must be >= 1 (or left out for all chunks), got {args.max_chunks}")
    if not 0 < args.stop_sync_seconds < math.inf:
        raise UsageError(f"--stop-sync-seconds must be > 0 and finite, got {args.stop_sync_seconds}")
    if not args.out:
        raise UsageError("--out '' names no folder: pass the folder the latents go to")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file: choose a folder")
    if os.path.isdir(args.out) and not os.path.exists(os.path.join(args.out, "meta.json")):
        # labels.npy and image_files.json are written just before meta.json: alone, they are an extraction stopped
        # at its start.
        foreign = [name for name in os.listdir(args.out)
                   if name not in ("labels.npy", IMAGE_FILES) and not name.startswith(".")]
        if foreign:
            raise UsageError(f"--out {args.out} is not empty and holds no extraction (no meta.json): choose "
                             "another --out")


def encoder_sha256(vae) -> str:
    """SHA-256 of the weights that make the latents (encoder and quant_conv): the same VAE moved to another
    path still resumes, another VAE under the same path does not."""
    return weights_sha256(vae, prefixes=("encoder.", "quant_conv."))


def make_meta(args: argparse.Namespace, dataset: ImageFolderDataset, vae) -> dict:
    """What this extraction is: sizes, VAE, chunking (meta.json)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % factor:
        raise UsageError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor "
                         f"{factor}: use e.g. {max(factor, args.image_size // factor * factor)}")
    latent_size = args.image_size // factor
    return dict(
        num_images=len(dataset),
        image_size=args.image_size,
        chunk_size=args.chunk_size,
        latent_shape=[vae.config.latent_channels, latent_size, latent_size],
        num_classes=len(dataset.classes),
        classes=dataset.classes,
        vae=absolute_if_local(args.vae),  # a record that stays true from any working directory
        vae_sha256=encoder_sha256(vae),
        # The factors training applies to the stored (unscaled) moments: (latent - shift_factor) * scaling_factor.
        scaling_factor=of_vae(vae).scaling_factor,
        shift_factor=of_vae(vae).shift_factor,
        dtype=args.dtype,
        layout="(n, [no flip, flip], [mean, std], C, h, w)",
        image_root=os.path.abspath(args.data_path),  # where training finds the images (--repa)
    )


def check_resume(out: str, meta: dict, dataset: ImageFolderDataset | None = None) -> dict | None:
    """The previous run's metadata if out holds one with the same settings (None if out holds none); with the
    dataset, its image paths must be those of out's image_files.json where out has one (a folder extracted
    before the file was recorded resumes on the checks of meta.json alone)."""
    meta_path = os.path.join(out, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            old = json.load(f)
    except (ValueError, OSError) as error:
        raise UsageError(f"{meta_path} is unreadable ({error}): use another --out") from error
    if not isinstance(old, dict):
        raise UsageError(f"{meta_path} holds a {type(old).__name__}, not extract_latents.py's metadata: use another "
                         "--out")
    for key in RESUME_KEYS:
        if key in OPTIONAL_RESUME_KEYS and key not in old:
            continue  # written before the fingerprint / the shift existed
        if key == "vae_sha256" and old[key] != meta[key]:
            raise UsageError(f"{out} holds latents of another VAE ({old.get('vae')!r}; its encoder weights differ from "
                             f"--vae {meta['vae']!r}): resume with that VAE, or use another --out")
        if old.get(key) != meta[key]:
            raise UsageError(f"{out} holds an extraction with {key}={old.get(key)!r}, this run has {meta[key]!r}: "
                             "use another --out or the same settings to resume")
    if dataset is not None:
        check_same_images(out, dataset)
    return old


def check_same_images(out: str, dataset: ImageFolderDataset) -> None:
    """UsageError if out's image_files.json lists other images than the folder now has (renamed, replaced):
    the chunks left to encode would not be the images the finished ones are."""
    try:
        recorded = read_image_files(out)
    except DataError as error:
        raise UsageError(str(error)) from error
    found = image_files(dataset)
    if recorded is not None and recorded != found:
        i = first_difference(recorded, found)
        was, now = (repr(files[i]) if i < len(files) else "nothing" for files in (recorded, found))
        raise UsageError(f"{out} holds an extraction of other images: image {i} was {was}, --data-path "
                         f"{dataset.root} has {now} there: use another --out, or the same images to resume")


def write_meta(args: argparse.Namespace, dataset: ImageFolderDataset, meta: dict) -> dict:
    """Write labels.npy, image_files.json and meta.json in a new output folder, or check a previous run's
    (resume)."""
    old = check_resume(args.out, meta, dataset)
    if old is not None:
        remove_stale_temps(args.out)
        return old  # an older folder without image_files.json is left as it was: its chunks' images are unknown
    os.makedirs(args.out, exist_ok=True)
    write_atomic_npy(os.path.join(args.out, "labels.npy"), np.asarray(dataset.labels, dtype=np.int64))
    with atomic_write(os.path.join(args.out, IMAGE_FILES)) as f:
        f.write(json.dumps(image_files(dataset)).encode())
    with atomic_write(os.path.join(args.out, "meta.json")) as f:  # last: its presence marks a valid folder
        f.write(json.dumps(meta, indent=1).encode())
    return meta


#################################################################################
#                                  Extraction                                   #
#################################################################################


@catches_stop_signals
def main(args: argparse.Namespace, stop: StopSignals) -> None:
    """Encode every chunk of --data-path that --out does not hold yet; a stop signal to any rank ends it after
    its current batch and the others within about --stop-sync-seconds, with exit status 75 (a chunk in
    progress is dropped: the rerun encodes it)."""
    check_args(args)
    dataset = load_dataset(args)
    ctx = setup_distributed()
    try:
        if ctx.is_main and dataset.scan_summary:
            print(f"warning: {dataset.scan_summary}", file=sys.stderr, flush=True)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        vae = load_vae(args.vae, ctx.device)
        meta = make_meta(args, dataset, vae)
        check_resume(args.out, meta, dataset)  # every rank: a mismatch stops all of them before any work
        if ctx.is_main:
            write_meta(args, dataset, meta)
        barrier(long_wait=True)  # rank 0's labels and metadata, at the file system's pace

        num_chunks = math.ceil(len(dataset) / args.chunk_size)
        mine = range(ctx.rank, num_chunks, ctx.world_size)
        todo = [c for c in mine if not os.path.exists(latent_chunk_path(args.out, c))]
        if args.max_chunks is not None:
            todo = todo[: args.max_chunks]  # for testing resumption and for time-limited jobs
        print(f"[rank {ctx.rank}] {len(todo)} of {len(mine)} chunks to encode", flush=True)
        dtype = np.float16 if args.dtype == "float16" else np.float32

        # One DataLoader for all of this rank's work (decoding JPEGs is the CPU bottleneck), with batches
        # that never straddle two chunks; a chunk is written as soon as its last batch is encoded.
        batches = []
        for chunk in todo:
            end = min(len(dataset), (chunk + 1) * args.chunk_size)
            for start in range(chunk * args.chunk_size, end, args.batch_size):
                batches.append((chunk, list(range(start, min(end, start + args.batch_size)))))
        loader = torch.utils.data.DataLoader(
            CheckedImages(dataset), batch_sampler=[indices for _, indices in batches], num_workers=args.num_workers,
            worker_init_fn=ignore_stop_signals,
        )
        moments = []
        agreement = BatchAgreement(stop, ctx.world_size, ctx.device, args.stop_sync_seconds)
        for (chunk, indices), (images, _, ok) in zip(batches, loader, strict=True):
            if agreement.poll():
                break
            if not ok.all():
                done = sum(os.path.exists(latent_chunk_path(args.out, c)) for c in range(num_chunks))
                raise decode_error(dataset, indices[int((~ok).nonzero()[0])], done, num_chunks)
            moments.append(encode_moments(vae, images.to(ctx.device)).cpu())
            if indices[-1] == min(len(dataset), (chunk + 1) * args.chunk_size) - 1:
                write_atomic_npy(latent_chunk_path(args.out, chunk), torch.cat(moments).numpy().astype(dtype))
                print(f"[rank {ctx.rank}] wrote chunk {chunk} ({sum(len(m) for m in moments)} images)", flush=True)
                moments = []

        if agreement.finish():  # every rank waits here for the others to stop or finish
            done = sum(os.path.exists(latent_chunk_path(args.out, c)) for c in range(num_chunks))
            exit_preempted("extract_latents.py", f"stopped by {stop.first or 'a signal to another rank'}: {done} of "
                           f"{num_chunks} chunks are in {args.out}; exit status {EXIT_PREEMPTED}: rerun the same "
                           "command to resume", ctx.is_main)
        if ctx.is_main:
            missing = [c for c in range(num_chunks) if not os.path.exists(latent_chunk_path(args.out, c))]
            print(
                f"done: {num_chunks - len(missing)}/{num_chunks} chunks in {args.out}"
                + (f" ({len(missing)} left: rerun to resume)" if missing else ""),
                flush=True,
            )
    finally:
        cleanup(ctx)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"SIGTERM, SIGUSR1 or SIGINT to any rank stop every rank after at most --stop-sync-seconds and one "
        f"batch, with exit status {EXIT_PREEMPTED}; rerun the same command to resume.",
    )
    parser.add_argument(
        "--data-path", type=str, required=True, help="ImageFolder root (root/<class>/<image>) (required)"
    )
    parser.add_argument(
        "--vae",
        type=str,
        default="stabilityai/sd-vae-ft-ema",
        help="local AutoencoderKL directory (offline) or hub id (default: %(default)s)",
    )
    parser.add_argument("--out", type=str, required=True, help="output folder, resumed if it exists (required)")
    parser.add_argument("--image-size", type=int, default=256, help="centre-crop side in pixels (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=1000, help="images per output file (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per encoder call, x2 with flips (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader processes (default: %(default)s)")
    parser.add_argument("--dtype", type=str, choices=["float16", "float32"], default="float16",
                        help="stored moments (default: %(default)s)")
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="stop after this many chunks per rank (default: all)")
    parser.add_argument("--stop-sync-seconds", type=float, default=SYNC_SECONDS,
                        help="seconds between the ranks' checks for a stop signal: every rank stops within this "
                             "plus one batch of a signal to any rank (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of extract_latents.py."""
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
