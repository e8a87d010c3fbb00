"""
Datasets for the SiT example, all returning (image_or_latent tensor, int label), one module a kind:

- data.image_folder.ImageFolderDataset: ImageNet-style class folders, ADM center crop + random flip, pixels in
  [-1, 1].
- data.latents.LatentDataset: VAE posteriors written by extract_latents.py, sampled and scaled (meta.json's
  factors) at every access.
- data.sinusoids.SinusoidDataset: procedural sinusoid images with a known distribution (no download, no network).
- data.fashion_mnist.FashionMNISTDataset: the IDX files of the Debian package `dataset-fashion-mnist`.

build_dataset(name, ...) picks one and says what the model needs (channels, size, classes).
Data a user can fix (a missing folder, a corrupt image, a truncated latent shard) raises :class:`DataError`
naming the file and the fix. Only PIL + numpy + torch: nothing here downloads anything. The names of the
modules above are importable from here too, as before they had modules of their own.
"""


from torch.utils.data import Dataset

from data.errors import DataError, MissingDataError
from data.fashion_mnist import FASHION_MNIST_ROOT, FashionMNISTDataset, read_idx
from data.image_folder import (
    IMAGE_ERRORS,
    IMG_EXTENSIONS,
    MAX_ASPECT,
    ImageFolderDataset,
    ImageFolderScan,
    center_crop_arr,
    check_no_link_loop,
    file_kind,
    find_image_files,
    has_image_extension,
    scan_image_files,
    scan_image_folder,
    to_rgb,
    to_tensor,
)
from data.latents import (
    LATENT_META_KEYS,
    LATENT_SCALE,
    LatentDataset,
    check_latent_chunk,
    check_regular_file,
    latent_chunk_path,
    read_latent_labels,
    read_latent_meta,
)
from data.sinusoids import SinusoidDataset, make_sinusoids, render_sinusoids, sample_sinusoid_params

__all__ = [
    "DataError", "MissingDataError", "FASHION_MNIST_ROOT", "FashionMNISTDataset", "read_idx", "IMAGE_ERRORS",
    "IMG_EXTENSIONS", "MAX_ASPECT", "ImageFolderDataset", "ImageFolderScan", "center_crop_arr", "check_no_link_loop",
    "file_kind", "find_image_files", "has_image_extension", "scan_image_files", "scan_image_folder", "to_rgb",
    "to_tensor", "LATENT_META_KEYS", "LATENT_SCALE", "LatentDataset", "check_latent_chunk", "check_regular_file",
    "latent_chunk_path", "read_latent_labels", "read_latent_meta", "SinusoidDataset", "make_sinusoids",
    "render_sinusoids", "sample_sinusoid_params", "build_dataset",
]


def build_dataset(
    name: str,
    data_path: str | None = None,
    image_size: int | None = None,
    num_samples: int = 50_000,
    seed: int = 0,
    components: int = 1,
    split: str = "train",
    random_flip: bool | None = None,
    root: str | None = None,
    path: str | None = None,
) -> tuple[Dataset, int, int, int]:
    """
    Build a dataset by name and return (dataset, in_channels, image_size, num_classes), where
    image_size is the spatial size the model sees (the latent size for "latents").

    name: "sinusoid" | "fashion-mnist" | "imagenet" (pixels, ImageFolder at data_path) | "latents"
    (extract_latents.py output at data_path). root= and path= are accepted as aliases of data_path.

    >>> dataset, channels, size, classes = build_dataset("sinusoid", num_samples=100)
    >>> channels, size, classes
    (3, 32, 1)
    """
    data_path = data_path or root or path
    if name == "sinusoid":
        size = image_size or 32
        return SinusoidDataset(num_samples, size, seed=seed, components=components), 3, size, 1
    if name == "fashion-mnist":
        size = image_size or 32
        dataset = FashionMNISTDataset(
            data_path or FASHION_MNIST_ROOT, split=split, image_size=size, random_flip=bool(random_flip)
        )
        return dataset, 1, size, 10
    if data_path is None:
        raise DataError(f"dataset {name!r} needs data_path (--data-path)")
    if name == "imagenet":
        size = image_size or 256
        dataset = ImageFolderDataset(
            data_path, size, random_flip=True if random_flip is None else random_flip
        )
        return dataset, 3, size, len(dataset.classes)
    if name == "latents":
        dataset = LatentDataset(data_path)
        channels, height, _ = dataset.latent_shape
        if image_size not in (None, height, dataset.meta["image_size"]):
            raise DataError(
                f"latents in {data_path} are {dataset.meta['image_size']}px images "
                f"({height}x{height} latents), not image_size={image_size}"
            )
        return dataset, channels, height, dataset.num_classes
    raise DataError(f"unknown dataset {name!r}: use sinusoid, fashion-mnist, imagenet or latents")
