"""
Build an ADM-format reference batch from a folder of images: the .npz evaluate.py (and guided-diffusion's
evaluations/evaluator.py) compares samples against.

Every image is centre-cropped as ADM and this example's training data are (data/datasets.py center_crop_arr:
BOX halvings, BICUBIC resize of the short side to --image-size, centre square) and run through the offline
Inception network (evaluation/inception.py). The output holds

    arr_0      uint8 N x S x S x 3, the cropped images
    mu, sigma  mean (2048,) and covariance (2048, 2048) of their pool_3 features (FID)
    mu_s, sigma_s  the same of the mixed_6/conv spatial features (2023,) (sFID)

computed as ADM's evaluator computes statistics (mean, np.cov(rowvar=False)), in float64, shard by shard
(evaluation/running_stats.py): equal to np.cov of all features up to float rounding, without holding them. A
reference of fewer than 10,000 images is warned about (its 2048 x 2048 covariance is poorly estimated), and so
are images the crop upsamples (a short side below --image-size).

--num-images N takes a seeded uniform random subset of the folder (across all its classes). The work is
split in shards of --shard-size consecutive chosen images; shard s belongs to rank s % world size
(torchrun), is written to <out>.parts/ atomically, and a killed run resumes by skipping finished shards
(with any number of processes): the result is identical. When all shards exist, rank 0 writes --out and
removes <out>.parts/: after leaving the process group (no rank waits for it in a collective), one shard at a
time (arr_0 streamed into the .npz: memory holds one shard, whatever --num-images). An existing --out is
never overwritten. SIGTERM, SIGUSR1 or SIGINT stop every rank
after its current batch (the ranks compare stop flags every few seconds) with exit status 75; the same
command resumes.

The folder is listed as data/npz.py scan_images lists it: an ImageFolder tree in the order training reads
it (linked class folders followed) or a flat folder; what is left out is said in one line on rank 0.

    python examples/sit/build_reference.py --data-path /data/imagenet/val --out ref/imagenet256_val.npz
    torchrun --nproc_per_node 8 examples/sit/build_reference.py --data-path /data/imagenet/train \\
        --num-images 50000 --out ref/imagenet256_train50k.npz
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any cwd
from data.image_folder import IMAGE_ERRORS, center_crop_arr, to_rgb  # noqa: E402
from data.npz import choose_subset, scan_images  # noqa: E402
from data.npz_stream import npz_writer  # noqa: E402
from evaluation.inception import Activations, InceptionFeatures, file_sha256, inception_weights_path  # noqa: E402
from evaluation.reference_batch import reference_warning  # noqa: E402
from evaluation.running_stats import RunningStats  # noqa: E402
from runtime.atomic import atomic_write, remove_stale_temps  # noqa: E402
from runtime.checks import check_device  # noqa: E402
from runtime.cli import HelpFormatter, UsageError, run  # noqa: E402
from runtime.distributed import DistContext, barrier, cleanup, setup_distributed  # noqa: E402
from runtime.preemption import (  # noqa: E402
    EXIT_PREEMPTED,
    SYNC_SECONDS,
    BatchAgreement,
    StopSignals,
    catches_stop_signals,
    exit_preempted,
    ignore_stop_signals,
)

ExtractorFactory = Callable[[torch.device, int], Callable[[np.ndarray], Activations]]
# Settings that must match for a resume to continue the same reference.
RESUME_KEYS = ("data_path", "num_found", "image_size", "num_images", "seed", "shard_size", "chosen_sha256",
               "network")

#################################################################################
#                                  Helpers                                      #
#################################################################################


def parts_folder(out: str) -> str:
    """Where the shards of --out go until it is written."""
    return out + ".parts"


def shard_path(parts: str, shard: int) -> str:
    return os.path.join(parts, f"shard_{shard:06d}.npz")


def check_args(args: argparse.Namespace) -> None:
    """Flags that are wrong, before anything is read or created."""
    for name in ("image_size", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("num_images", "max_shards"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (or left out), got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if not os.path.isdir(args.data_path):
        state = "is a file" if os.path.exists(args.data_path) else "does not exist"
        raise UsageError(f"--data-path {args.data_path} {state}: pass a folder of images (root/<class>/<image> or "
                         "flat)")
    if not args.out.lower().endswith(".npz"):
        raise UsageError(f"--out {args.out}: a reference batch is an .npz; give a name ending in .npz")
    if os.path.exists(args.out):
        raise UsageError(f"--out {args.out} exists: a reference is never overwritten; choose another --out or "
                         "delete it")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out}: folder {parent} does not exist or is not writable")
    parts = parts_folder(args.out)
    if os.path.exists(parts) and not os.path.isdir(parts):
        raise UsageError(f"{parts} is a file: build_reference.py keeps its shards there; remove it")
    if os.path.isdir(parts) and not os.path.exists(os.path.join(parts, "meta.json")):
        if any(not name.startswith(".") for name in os.listdir(parts)):
            raise UsageError(f"{parts} holds files but no meta.json: not an interrupted build_reference.py run; "
                             "remove it or choose another --out")
    if args.device is not None:
        check_device(args.device)


def make_meta(args: argparse.Namespace, paths: list[str], chosen: np.ndarray, network: str) -> dict:
    """What this reference is: the images chosen, crop size, sharding, network (meta.json, checked on resume)."""
    digest = hashlib.sha256()
    for index in chosen:
        digest.update(os.path.relpath(paths[index], args.data_path).encode("utf-8", "surrogateescape") + b"\0")
    return dict(
        data_path=os.path.abspath(args.data_path),
        num_found=len(paths),
        image_size=args.image_size,
        num_images=len(chosen),
        seed=args.seed if args.num_images is not None else None,
        shard_size=args.shard_size,
        chosen_sha256=digest.hexdigest(),
        network=network,
        num_shards=math.ceil(len(chosen) / args.shard_size),
    )


def check_resume(parts: str, meta: dict) -> bool:
    """Whether parts holds an interrupted run of these settings (False: none); another run's raises."""
    meta_path = os.path.join(parts, "meta.json")
    if not os.path.exists(meta_path):
        return False
    try:
        with open(meta_path) as f:
            old = json.load(f)
    except (ValueError, OSError) as error:
        raise UsageError(f"{meta_path} is unreadable ({error}): remove {parts} to start over") from error
    differing = [f"{key}={old.get(key)!r} (now {meta[key]!r})" for key in RESUME_KEYS
                 if not isinstance(old, dict) or old.get(key) != meta[key]]
    if differing:
        raise UsageError(f"{parts} holds an interrupted reference build with {', '.join(differing)}: rerun with its "
                         "settings to resume, or remove it to start over")
    return True


