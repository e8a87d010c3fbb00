"""
Sample batches in the ADM evaluator format: an .npz whose key arr_0 holds uint8 N x H x W x 3 images
(what `VIRTUAL_imagenet256_labeled.npz` and guided-diffusion's evaluator.py read; reference batches add
the statistics mu, sigma, mu_s, sigma_s), plus reading a folder of images into the same array, whole, its
first N images or a seeded random subset. Unreadable input raises cli.UsageError naming the file.
"""

import os
import re
import sys
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image
from runtime.cli import UsageError

from data.errors import DataError
from data.image_folder import IMAGE_ERRORS, IMG_EXTENSIONS, ImageFolderScan, scan_image_files, to_rgb
from data.npz_stream import npz_writer

# Temp files of an interrupted write: runtime/atomic.py's ".<name>.tmp-<pid>" and older "<name>.tmp.png" / ".tmp.<pid>".
_TEMP_NAME = re.compile(r"\.tmp([.-]|$)")


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """
    uint8 N x H x W x 3 from uint8 NHWC / NHW / NCHW arrays or float tensors in [-1, 1] (NCHW, as models
    produce). Grayscale is repeated to 3 channels, because the ADM evaluator expects RGB.

    >>> to_uint8_nhwc(torch.zeros(2, 1, 8, 8)).shape
    (2, 8, 8, 3)
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.dtype != torch.uint8:
            images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        images = images.numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images or a float tensor in [-1, 1], got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected N x H x W x C images, got shape {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 colour channels, got shape {images.shape}")
    return np.ascontiguousarray(images)


def save_npz(images: np.ndarray | torch.Tensor, path: str, **arrays: np.ndarray) -> str:
    """
    Write images as an ADM-format npz (key arr_0, uint8 NxHxWx3, plus any further arrays such as a reference
    batch's mu / sigma / mu_s / sigma_s) through npz_stream.npz_writer, so an interrupted run or a full disk
    never leaves a truncated file that looks complete. Returns the path.

    >>> save_npz(np.zeros((4, 32, 32, 3), np.uint8), "/tmp/samples.npz")
    '/tmp/samples.npz'
    """
    with npz_writer(path) as npz:  # the streaming writer's path: the same bytes as np.savez, written atomically
        for name, array in dict(arr_0=to_uint8_nhwc(images), **arrays).items():
            npz.add(name, array)
    return path


def load_npz(path: str) -> np.ndarray:
    """
    The uint8 NxHxWx3 array of an ADM-format npz (key arr_0).

    >>> load_npz(save_npz(np.zeros((4, 32, 32, 3), np.uint8), "/tmp/samples.npz")).shape
    (4, 32, 32, 3)
    """
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UsageError(f"{path} is a plain .npy array, not an ADM .npz: save it with key arr_0")
        with data:
            if "arr_0" not in data:
                keys = list(data.keys())
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                raise UsageError(f"{path} has keys {shown}, no arr_0: not an ADM .npz of images (a torch checkpoint "
                                 "is a zip too); pass the samples' .npz")
            images = data["arr_0"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UsageError(f"cannot read {path}: truncated, corrupt or not an .npz ({type(error).__name__}); "
                         "write it again") from error
    try:
        images = to_uint8_nhwc(images)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{path}: arr_0 is not uint8 N x H x W x 3 images ({error})") from error
    if not images.size:
        raise UsageError(f"{path}: arr_0 holds no pixels (shape {images.shape}); write the samples again")
    return images


def is_image_file(name: str) -> bool:
    """An image by extension, and not a hidden file or the temp file of an interrupted write."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".") and not _TEMP_NAME.search(name)


def scan_images(folder: str, skip_irregular: bool = False) -> ImageFolderScan:
    """
    The images under folder (data/datasets.py scan_image_files: an ImageFolder tree in the order training
    reads it, symbolic links followed, or a flat folder by name). Hidden files and folders (``._x.png``,
    ``.ipynb_checkpoints/``) are counted, temp files of interrupted writes are not images. A pipe, socket or
    device named like an image would block its reader: it is refused (a folder of samples must hold exactly
    what was written, so are images beside class folders), or with ``skip_irregular`` (a data set as it comes
    from a disk) left out and named in scan.summary(), which the caller prints (on one rank).
    """
    try:
        scan = scan_image_files(folder, is_image_file)
    except DataError as error:
        raise UsageError(str(error)) from error
    if scan.not_regular and not skip_irregular:
        path, kind = scan.not_regular[0][:-1].rsplit(" (", 1)  # ImageFolderScan's 'path (kind)'
        raise UsageError(f"{path} is a {kind}, not an image file: remove it from {folder}")
    if scan.beside_classes and not skip_irregular:
        raise UsageError(f"{folder} holds {scan.beside_classes} images beside its folders {', '.join(scan.classes)}: "
                         "pass a flat folder of images or a tree root/<class>/<image>; move the images or the "
                         "folders out")
    return scan


def list_image_paths(folder: str, skip_irregular: bool = False) -> list[str]:
    """The paths of :func:`scan_images` (what it left out is not reported: use scan_images for that)."""
    return scan_images(folder, skip_irregular).paths


def choose_subset(total: int, limit: int | None, seed: int | None) -> np.ndarray:
    """
    Indices of the images to use, in increasing order: all, the first `limit` (seed None), or `limit`
    drawn uniformly without replacement with np.random.default_rng(seed), i.e. across all classes.

    >>> choose_subset(10, 3, None).tolist(), len(choose_subset(10, 3, 0)), choose_subset(4, None, 0).tolist()
    ([0, 1, 2], 3, [0, 1, 2, 3])
    """
    if limit is None or limit >= total:
        return np.arange(total)
    if seed is None:
        return np.arange(limit)
    return np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))


def load_image_folder(folder: str, limit: int | None = None, seed: int | None = None) -> np.ndarray:
    """
    `limit` images under folder (list_image_paths order; the first ones, or a random subset when a seed is
    given, see choose_subset) as uint8 NxHxWx3; they must share one size. Only those images are decoded.

    >>> load_image_folder("samples/SiT-XL-2")[:10].shape  # doctest: +SKIP
    (10, 256, 256, 3)
    """
    scan = scan_images(folder)
    if scan.summary():
        print(f"warning: {scan.summary()}", file=sys.stderr, flush=True)
    paths, images = scan.paths, []
    for index in choose_subset(len(paths), limit, seed):
        path = paths[index]
        try:
            with Image.open(path) as image:
                images.append(np.array(to_rgb(image)))
        except IMAGE_ERRORS as error:
            reason = str(error).replace(f" {path!r}", "") or type(error).__name__
            raise UsageError(f"cannot decode image {path} ({reason}): replace or delete it") from error
    if len({im.shape for im in images}) > 1:
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted({im.shape[:2] for im in images}))
        raise UsageError(f"images under {folder} have different sizes ({sizes}): samples must share one size (write "
                         "them again with one --image-size); for a reference, make an ADM-cropped one with "
                         f"build_reference.py --data-path {folder} --image-size S --out ref.npz")
    return np.stack(images)


def load_images(path: str, limit: int | None = None, seed: int | None = None) -> np.ndarray:
    """uint8 NxHxWx3 images from an ADM npz or an image folder: all, the first `limit`, or `limit` chosen at
    random with `seed` (choose_subset)."""
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist: pass an ADM .npz or a folder of images")
    if not os.path.isfile(path):
        return load_image_folder(path, limit, seed)
    images = load_npz(path)
    return images[choose_subset(len(images), limit, seed)]
