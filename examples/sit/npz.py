"""
Sample batches in the ADM evaluator format: an .npz whose key arr_0 holds uint8 N x H x W x 3 images
(what `VIRTUAL_imagenet256_labeled.npz` and guided-diffusion's evaluator.py read), plus reading a
folder of images into the same array.
"""

import os

import numpy as np
import torch
from data import IMG_EXTENSIONS
from PIL import Image


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
    return np.ascontiguousarray(images)


def save_npz(images: np.ndarray | torch.Tensor, path: str) -> str:
    """
    Write images as an ADM-format npz (key arr_0, uint8 NxHxWx3), atomically (temp file + rename), so an
    interrupted run never leaves a truncated file that looks complete. Returns the path.

    >>> save_npz(np.zeros((4, 32, 32, 3), np.uint8), "/tmp/samples.npz")
    '/tmp/samples.npz'
    """
    images = to_uint8_nhwc(images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    with open(tmp_path, "wb") as f:  # a file object stops np.savez from appending its own ".npz"
        np.savez(f, arr_0=images)
    os.replace(tmp_path, path)
    return path


def load_npz(path: str) -> np.ndarray:
    """
    The uint8 NxHxWx3 array of an ADM-format npz (key arr_0).

    >>> load_npz(save_npz(np.zeros((4, 32, 32, 3), np.uint8), "/tmp/samples.npz")).shape
    (4, 32, 32, 3)
    """
    with np.load(path) as data:
        if "arr_0" not in data:
            raise KeyError(f"{path} has keys {list(data.keys())}; the ADM format stores images in arr_0")
        return to_uint8_nhwc(data["arr_0"])


def load_image_folder(folder: str, limit: int | None = None) -> np.ndarray:
    """
    All images under folder (recursively, sorted by path) as uint8 NxHxWx3; they must share one size.

    >>> load_image_folder("samples/SiT-XL-2")[:10].shape  # doctest: +SKIP
    (10, 256, 256, 3)
    """
    paths = sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMG_EXTENSIONS)
    )
    if not paths:
        raise FileNotFoundError(f"no images found under {folder!r}")
    paths = paths[:limit]
    images = [np.array(Image.open(p).convert("RGB")) for p in paths]
    if len({im.shape for im in images}) > 1:
        raise ValueError(
            f"images under {folder!r} have different sizes: {sorted({im.shape for im in images})}"
        )
    return np.stack(images)


def load_images(path: str, limit: int | None = None) -> np.ndarray:
    """uint8 NxHxWx3 images from an ADM npz or an image folder."""
    images = load_npz(path) if os.path.isfile(path) else load_image_folder(path, limit)
    return images[:limit]
