"""
ImageNet-style class folders: the ADM center crop, the folder scan (links followed, hidden entries counted,
non-regular files named) and ImageFolderDataset (crop + random flip, pixels in [-1, 1]).
"""

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.errors import DataError, MissingDataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_ASPECT = 8  # center_crop_arr cuts a longer side to this many times the short one before resizing
# What PIL raises for a file it cannot decode: unidentified, truncated, malformed, or over its pixel limit.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """
    ADM center crop: halve with BOX while the short side is >= 2x the target (cheap and alias-free),
    BICUBIC-resize the short side to image_size, then crop the center square.

    >>> center_crop_arr(Image.new("RGB", (640, 480)), 256).size
    (256, 256)
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    width, height = pil_image.size
    keep = MAX_ASPECT * min(width, height)
    if max(width, height) > keep:
        # A strip (say 1 x 100000 pixels) would be resized to image_size x 100000 * image_size before the crop
        # and exhaust memory; cut its long side first. Photos (ImageNet's are under 1:8) are not touched.
        left, top = (width - keep) // 2 if width > keep else 0, (height - keep) // 2 if height > keep else 0
        pil_image = pil_image.crop((left, top, left + min(width, keep), top + min(height, keep)))
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def to_rgb(image: Image.Image) -> Image.Image:
    """
    8-bit RGB of any PIL image. 16-bit grayscale keeps its top 8 bits: PIL's own convert("RGB") clips it,
    turning almost every pixel white.

    >>> to_rgb(Image.fromarray(np.full((2, 2), 32768, np.uint16))).getpixel((0, 0))
    (128, 128, 128)
    """
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HxWxC (or HxW) array -> float CxHxW tensor in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1


