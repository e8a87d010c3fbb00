"""Image grids on disk: the formats the scripts write, and one atomically written grid."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from runtime.atomic import atomic_write
from runtime.cli import UsageError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


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
