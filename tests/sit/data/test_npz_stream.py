"""examples/sit/data/npz_stream.py: an .npz written chunk by chunk is what np.savez writes, in bounded memory."""
from __future__ import annotations

import os
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data.npz import load_npz
from data.npz_stream import npz_writer


def test_a_streamed_npz_reads_back_as_np_savez_wrote_it(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    mu = np.arange(3.0)
    with npz_writer(str(tmp_path / "s.npz")) as npz:
        with npz.stream("arr_0", images.shape, np.uint8) as arr_0:
            for start in range(0, 7, 3):
                arr_0.write(images[start:start + 3])
        npz.add("mu", mu)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu)
    with np.load(tmp_path / "s.npz") as got:
        assert list(got.keys()) == ["arr_0", "mu"]
        assert np.array_equal(got["arr_0"], images) and np.array_equal(got["mu"], mu)
    assert np.array_equal(load_npz(str(tmp_path / "s.npz")), images)
    with zipfile.ZipFile(tmp_path / "s.npz") as a, zipfile.ZipFile(tmp_path / "ref.npz") as b:
        assert a.read("arr_0.npy") == b.read("arr_0.npy")  # the .npy entry byte for byte (header included)
        assert all(info.compress_type == zipfile.ZIP_STORED for info in a.infolist())


@pytest.mark.parametrize("rows", [2, 4])
def test_a_wrong_row_count_leaves_no_file(tmp_path: Path, rows: int) -> None:
    path = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="rows"), npz_writer(str(path)) as npz:
        with npz.stream("arr_0", (3, 2), np.uint8) as arr_0:
            arr_0.write(np.zeros((rows, 2), np.uint8))
    assert os.listdir(tmp_path) == []  # neither the .npz nor its temp file


def test_rows_of_another_dtype_or_shape_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="for an array of"), npz_writer(str(tmp_path / "s.npz")) as npz:
        with npz.stream("arr_0", (3, 2), np.uint8) as arr_0:
            arr_0.write(np.zeros((1, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_memory_holds_one_chunk_not_the_array(tmp_path: Path) -> None:
    """64 chunks of 1 MiB: np.savez would need the whole 64 MiB array (and np.concatenate its parts as well)."""
    chunk = np.full((16, 256, 256), 7, np.uint8)  # 1 MiB
    tracemalloc.start()
    try:
        with npz_writer(str(tmp_path / "big.npz")) as npz, npz.stream("arr_0", (64 * 16, 256, 256), np.uint8) as arr:
            for _ in range(64):
                arr.write(chunk.copy())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB array"
    assert os.path.getsize(tmp_path / "big.npz") > 64 << 20
