"""An ADM reference batch (.npz: ``arr_0`` images and ``mu`` / ``sigma`` / ``mu_s`` / ``sigma_s``) opened for the
FID during and after training: checked without reading its images (they can be gigabytes), then read a shard
at a time (memory-mapped where the .npz is stored uncompressed, as np.savez writes it).

What evaluate.py takes from the same file, so do these metrics: FID and sFID against the stored statistics
(never statistics of ``arr_0``), precision and recall against the pool_3 features of every ``arr_0`` image.
:func:`reference_warning` and :func:`sample_count_warning` say when a set is too small for sound numbers.

    >>> ref = ReferenceBatch.open("VIRTUAL_imagenet256_labeled.npz", FEATURE_DIMS, 256)  # doctest: +SKIP
    >>> ref.num_images, ref.stats["pool"].mu.shape  # doctest: +SKIP
    (10000, (2048,))
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from runtime.cli import UsageError

from evaluation.statistics import NPZ_KEYS, GaussianStats, read_stats

__all__ = ["ReferenceBatch", "SOUND_COUNT", "reference_warning", "sample_count_warning", "npz_array_header"]

SOUND_COUNT = 10_000  # images: a 2048-d covariance wants N >> 2048; ADM's ImageNet batch holds 10,000
POOL_DIM = 2048


def reference_warning(num_images: int, what: str = "the reference") -> str | None:
    """A line saying that a reference of num_images images gives unsound FID statistics (None when it is fine).

    >>> reference_warning(12).split(":")[0]
    'the reference holds 12 images'
    """
    if num_images >= SOUND_COUNT:
        return None
    return (f"{what} holds {num_images:,} images: FID compares a {POOL_DIM}-dimensional mean and {POOL_DIM}x{POOL_DIM} "
            f"covariance, which {num_images:,} images estimate with rank at most {num_images - 1:,}"
            + (" (a singular covariance)" if num_images <= POOL_DIM else "")
            + f"; FIDs against it are dominated by that error and compare only with FIDs against the same file. "
              f"Use {SOUND_COUNT:,} or more images (as ADM's ImageNet reference), or all the data has")


def sample_count_warning(num_samples: int, flag: str = "--fid-samples") -> str | None:
    """A line saying that FID-N of so few samples is far above FID-50k and rank-deficient (None when N is fine).

    >>> sample_count_warning(10_000) is None
    True
    """
    if num_samples >= SOUND_COUNT:
        return None
    singular = f"fewer than the {POOL_DIM} features, so their covariance is singular and " if num_samples <= POOL_DIM \
        else ""
    return (f"{flag} {num_samples:,}: {singular}FID is biased upwards at small N (FID-{num_samples:,} > FID-10k > "
            f"FID-50k of the same model); compare only FIDs of one N, and use {SOUND_COUNT:,} or more samples for "
            "numbers that mean something")


def _member_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) of an .npy member, from its header alone."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    return shape, dtype, fortran


def npz_array_header(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of one array of an .npz without reading it; None when the .npz has no such key.
    Raises zipfile.BadZipFile / ValueError / OSError for a file that is no .npz.

    >>> np.savez("/tmp/x.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8)); npz_array_header("/tmp/x.npz")[0]
    (3, 8, 8, 3)
    """
    with zipfile.ZipFile(path) as archive:
        if f"{key}.npy" not in archive.namelist():
            return None
        shape, dtype, _ = _member_header(archive, f"{key}.npy")
    return shape, dtype


def _mapped_array(path: str, key: str) -> np.ndarray:
    """The array, memory-mapped when its member is stored uncompressed (np.savez), else read whole."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        shape, dtype, fortran = _member_header(archive, f"{key}.npy")
        stored = info.compress_type == zipfile.ZIP_STORED
    if not stored:
        with np.load(path) as data:
            return data[key]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths come last
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@dataclass(frozen=True)
class ReferenceBatch:
    """A checked reference batch: its path, image count and size, stored statistics and a fingerprint of its
    content (CRC-32 and size of every member: a file moved elsewhere keeps it, a rebuilt one does not)."""

    path: str
    num_images: int
    image_size: int
    stats: dict[str, GaussianStats]
    fingerprint: str

    @classmethod
    def open(cls, path: str, dims: dict[str, int], image_size: int, flag: str = "--fid-ref") -> ReferenceBatch:
        """Check path as a reference for image_size x image_size samples and features of dims; cli.UsageError
        naming flag and the fix when it is missing, no .npz, without statistics, or of another resolution."""
        fix = "pass an ADM reference batch (.npz with arr_0 and mu, sigma, mu_s, sigma_s), e.g. " \
              "VIRTUAL_imagenet256_labeled.npz or build_reference.py's output"
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}: {fix}")
        try:
            header = npz_array_header(path)
            with zipfile.ZipFile(path) as archive:
                members = sorted((i.filename, i.CRC, i.file_size) for i in archive.infolist())
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as error:
            raise UsageError(f"{flag} {path} is not a readable .npz ({type(error).__name__}): {fix}") from error
        if header is None:
            raise UsageError(f"{flag} {path} holds no arr_0 images (precision and recall need them): {fix}")
        shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 1:
            raise UsageError(f"{flag} {path}: arr_0 is {dtype} {shape}, not uint8 N x H x W x 3 images: {fix}")
        if shape[1:3] != (image_size, image_size):
            raise UsageError(f"{flag} {path} holds {shape[1]}x{shape[2]} images, and this run's samples are "
                             f"{image_size}x{image_size}: metrics need one resolution; build a reference of this "
                             f"size (build_reference.py --image-size {image_size})")
        stats = {}
        for kind in NPZ_KEYS:
            try:
                stats[kind] = read_stats(path, kind, dims[kind])
            except UsageError as error:
                raise UsageError(f"{flag} {str(error).replace('pass --stats images or another reference', fix)}") \
                    from error
            if stats[kind] is None:
                raise UsageError(f"{flag} {path} holds no statistics ({', '.join(NPZ_KEYS[kind])}): FID is computed "
                                 "against a reference's stored statistics, as ADM's evaluator does; build one with "
                                 "build_reference.py, which writes them")
        fingerprint = hashlib.sha256(repr(members).encode()).hexdigest()
        return cls(os.path.abspath(path), shape[0], image_size, stats, fingerprint)

    def images(self) -> np.ndarray:
        """arr_0, uint8 (N, S, S, 3): memory-mapped (read as rows are indexed) when stored uncompressed, else
        read whole; hold it only while reading."""
        return _mapped_array(self.path, "arr_0")
