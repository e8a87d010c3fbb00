"""Writing an .npz whose arrays do not fit in memory: each array goes into the zip in chunks.

An .npz is a zip of .npy files, stored uncompressed (what ``np.savez`` writes and ``np.load`` and ADM's
evaluator read). 50,000 samples at 256 px are 9.8 GB, a reference batch of the whole ImageNet train set
250 GB: ``np.savez`` needs the whole array in memory, and stacking it from parts twice that.
:func:`npz_writer` writes the .npy header of an array of known shape, then its rows chunk by chunk as they
are read, so memory holds one chunk. The file goes through runtime/atomic.py's ``atomic_write``: complete
under its name, or absent.

Example:
    >>> import numpy as np
    >>> with npz_writer("/tmp/stream.npz") as npz:
    ...     with npz.stream("arr_0", (4, 2), np.uint8) as arr:
    ...         arr.write(np.zeros((3, 2), np.uint8))
    ...         arr.write(np.ones((1, 2), np.uint8))
    ...     npz.add("mu", np.arange(2.0))
    >>> np.load("/tmp/stream.npz")["arr_0"][:, 0].tolist()
    [0, 0, 0, 1]
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from typing import IO

import numpy as np
from runtime.atomic import atomic_write

__all__ = ["npz_writer", "NpzWriter", "ArrayStream"]


class ArrayStream:
    """The rows of one array entry, written in order; :meth:`close` checks that exactly ``shape`` arrived."""

    def __init__(self, out: IO[bytes], name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.out, self.name, self.shape, self.dtype = out, name, tuple(shape), np.dtype(dtype)
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        """Append rows (k, *shape[1:]) of the array's dtype."""
        rows = np.ascontiguousarray(rows)
        if rows.dtype != self.dtype or rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.name}: rows of {rows.dtype} {rows.shape[1:]} for an array of {self.dtype} "
                             f"{self.shape[1:]}")
        if self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.name}: more than the {self.shape[0]} rows of its shape")
        self.out.write(rows.data)
        self.rows += len(rows)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.name}: {self.rows} rows written of the {self.shape[0]} of its shape")


class NpzWriter:
    """The arrays of one open .npz (see :func:`npz_writer`)."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive

    def add(self, name: str, array: np.ndarray) -> None:
        """A whole array, as np.savez writes it."""
        with self.archive.open(f"{name}.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)

    @contextlib.contextmanager
    def stream(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> Iterator[ArrayStream]:
        """An array of this shape and dtype whose rows are written chunk by chunk (C order)."""
        header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(dtype)), fortran_order=False, shape=tuple(shape))
        with self.archive.open(f"{name}.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, header)  # what np.save writes for such a header
            array = ArrayStream(out, name, shape, np.dtype(dtype))
            yield array
            array.close()


@contextlib.contextmanager
def npz_writer(path: str) -> Iterator[NpzWriter]:
    """Write the .npz at path array by array (:meth:`NpzWriter.add`, :meth:`NpzWriter.stream`); it appears,
    fsynced, once the block ends without an error, and not at all otherwise."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        yield NpzWriter(zf)
