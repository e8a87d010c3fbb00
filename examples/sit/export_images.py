"""
Write images of the toy data sets (--data sinusoid, --data fashion-mnist) to a folder of PNGs, so that
build_reference.py can make the reference batch of their FID (train.py --fid-every, evaluate_run.py): they are
generated or read from IDX files, and have no image folder of their own.

    python examples/sit/export_images.py --data sinusoid --image-size 32 --num-images 10000 --out refs/sinusoid32
    python examples/sit/export_images.py --data fashion-mnist --out refs/fashion-test
    python examples/sit/build_reference.py --data-path refs/sinusoid32 --image-size 32 --out refs/sinusoid32.npz

Each image is the data set's item as train.py reads it, quantised to uint8 as samples are before FID
(modeling/vae.py decode_to_uint8; grayscale as RGB), so a perfect model's samples and the reference hold the
same kind of images. Which images: sinusoid, fresh draws of the same distribution (--seed 1: train.py's
--global-seed 0 trains on seed 0's items), i.e. the distribution itself; fashion-mnist, the test split (not
seen in training), padded to 32 px as training pads it. The folder appears whole or not at all (written to a
temp folder, then renamed); an existing --out is refused.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any cwd
import torch  # noqa: E402
from data.datasets import build_dataset  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.fashion_mnist import FASHION_MNIST_ROOT  # noqa: E402
from modeling.vae import decode_to_uint8  # noqa: E402
from PIL import Image  # noqa: E402
from runtime.cli import HelpFormatter, UsageError, run  # noqa: E402

DEFAULT_SINUSOIDS = 10_000  # the count a sound FID reference needs (evaluation/reference_batch.py)


def check_args(args: argparse.Namespace) -> None:
    """Flags that are wrong or would be ignored, before anything is read or written."""
    if args.data == "sinusoid" and (args.split is not None or args.data_path is not None):
        raise UsageError("--split and --data-path are for --data fashion-mnist: --data sinusoid generates its images")
    if args.data == "fashion-mnist" and args.seed is not None:
        raise UsageError("--seed is for --data sinusoid: --data fashion-mnist reads its images; drop it")
    for name in ("image_size", "num_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if os.path.lexists(args.out):
        raise UsageError(f"--out {args.out} exists: images are never written into an existing folder; choose another "
                         "--out or delete it")
    existing = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(existing):  # missing parents are made, under a folder that can be written
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out}: cannot create folders under {existing}; choose another --out")


def main(args: argparse.Namespace) -> str:
    """Write the images; returns --out."""
    check_args(args)
    if args.data == "sinusoid":
        kwargs = dict(num_samples=args.num_images or DEFAULT_SINUSOIDS, image_size=args.image_size,
                      seed=1 if args.seed is None else args.seed)
    else:
        kwargs = dict(root=args.data_path or FASHION_MNIST_ROOT, split=args.split or "test",
                      image_size=args.image_size)
    try:
        dataset = build_dataset(args.data, **kwargs)[0]
    except DataError as error:
        raise UsageError(str(error)) from error
    count = min(args.num_images or len(dataset), len(dataset))
    temp = f"{args.out.rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        for start in range(0, count, 256):
            items = [dataset[i] for i in range(start, min(start + 256, count))]
            images = decode_to_uint8(torch.stack([image for image, _ in items]))
            for offset, (image, (_, label)) in enumerate(zip(images, items, strict=True)):
                folder = temp if args.data == "sinusoid" else os.path.join(temp, str(int(label)))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(image).save(os.path.join(folder, f"{start + offset:06d}.png"))
        os.rename(temp, args.out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    described = ", ".join(f"{key} {value}" for key, value in kwargs.items())
    print(f"wrote {count:,} images ({args.data}: {described}) to {args.out}; next: build_reference.py --data-path "
          f"{args.out} --image-size {args.image_size} --out {args.out.rstrip(os.sep)}.npz")
    return args.out


def get_parser() -> argparse.ArgumentParser:
    """The command line of export_images.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", choices=["sinusoid", "fashion-mnist"], required=True, help="the data set (required)")
    parser.add_argument("--out", type=str, required=True, help="the folder to write; must not exist (required)")
    parser.add_argument("--image-size", type=int, default=32, help="pixels, as train.py's --image-size")
    parser.add_argument("--num-images", type=int, default=None,
                        help=f"images to write (default: sinusoid {DEFAULT_SINUSOIDS:,}; fashion-mnist the whole "
                             "split, 10,000 for test)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sinusoid: seed of the draws (default: 1; train.py trains on seed --global-seed's)")
    parser.add_argument("--split", choices=["train", "test"], default=None,
                        help="fashion-mnist: the split (default: test, which training does not see)")
    parser.add_argument("--data-path", type=str, default=None,
                        help=f"fashion-mnist: the folder of its IDX files (default: {FASHION_MNIST_ROOT})")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of export_images.py."""
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
