"""The images behind an extract_latents.py folder, for losses that need the pixels of each training latent
(REPA's frozen image encoder): the same center crop, flipped exactly when the latent drawn is the flipped one.

extract_latents.py records the ImageFolder's image paths (relative to its --data-path, in dataset index
order) in image_files.json and the folder itself as meta.json's image_root. :func:`attach_images` checks an
image folder against that record (count, paths, labels) and gives it to the LatentDataset, whose items then
carry the image as a third element (see data/latents.py).

    >>> dataset = LatentDataset("latents/imagenet256")  # doctest: +SKIP
    >>> notes = attach_images(dataset, None)  # the image folder meta.json records  # doctest: +SKIP
    >>> z, y, image = dataset.__getitem__(0, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os

from data.errors import DataError, MissingDataError
from data.image_folder import ImageFolderDataset
from data.latents import LatentDataset, check_regular_file

__all__ = ["IMAGE_FILES", "image_files", "read_image_files", "first_difference", "attach_images"]

IMAGE_FILES = "image_files.json"  # the image paths of an extraction, relative to its image folder
FLAG = "--repa-image-path"  # the flag that names another image folder (runtime/train_args.py)


def image_files(dataset: ImageFolderDataset) -> list[str]:
    """The image paths of an ImageFolder, relative to its root and with '/' separators, in index order."""
    return [os.path.relpath(path, dataset.root).replace(os.sep, "/") for path in dataset.paths]


def first_difference(a: list, b: list) -> int:
    """The first index where the lists differ (the shorter one's length where one extends the other).

    >>> first_difference(["a", "b", "c"], ["a", "x"]), first_difference(["a"], ["a", "b"])
    (1, 1)
    """
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def read_image_files(path: str) -> list[str] | None:
    """The image_files.json of the extract_latents.py folder at path; None for a folder extracted before the
    file was recorded."""
    files_path = os.path.join(path, IMAGE_FILES)
    if not os.path.lexists(files_path):
        return None
    check_regular_file(files_path, "rerun extract_latents.py with a new --out")
    try:
        with open(files_path) as f:
            files = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{files_path} is unreadable ({error}): rerun extract_latents.py with a new --out, or "
                        "delete it to match the images by count and labels only") from error
    if not (isinstance(files, list) and all(isinstance(name, str) for name in files)):
        raise DataError(f"{files_path} is not a list of image paths: rerun extract_latents.py with a new --out, or "
                        "delete it to match the images by count and labels only")
    return files


def attach_images(dataset: LatentDataset, image_path: str | None) -> list[str]:
    """Check the ImageFolder at image_path (default: the image_root meta.json records) against the latents of
    dataset and attach it (dataset.images): its items become (latent, label, image). Returns notes for the
    log: what the folder scan left out, and that only count and labels could be checked for an extraction
    without image_files.json. Every mismatch raises DataError in one line naming the fix."""
    meta, where = dataset.meta, os.path.join(dataset.path, "meta.json")
    root = image_path if image_path is not None else meta.get("image_root")
    if root is None:
        raise DataError(f"{where} records no image_root (extracted before it was recorded): pass {FLAG} "
                        "/path/to/train, the image folder the latents were extracted from")
    source = f"{FLAG} {root}" if image_path is not None else f"the image folder {root} that {where} records"
    fix = (f"pass {FLAG} with the image folder the latents in {dataset.path} were extracted from" +
           ("" if image_path is not None else " (it moved?)"))
    if "image_size" not in meta:
        raise DataError(f"{where} lacks image_size, the crop the latents were encoded at: rerun extract_latents.py "
                        f"--out {dataset.path}")
    if not os.path.isdir(root):
        state = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise MissingDataError(f"{source} {state}: {fix}")
    images = ImageFolderDataset(root, meta["image_size"], random_flip=False)
    recorded = read_image_files(dataset.path)
    if recorded is not None:
        found = image_files(images)
        if found != recorded:
            i = first_difference(recorded, found)
            raise DataError(f"{source} differs from {os.path.join(dataset.path, IMAGE_FILES)} at image {i}: the "
                            f"latents were encoded from {_entry(recorded, i)}, the folder has {_entry(found, i)}: "
                            f"{fix}")
    if len(images) != len(dataset):
        raise DataError(f"{source} holds {len(images)} images, the latents in {dataset.path} {len(dataset)}: {fix}")
    if "classes" in meta and images.classes != meta["classes"]:
        extra = sorted(set(images.classes) ^ set(meta["classes"]))
        raise DataError(f"{source} has other class folders than the latents in {dataset.path} ("
                        f"{', '.join(extra[:3]) if extra else 'another order'}"
                        f"{' ...' if len(extra) > 3 else ''}): {fix}")
    labels = [int(label) for label in dataset.labels]
    if images.labels != labels:
        i = first_difference(images.labels, labels)  # the counts are equal
        raise DataError(f"{source} gives image {i} ({images.paths[i]}) label {images.labels[i]}, the latents in "
                        f"{dataset.path} label {labels[i]}: {fix}")
    notes = [f"{FLAG}: {images.scan_summary}"] if images.scan_summary else []
    if recorded is None:
        notes.append(f"{dataset.path} holds no {IMAGE_FILES} (extracted before it was recorded): the images of "
                     f"{root} were matched to its latents by count and per-index labels only, so a renamed, "
                     "replaced or reordered image within a class goes unnoticed")
    dataset.images = images
    return notes


def _entry(files: list[str], i: int) -> str:
    """files[i] quoted, or where the list ends."""
    return repr(files[i]) if i < len(files) else f"nothing (its {len(files)} images end before)"