def has_image_extension(name: str) -> bool:
    """Whether a file name ends in one of IMG_EXTENSIONS (any case)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def find_image_files(root: str) -> tuple[list[str], list[int], list[str]]:
    """
    Sorted image paths, integer labels and class names of an ImageFolder tree (root/<class>/**/img); what is
    left out is said by :func:`scan_image_folder`.

    >>> paths, labels, classes = find_image_files("/data/imagenet/train")  # doctest: +SKIP
    """
    scan = scan_image_folder(root)
    return scan.paths, scan.labels, scan.classes


@dataclass
class ImageFolderScan:
    """The images of an ImageFolder tree, and what the scan left out (reported in one line)."""

    root: str
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    hidden: int = 0  # entries named '.*' (macOS ._x.png, .DS_Store, .ipynb_checkpoints/, ...), not entered
    not_regular: list[str] = field(default_factory=list)  # 'path (kind)' of image-named pipes, sockets, ...
    beside_classes: int = 0  # image files at the top of a tree with class folders (scan_image_files only)

    def summary(self) -> str | None:
        """One line on what was left out, or None when nothing was."""
        parts = []
        if self.hidden:
            parts.append(f"ignored {_count(self.hidden, 'hidden entry', 'hidden entries')} (names starting "
                         "with '.')")
        if self.beside_classes:
            parts.append(f"left out {_count(self.beside_classes, 'image', 'images')} beside the class folders "
                         "(a tree's images are root/<class>/<image>; move them into a class folder)")
        if self.not_regular:
            named = ", ".join(self.not_regular[:MAX_NAMED])
            more = f" and {len(self.not_regular) - MAX_NAMED} more" if len(self.not_regular) > MAX_NAMED else ""
            parts.append(f"skipped {_count(len(self.not_regular), 'non-regular file', 'non-regular files')} "
                         f"named like images, never opened: {named}{more}")
        return f"image folder {self.root}: {', '.join(parts)}" if parts else None


MAX_NAMED = 5  # non-regular files named in the summary line; the rest are counted


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def scan_image_folder(root: str) -> ImageFolderScan:
    """
    The ImageFolder tree at root: class folders in sorted order, each folder's image files by name and then
    its sub-folders (os.walk's top-down order, so indices match earlier extractions).

    Only regular files (or symbolic links to one) are images: a pipe, socket or device named like one would
    block the reader forever, so it is never opened, only listed in :meth:`ImageFolderScan.summary`. Entries
    whose name starts with '.' are no data (macOS AppleDouble ``._x.png``, ``.ipynb_checkpoints/``) and are
    only counted. os.scandir's entries carry the file type, so a regular file costs no extra stat call.
    """
    if not os.path.isdir(root):
        state = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise MissingDataError(f"image folder {root!r} {state} (pass --data-path /path/to/train)")
    scan = ImageFolderScan(root)
    class_dirs, _ = _split_top(root, scan)
    scan.classes = [entry.name for entry in class_dirs]
    for label, entry in enumerate(class_dirs):
        _scan_class(entry.path, label, root, scan)
    if not scan.paths:
        raise MissingDataError(f"no images found under {root!r}; expected root/<class>/<image>")
    return scan


def scan_image_files(root: str, is_image: Callable[[str], bool] = has_image_extension) -> ImageFolderScan:
    """
    The images of a folder read as one set (a reference's source, a folder of samples): an ImageFolder tree
    in :func:`scan_image_folder`'s order (class folders found the same way, symbolic links followed, loops
    refused), or a flat folder of images sorted by name. Image files beside the class folders of a tree are
    left out and counted, as ImageFolderDataset leaves them out. is_image(name) says which names are images
    (a sample folder also skips the temp files of interrupted writes); hidden entries are only counted, and
    non-regular files named like images are listed in scan.not_regular, never opened. Labels are the class
    indices (0 for a flat folder, which has no classes).
    """
    if not os.path.isdir(root):
        state = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise MissingDataError(f"image folder {root!r} {state}: pass a folder of images")
    scan = ImageFolderScan(root)
    class_dirs, top_files = _split_top(root, scan)
    images = [entry for entry in top_files if is_image(entry.name)]
    if class_dirs:
        scan.beside_classes = len(images)
        scan.classes = [entry.name for entry in class_dirs]
        for label, entry in enumerate(class_dirs):
            _scan_class(entry.path, label, root, scan, is_image)
    else:
        for entry in images:
            _add_file(entry, 0, scan)
    if not scan.paths:
        raise MissingDataError(f"no images found under {root!r}: expected root/<class>/<image> or a flat folder "
                               "of images")
    return scan


def _split_top(root: str, scan: ImageFolderScan) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """The class folders at the top of root (links followed) and its other entries; hidden ones are counted."""
    class_dirs, others = [], []
    for entry in _sorted_entries(root, root):
        if entry.name.startswith("."):
            scan.hidden += 1
        else:
            (class_dirs if entry.is_dir() else others).append(entry)
    return class_dirs, others


def _add_file(entry: os.DirEntry, label: int, scan: ImageFolderScan) -> None:
    """An image-named entry: a regular file (or a link to one) is an image, anything else is only listed."""
    if entry.is_file():  # S_ISREG, after following a link
        scan.paths.append(entry.path)
        scan.labels.append(label)
    else:
        scan.not_regular.append(f"{entry.path} ({file_kind(entry.path)})")


def _scan_class(top: str, label: int, root: str, scan: ImageFolderScan,
                is_image: Callable[[str], bool] = has_image_extension) -> None:
    """Add the images under the class folder top (at any depth) to scan."""
    stack = [top]  # an explicit stack: no recursion limit on deep trees
    while stack:
        folder = stack.pop()
        subfolders = []
        for entry in _sorted_entries(folder, root):
            if entry.name.startswith("."):
                scan.hidden += 1
            elif entry.is_dir():  # follows symbolic links, as os.walk(followlinks=True) did
                if entry.is_symlink():
                    check_no_link_loop(entry.path, top)
                subfolders.append(entry.path)
            elif is_image(entry.name):
                _add_file(entry, label, scan)
        stack.extend(reversed(subfolders))


def _sorted_entries(folder: str, root: str) -> list[os.DirEntry]:
    """The entries of folder sorted by name; an unreadable folder raises DataError (os.walk skipped it)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        raise DataError(f"cannot list {folder} ({error.strerror or error}): fix its permissions or move it out of "
                        f"{root}") from error


def file_kind(path: str) -> str:
    """What a non-regular, non-folder path is, in words."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symbolic link"
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


def check_no_link_loop(dirpath: str, top: str) -> None:
    """DataError if the linked folder dirpath is one of the folders above it: following it would read the
    images under it again at every level (some 40 copies, until the OS refuses the path)."""
    real, above = os.path.realpath(dirpath), os.path.dirname(dirpath)
    while len(above) >= len(top):
        if os.path.realpath(above) == real:
            raise DataError(f"{dirpath} is a symbolic link back to {above}, so its images would be read over and "
                            "over: remove the link")
        above = os.path.dirname(above)


class ImageFolderDataset(Dataset):
    """ImageFolder tree -> (3xHxW float in [-1, 1], class index) with ADM crop and random h-flip."""

    def __init__(self, root: str, image_size: int = 256, random_flip: bool = True):
        self.root = root
        self.image_size = image_size
        self.random_flip = random_flip
        self.scan = scan_image_folder(root)
        self.paths, self.labels, self.classes = self.scan.paths, self.scan.labels, self.scan.classes

    @property
    def scan_summary(self) -> str | None:
        """One line on the hidden entries and non-regular files the scan left out (None if none)."""
        return self.scan.summary()

    def __len__(self) -> int:
        return len(self.paths)

    def load_array(self, index: int) -> np.ndarray:
        """The cropped uint8 HxWx3 image, before flip and normalisation."""
        try:
            with open(self.paths[index], "rb") as f:
                image = to_rgb(Image.open(f))
        except IMAGE_ERRORS as error:
            raise DataError(f"cannot read image {self.paths[index]} ({error}): replace or remove it") from error
        return np.array(center_crop_arr(image, self.image_size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = self.load_array(index)
        # torch RNG (not python's random) so DataLoader workers get distinct, seedable streams.
        if self.random_flip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr), self.labels[index]
