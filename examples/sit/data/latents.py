"""
VAE posteriors written by extract_latents.py: meta.json, labels, shards, and LatentDataset (a posterior
sample, scaled by meta.json's factors, at every access).
"""

import json
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from data.errors import DataError, MissingDataError
from data.image_folder import ImageFolderDataset, to_tensor

LATENT_SCALE = 0.18215  # SD VAE scaling factor used by DiT/SiT; the one copy every script imports


def latent_chunk_path(path: str, chunk: int) -> str:
    """File holding the posterior moments of one chunk (shared with extract_latents.py)."""
    return os.path.join(path, f"chunk_{chunk:06d}.npy")


LATENT_META_KEYS = ("num_images", "chunk_size", "latent_shape", "num_classes", "image_size")


def check_regular_file(path: str, fix: str) -> None:
    """DataError if path exists but is a pipe, socket or device: reading one would wait forever."""
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise DataError(f"{path} is not a regular file (a pipe or device?): {fix}")


def read_latent_meta(path: str) -> dict:
    """meta.json of an extract_latents.py folder, checked for the keys LatentDataset needs."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise MissingDataError(f"{meta_path} missing: run extract_latents.py --out {path} first")
    check_regular_file(meta_path, f"rerun extract_latents.py --out {path}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{meta_path} is not valid JSON ({error}): rerun extract_latents.py --out {path}") from error
    missing = [key for key in LATENT_META_KEYS if key not in meta] if isinstance(meta, dict) else LATENT_META_KEYS
    if missing:
        raise DataError(f"{meta_path} lacks {', '.join(missing)}: rerun extract_latents.py --out {path}")
    shape = meta["latent_shape"]
    bad = [key for key in LATENT_META_KEYS if key != "latent_shape" and not _positive_int(meta[key])]
    if not (isinstance(shape, list) and len(shape) == 3 and all(map(_positive_int, shape))):
        bad.append("latent_shape")
    if bad:
        raise DataError(f"{meta_path} has invalid {', '.join(f'{key}={meta[key]!r}' for key in bad)} (positive "
                        f"integers expected, latent_shape as [C, h, w]): rerun extract_latents.py --out {path}")
    return meta


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_latent_labels(path: str, num_images: int, num_classes: int) -> np.ndarray:
    """labels.npy of an extract_latents.py folder: one integer label in [0, num_classes) per image."""
    labels_path = os.path.join(path, "labels.npy")
    check_regular_file(labels_path, f"rerun extract_latents.py --out {path}")
    try:
        labels = np.load(labels_path)
    except FileNotFoundError as error:
        raise MissingDataError(f"{labels_path} missing: rerun extract_latents.py --out {path}") from error
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{labels_path} is unreadable ({error}): rerun extract_latents.py --out {path}") from error
    if labels.shape != (num_images,):
        raise DataError(f"{labels_path} holds {labels.shape} labels, meta.json says {num_images} images: "
                        f"rerun extract_latents.py --out {path}")
    # A label outside the class table would only fail at its first training step, deep in the model.
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and not 0 <= labels.min() <= labels.max()
                                                        < num_classes):
        raise DataError(f"{labels_path} holds {labels.dtype} labels outside 0..{num_classes - 1} (meta.json's "
                        f"num_classes={num_classes}): rerun extract_latents.py --out {path}")
    return labels


def check_latent_chunk(chunk_path: str, shape: tuple[int, ...]) -> None:
    """Raise DataError naming the shard if it is truncated, not a .npy file, or of the wrong shape/dtype."""
    fix = f"delete {chunk_path} and rerun extract_latents.py to rewrite it"
    check_regular_file(chunk_path, fix)
    try:
        array = np.load(chunk_path, mmap_mode="r")  # reads the header; a short file fails to map
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"latent shard {chunk_path} is truncated or not a .npy file ({error}): {fix}") from error
    if tuple(array.shape) != shape or array.dtype not in (np.float16, np.float32):
        raise DataError(f"latent shard {chunk_path} holds {array.dtype} {tuple(array.shape)}, expected "
                        f"float16/32 {shape}: {fix}")


class LatentDataset(Dataset):
    """
    Latents written by extract_latents.py -> ((posterior sample - shift) * scale, class index), with the
    scaling_factor / shift_factor of meta.json (the VAE's config; see modeling/latent_scaling.py).

    Each chunk file holds float16/32 moments of shape (n, 2, 2, C, h, w): [no flip, flip] x [mean, std].
    Every access picks a flip at random and draws z = mean + std * eps, as the reference does with
    on-the-fly encoding (fast-DiT style pre-extraction without freezing one sample per image).

    With the images attached (``images``, set by data/latent_images.attach_images after its checks), an item is
    (latent, class index, image): the image the latent was encoded from, center-cropped at meta.json's
    image_size as a float 3xHxW tensor in [-1, 1], flipped horizontally exactly when the latent is the flipped
    one. The draws from the generator are the same either way.

    >>> ds = LatentDataset("latents/imagenet256")  # doctest: +SKIP
    >>> z, y = ds.__getitem__(0, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    """

    def __init__(self, path: str, scale: float | None = None, shift: float | None = None):
        self.path = path
        self.meta = read_latent_meta(path)
        self.chunk_size = self.meta["chunk_size"]
        self.num_chunks = math.ceil(self.meta["num_images"] / self.chunk_size)
        missing = [c for c in range(self.num_chunks) if not os.path.exists(latent_chunk_path(path, c))]
        if missing:
            raise MissingDataError(
                f"{len(missing)} of {self.num_chunks} latent chunks missing in {path} "
                f"(first: {missing[0]}); rerun extract_latents.py to finish them"
            )
        self.labels = read_latent_labels(path, self.meta["num_images"], self.meta["num_classes"])
        # The diffusers convention, with the factors meta.json recorded: (latent - shift_factor) * scaling_factor.
        # A meta.json from before the record holds SD-VAE latents (0.18215, no shift).
        self.scale = self.meta.get("scaling_factor", LATENT_SCALE) if scale is None else scale
        self.shift = self.meta.get("shift_factor") if shift is None else shift
        self.latent_shape = tuple(self.meta["latent_shape"])
        self.num_classes = self.meta["num_classes"]
        for chunk in range(self.num_chunks):  # headers only: cheap, and a bad shard fails now, not mid-run
            rows = min(self.chunk_size, self.meta["num_images"] - chunk * self.chunk_size)
            check_latent_chunk(latent_chunk_path(path, chunk), (rows, 2, 2, *self.latent_shape))
        self._chunks: dict[int, np.ndarray] = {}  # memory maps, opened lazily (per worker process)
        self.images: ImageFolderDataset | None = None  # the source images, index for index (attach_images)

    def __len__(self) -> int:
        return len(self.labels)

    def moments(self, index: int) -> np.ndarray:
        """(2, 2, C, h, w) array: [no flip, flip] x [mean, std] of one image."""
        chunk = index // self.chunk_size
        if chunk not in self._chunks:
            self._chunks[chunk] = np.load(latent_chunk_path(self.path, chunk), mmap_mode="r")
        return self._chunks[chunk][index % self.chunk_size]

    def __getitem__(self, index: int, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        moments = torch.from_numpy(np.array(self.moments(index), dtype=np.float32))
        flip = int(torch.randint(2, (), generator=generator))
        mean, std = moments[flip]
        noise = torch.randn(mean.shape, generator=generator)
        latent = mean + std * noise
        if self.shift is not None:
            latent = latent - self.shift
        if self.images is None:
            return latent * self.scale, int(self.labels[index])
        image = self.images.load_array(index)
        if flip:  # as extract_latents.encode_moments flipped it: images.flip(-1), the width axis
            image = image[:, ::-1]
        return latent * self.scale, int(self.labels[index]), to_tensor(image)