def load_crop(path: str, image_size: int) -> tuple[np.ndarray, int]:
    """The ADM centre crop of one image file, uint8 S x S x 3, and the file's short side (a crop of a smaller
    image is upsampled)."""
    with open(path, "rb") as f:
        image = to_rgb(Image.open(f))
    return np.array(center_crop_arr(image, image_size)), min(image.size)


class CroppedImages(torch.utils.data.Dataset):
    """Chosen images, cropped; a file that does not decode is a flagged blank (named by the main process in one
    line: an exception in a DataLoader worker arrives as a multi-line traceback)."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, bool, int]:
        try:
            image, short_side = load_crop(self.paths[index], self.image_size)
            return image, True, short_side
        except IMAGE_ERRORS:
            return np.zeros((self.image_size, self.image_size, 3), np.uint8), False, 0


def decode_error(path: str, done: int, total: int) -> UsageError:
    """The one-line error for an image that does not decode, with PIL's reason."""
    try:
        with Image.open(path) as image:
            image.load()
        reason = "unreadable"
    except IMAGE_ERRORS as error:
        reason = str(error).replace(f" {path!r}", "") or type(error).__name__
    return UsageError(f"cannot decode image {path} ({reason}): replace it and rerun to resume ({done} of {total} "
                      "shards are done and kept), or delete it and remove the .parts folder to start over")


def resize_summary(short_sides: np.ndarray, image_size: int) -> str | None:
    """The line saying how many images the crop resized: upsampling (a short side below --image-size) is warned
    about, since an upsampled image is blurrier than a real one of that size, and FIDs against it rise."""
    up, down = int((short_sides < image_size).sum()), int((short_sides > image_size).sum())
    if not up and not down:
        return None
    text = f"resized to --image-size {image_size}: {down:,} image(s) down (the ADM centre crop)"
    if not up:
        return text
    return (f"warning: {text}, {up:,} of {len(short_sides):,} up (short side {int(short_sides.min())} px at least): "
            "upsampled images are blurrier than real images of that size, which raises every FID against this "
            f"reference; build it at the images' own size (--image-size {int(short_sides.min())}) if the samples "
            "can be that size")


