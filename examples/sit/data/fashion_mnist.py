"""Fashion-MNIST from the IDX files of the Debian package `dataset-fashion-mnist`."""

import gzip
import math
import os
import struct

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.errors import DataError, MissingDataError
from data.image_folder import to_tensor

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    """
    Read an IDX file (optionally .gz): big-endian magic (0, 0, dtype code, ndim), ndim uint32 sizes,
    then the data. Used by MNIST-family datasets.

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (10000,)
    """
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in dtypes:
        raise DataError(f"{path} is not an IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape).astype(dtypes[dtype_code][1:])


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST from IDX files -> (1xSxS float in [-1, 1], class index); 28 -> 32 by zero padding."""

    FILES = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }

    def __init__(
        self,
        root: str = FASHION_MNIST_ROOT,
        split: str = "train",
        image_size: int = 32,
        random_flip: bool = False,
    ):
        if split not in self.FILES:
            raise ValueError(f"split must be one of {list(self.FILES)}, got {split!r}")
        image_file, label_file = (os.path.join(root, name) for name in self.FILES[split])
        if not os.path.exists(image_file):
            raise MissingDataError(
                f"{image_file} missing: `apt-get install dataset-fashion-mnist` "
                f"or pass the folder holding the IDX .gz files"
            )
        images, self.labels = read_idx(image_file), read_idx(label_file).astype(np.int64)
        if len(images) != len(self.labels):
            raise DataError(f"{len(images)} images but {len(self.labels)} labels in {root}")
        pad = image_size - images.shape[1]
        if pad >= 0 and pad % 2 == 0:
            # Padding with the black background keeps the pixels exact (no resampling blur).
            images = np.pad(images, ((0, 0), (pad // 2, pad // 2), (pad // 2, pad // 2)))
        else:
            images = np.stack(
                [
                    np.array(Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC))
                    for im in images
                ]
            )
        self.images = images
        self.image_size = image_size
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image as one (N, 1, S, S) float tensor in [-1, 1], unflipped, and the (N,) int64 labels.

        >>> images, labels = FashionMNISTDataset(split="test", image_size=16).tensors()  # doctest: +SKIP
        """
        images = torch.from_numpy(np.ascontiguousarray(self.images)).float().div(127.5).sub(1).unsqueeze(1)
        return images, torch.from_numpy(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = self.images[index]
        if self.random_flip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr), int(self.labels[index])
