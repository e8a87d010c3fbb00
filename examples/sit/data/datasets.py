"""
Datasets for the SiT example, all returning (image_or_latent tensor, int label):

- ImageFolderDataset: ImageNet-style class folders, ADM center crop + random flip, pixels in [-1, 1].
- LatentDataset: VAE posteriors written by extract_latents.py, sampled and scaled (meta.json's factors) at every
  access.
- SinusoidDataset: procedural sinusoid images with a known distribution (no download, no network).
- FashionMNISTDataset: the IDX files of the Debian package `dataset-fashion-mnist`.

build_dataset(name, ...) picks one and says what the model needs (channels, size, classes).
Data a user can fix (a missing folder, a corrupt image, a truncated latent shard) raises :class:`DataError`
naming the file and the fix. Only PIL + numpy + torch: nothing here downloads anything.
"""

import gzip
import json
import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
LATENT_SCALE = 0.18215  # SD VAE scaling factor used by DiT/SiT; the one copy every script imports
MAX_ASPECT = 8  # center_crop_arr cuts a longer side to this many times the short one before resizing
# What PIL raises for a file it cannot decode: unidentified, truncated, malformed, or over its pixel limit.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """Bad or missing data the user can fix; the message names the file and the fix."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that does not exist (or holds nothing usable)."""


#################################################################################
#                          ImageNet (ImageFolder layout)                        #
#################################################################################


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


#################################################################################
#                      Pre-extracted VAE latents                                #
#################################################################################


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

    def __len__(self) -> int:
        return len(self.labels)

    def moments(self, index: int) -> np.ndarray:
        """(2, 2, C, h, w) array: [no flip, flip] x [mean, std] of one image."""
        chunk = index // self.chunk_size
        if chunk not in self._chunks:
            self._chunks[chunk] = np.load(latent_chunk_path(self.path, chunk), mmap_mode="r")
        return self._chunks[chunk][index % self.chunk_size]

    def __getitem__(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        moments = torch.from_numpy(np.array(self.moments(index), dtype=np.float32))
        flip = int(torch.randint(2, (), generator=generator))
        mean, std = moments[flip]
        noise = torch.randn(mean.shape, generator=generator)
        latent = mean + std * noise
        if self.shift is not None:
            latent = latent - self.shift
        return latent * self.scale, int(self.labels[index])


#################################################################################
#                      Procedural sinusoids (seed Fig. 1)                       #
#################################################################################


def sample_sinusoid_params(
    n: int, image_size: int = 32, generator: torch.Generator | None = None, components: int = 1
) -> dict[str, torch.Tensor]:
    """
    Draw the parameters of n images with K=components waves each: integer frequency f in 1..S/4
    (cycles per image, below Nyquist), direction theta ~ U[0, pi), phase phi ~ U[0, 2 pi), colours
    c0, c1 ~ U[0, 1]^3. Shapes: f, theta, phi (n, K); c0, c1 (n, K, 3).

    >>> sample_sinusoid_params(5, 32)["c0"].shape
    torch.Size([5, 1, 3])
    """
    max_freq = max(1, image_size // 4)
    shape = (n, components)
    # One draw per field in a fixed order, so a given generator state always yields the same images.
    f = torch.randint(1, max_freq + 1, shape, generator=generator).double()
    theta = torch.rand(shape, generator=generator, dtype=torch.float64) * math.pi
    phi = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * math.pi
    c0 = torch.rand(shape + (3,), generator=generator, dtype=torch.float64)
    c1 = torch.rand(shape + (3,), generator=generator, dtype=torch.float64)
    return dict(f=f, theta=theta, phi=phi, c0=c0, c1=c1)


def render_sinusoids(params: dict[str, torch.Tensor], image_size: int = 32) -> torch.Tensor:
    """
    Images in [0, 1], shape (n, 3, S, S): x(u, v) = c0 + (c1 - c0) * (1 + sin(2 pi f (u cos theta +
    v sin theta) / S + phi)) / 2 with u the column and v the row index; K components are averaged.

    >>> render_sinusoids(sample_sinusoid_params(2, 16), 16).shape
    torch.Size([2, 3, 16, 16])
    """
    coords = torch.arange(image_size, dtype=torch.float64)
    v, u = coords[:, None], coords[None, :]
    f, theta, phi = (params[k][..., None, None] for k in ("f", "theta", "phi"))  # (n, K, 1, 1)
    wave = 0.5 * (
        1 + torch.sin(2 * math.pi * f * (u * torch.cos(theta) + v * torch.sin(theta)) / image_size + phi)
    )
    c0, c1 = params["c0"][..., None, None], params["c1"][..., None, None]  # (n, K, 3, 1, 1)
    images = c0 + (c1 - c0) * wave[:, :, None]
    return images.mean(dim=1).float()


def make_sinusoids(
    n: int, image_size: int = 32, generator: torch.Generator | None = None, components: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    n sinusoid images in [-1, 1] (n, 3, S, S) and their parameters (see sample_sinusoid_params).

    >>> images, params = make_sinusoids(8, 32, torch.Generator().manual_seed(0))
    >>> images.shape, bool(images.min() >= -1), bool(images.max() <= 1)
    (torch.Size([8, 3, 32, 32]), True, True)
    """
    params = sample_sinusoid_params(n, image_size, generator, components)
    return render_sinusoids(params, image_size) * 2 - 1, params


def _index_generator(seed: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, index) alone: item i never depends on the dataset length."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class SinusoidDataset(Dataset):
    """Procedural sinusoid images (3xSxS in [-1, 1], label 0); item i is a pure function of (seed, i)."""

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, components: int = 1):
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.components = components

    def __len__(self) -> int:
        return self.num_samples

    def params(self, index: int) -> dict[str, torch.Tensor]:
        """The true parameters of item index (each with a leading batch dim of 1)."""
        return sample_sinusoid_params(1, self.image_size, _index_generator(self.seed, index), self.components)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return render_sinusoids(self.params(index), self.image_size)[0] * 2 - 1, 0


#################################################################################
#                                Fashion-MNIST                                  #
#################################################################################


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = self.images[index]
        if self.random_flip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr), int(self.labels[index])


#################################################################################
#                                 Factory                                       #
#################################################################################


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