def collate(items: list[tuple[np.ndarray, bool, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.stack([item[i] for item in items]) for i in range(3))


def default_extractor(device: torch.device, batch_size: int) -> InceptionFeatures:
    """The offline Inception network (evaluation/inception.py)."""
    return InceptionFeatures(device, batch_size)


def network_id(factory: ExtractorFactory) -> str:
    """What computes the features, for meta.json: shards of different networks must not mix."""
    if factory is default_extractor:
        return f"inception default_1.pt sha256 {file_sha256(inception_weights_path())}"
    return f"custom:{getattr(factory, '__name__', repr(factory))}"


def write_reference(args: argparse.Namespace, num_shards: int) -> None:
    """Assemble the shards into --out (arr_0 + statistics), then remove the parts folder. One shard is in
    memory at a time: its images go into arr_0 as they are read, its features into the running statistics."""
    parts = parts_folder(args.out)
    with open(os.path.join(parts, "meta.json")) as f:
        num_images = json.load(f)["num_images"]
    shape = (num_images, args.image_size, args.image_size, 3)
    pool, spatial = RunningStats(), RunningStats()
    short_sides = []
    with npz_writer(args.out) as npz:
        with npz.stream("arr_0", shape, np.uint8) as arr_0:
            for shard in range(num_shards):
                with np.load(shard_path(parts, shard)) as data:
                    arr_0.write(data["images"])
                    pool.update(data["pool"])
                    spatial.update(data["spatial"])
                    if "short_sides" in data:  # shards of an earlier version's interrupted run do not say
                        short_sides.append(data["short_sides"])
        pool_stats, spatial_stats = pool.stats(), spatial.stats()
        for key, value in (("mu", pool_stats.mu), ("sigma", pool_stats.sigma), ("mu_s", spatial_stats.mu),
                           ("sigma_s", spatial_stats.sigma)):
            npz.add(key, value)
    shutil.rmtree(parts)
    print(f"wrote {args.out}: {num_images} images {shape[1:]}, mu/sigma {pool_stats.mu.shape}, mu_s/sigma_s "
          f"{spatial_stats.mu.shape}", flush=True)
    if short_sides:
        said = resize_summary(np.concatenate(short_sides), args.image_size)
        if said:
            print(said, file=sys.stderr if said.startswith("warning") else sys.stdout, flush=True)


#################################################################################
#                                  Building                                     #
#################################################################################


def shard_batches(args: argparse.Namespace, todo: list[int], chosen: np.ndarray, paths: list[str],
                  extractor: Callable[[np.ndarray], Activations], rank: int, num_shards: int) -> Iterator[None]:
    """Build the shards in todo one Inception batch per step (a stop can come between any two); a shard is
    written as soon as its last batch is featurised."""
    parts = parts_folder(args.out)
    for shard in todo:
        indices = chosen[shard * args.shard_size : (shard + 1) * args.shard_size]
        shard_paths = [paths[i] for i in indices]
        loader = torch.utils.data.DataLoader(CroppedImages(shard_paths, args.image_size), batch_size=args.batch_size,
                                             num_workers=args.num_workers, collate_fn=collate,
                                             worker_init_fn=ignore_stop_signals)
        images, parts_acts, short_sides = [], [], []
        for start, (batch, ok, short) in zip(range(0, len(shard_paths), args.batch_size), loader, strict=True):
            if not ok.all():
                done = sum(os.path.exists(shard_path(parts, s)) for s in range(num_shards))
                raise decode_error(shard_paths[start + int(np.flatnonzero(~ok)[0])], done, num_shards)
            images.append(batch)
            short_sides.append(short)
            parts_acts.append(extractor(batch))
            if len(images) < len(loader):
                yield
        acts = Activations.concatenate(parts_acts)
        with atomic_write(shard_path(parts, shard)) as f:
            np.savez(f, images=np.concatenate(images), pool=acts.pool, spatial=acts.spatial,
                     short_sides=np.concatenate(short_sides))
        print(f"[rank {rank}] wrote shard {shard} ({len(indices)} images)", flush=True)
        yield


def run_until_stopped(steps: Iterator[None], stop: StopSignals, ctx: DistContext,
                      sync_s: float = SYNC_SECONDS) -> bool:
    """Run every step unless a stop signal comes; whether one came, on any rank (the same answer on all).
    The ranks agree as sample_ddp.py's and extract_latents.py's do (runtime.preemption.BatchAgreement): a
    signal that reached one rank stops every rank within about sync_s and a step, and a rank whose work is
    done keeps answering the others until no rank works."""
    agreement = BatchAgreement(stop, ctx.world_size, ctx.device, sync_s)
    while not agreement.poll() and next(steps, StopIteration) is not StopIteration:
        pass
    return agreement.finish()


@catches_stop_signals
def main(args: argparse.Namespace, extractor_factory: ExtractorFactory | None = None, *,
         stop: StopSignals) -> None:
    """Crop and featurise every shard --out.parts does not hold yet; write --out when all are done. A stop
    signal (SIGTERM, SIGUSR1, SIGINT) ends every rank after its current batch with exit status 75, the shards
    written so far kept for the rerun."""
    check_args(args)
    factory = extractor_factory or default_extractor
    if factory is default_extractor:
        try:
            inception_weights_path()
        except (ImportError, FileNotFoundError) as error:
            raise UsageError(str(error)) from error
    scan = scan_images(args.data_path, skip_irregular=True)
    paths = scan.paths
    if args.num_images is not None and args.num_images > len(paths):
        raise UsageError(f"--num-images {args.num_images}: {args.data_path} holds only {len(paths)} images; lower "
                         "it or leave it out to use all")
    chosen = choose_subset(len(paths), args.num_images, args.seed)
    meta = make_meta(args, paths, chosen, network_id(factory))
    parts = parts_folder(args.out)
    ctx = setup_distributed()
    try:
        if ctx.is_main and scan.summary():
            print(f"warning: {scan.summary()}", file=sys.stderr, flush=True)
        weak = reference_warning(len(chosen), f"the reference {args.out}")
        if ctx.is_main and weak:
            print(f"warning: {weak}", file=sys.stderr, flush=True)
        resuming = check_resume(parts, meta)  # every rank: a mismatch stops all of them before any work
        barrier()
        if ctx.is_main:
            if resuming:
                remove_stale_temps(parts)
            else:
                os.makedirs(parts, exist_ok=True)
                with atomic_write(os.path.join(parts, "meta.json")) as f:
                    f.write(json.dumps(meta, indent=1).encode())
        barrier(long_wait=True)  # rank 0's folder work, at the file system's pace

        num_shards = meta["num_shards"]
        mine = range(ctx.rank, num_shards, ctx.world_size)
        todo = [s for s in mine if not os.path.exists(shard_path(parts, s))]
        if args.max_shards is not None:
            todo = todo[: args.max_shards]  # for time-limited jobs and for testing resumption
        print(f"[rank {ctx.rank}] {len(todo)} of {len(mine)} shards to build", flush=True)
        # --device cuda under torchrun means each rank's own GPU, not all on cuda:0.
        device = ctx.device if args.device in (None, "cuda") else torch.device(args.device)
        extractor = factory(device, args.batch_size) if todo else None
        steps = shard_batches(args, todo, chosen, paths, extractor, ctx.rank, num_shards)
        if run_until_stopped(steps, stop, ctx):
            done = sum(os.path.exists(shard_path(parts, s)) for s in range(num_shards))
            exit_preempted("build_reference.py", f"stopped by {stop.first or 'a signal to another rank'}: {done} of "
                           f"{num_shards} shards are in {parts}; exit status {EXIT_PREEMPTED}: rerun the same command "
                           "to resume", ctx.is_main)
        # Every rank's shards are on disk (run_until_stopped's last check waited for all ranks). Rank 0 writes
        # --out alone, which reads every shard: after leaving the process group, so that no rank waits for it
        # in a collective (NCCL's watchdog ends a wait longer than the group's timeout); the others are done.
        cleanup(ctx)
        if ctx.is_main:
            missing = [s for s in range(num_shards) if not os.path.exists(shard_path(parts, s))]
            if missing:
                print(f"{num_shards - len(missing)}/{num_shards} shards done in {parts} ({len(missing)} left: rerun "
                      "to resume)", flush=True)
            else:
                write_reference(args, num_shards)
    finally:
        cleanup(ctx)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=HelpFormatter,
                                     epilog=f"SIGTERM, SIGUSR1 or SIGINT stop every rank after its current batch with "
                                     f"exit status {EXIT_PREEMPTED}; rerun the same command to resume.")
    parser.add_argument("--data-path", type=str, required=True,
                        help="folder of images, searched recursively: root/<class>/<image> or flat (required)")
    parser.add_argument("--out", type=str, required=True, help="the reference .npz to write; never overwritten "
                                                               "(required)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="ADM centre-crop side in pixels; must match the samples' size")
    parser.add_argument("--num-images", type=int, default=None,
                        help="use N images drawn uniformly at random (seeded by --seed) across the whole folder "
                             "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num-images subset")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception call")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding images")
    parser.add_argument("--device", type=str, default=None,
                        help="Inception device (default: this rank's GPU if there is one, else cpu)")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="stop after this many shards per rank; rerun to resume (default: all)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of build_reference.py."""
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
