"""train.py --data imagenet and extract_latents.py on image folders as they come from real disks: a named pipe
and a socket named like images, macOS ._* files and .ipynb_checkpoints folders (run as subprocesses with a
timeout: reading a pipe used to block forever)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from data.datasets import ImageFolderDataset
from data.npz import load_image_folder
from image_folders import add_disk_junk, write_image_folder
from PIL import Image
from runtime.cli import UsageError
from tiny_vae import save_tiny_vae

pytest.importorskip("diffusers")

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
TIMEOUT_S = 180  # far above a run here; what it catches is a reader blocked on a pipe, which never ends


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture
def junk_root(tmp_path: Path) -> tuple[str, dict[str, list[str]]]:
    root = write_image_folder(tmp_path / "train")
    return root, add_disk_junk(root)


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SIT_DIR / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def assert_named_once(text: str, junk: dict[str, list[str]]) -> None:
    """One warning line: the hidden entries counted, the pipe and the socket named."""
    lines = [line for line in text.splitlines() if "non-regular" in line]
    assert len(lines) == 1, text
    assert "ignored 4 hidden entries" in lines[0], lines[0]
    for path in junk["not_regular"]:
        assert path in lines[0], lines[0]
    assert "._0.png" not in text and "ipynb" not in text  # counted, not listed


def test_train_on_a_folder_with_pipes_and_junk(junk_root, vae_dir: str, tmp_path: Path) -> None:
    root, junk = junk_root
    result = run_script("train.py", "--data", "imagenet", "--data-path", root, "--vae", vae_dir, "--image-size", "16",
                        "--model", "SiT-N/2", "--max-steps", "1", "--global-batch-size", "6", "--num-workers", "0",
                        "--eval-every", "0", "--sample-every", "0", "--results-dir", "r", "--exp-name", "run",
                        "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "r" / "run" / "log.txt").read_text()
    assert_named_once(log, junk)
    assert "Data: 6 items" in log  # 2 classes x 3 images: nothing from the junk
    assert json.loads((tmp_path / "r" / "run" / "args.json").read_text())["data"] == "imagenet"


def test_extract_latents_on_a_folder_with_pipes_and_junk(junk_root, vae_dir: str, tmp_path: Path) -> None:
    root, junk = junk_root
    result = run_script("extract_latents.py", "--data-path", root, "--vae", vae_dir, "--out", "latents",
                        "--image-size", "16", "--num-workers", "0", "--batch-size", "2", "--chunk-size", "4",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_named_once(result.stderr, junk)
    assert "\r" not in result.stdout + result.stderr  # no progress bar into a file
    meta = json.loads((tmp_path / "latents" / "meta.json").read_text())
    assert meta["num_images"] == 6 and meta["classes"] == ["cat", "dog"]


def test_a_sample_folder_with_a_pipe_is_refused_not_read(tmp_path: Path) -> None:
    """evaluate.py's folder reader opened a pipe named like a sample and waited forever."""
    for i in range(2):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i:06d}.png")
    os.mkfifo(tmp_path / "000002.png")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked reading a pipe"))
    signal.alarm(30)
    try:
        with pytest.raises(UsageError, match=r"000002.png is a named pipe, not an image file: remove it"):
            load_image_folder(str(tmp_path))
    finally:
        signal.alarm(0)
    with pytest.raises(UsageError, match=r"000002.png is a named pipe"):  # whichever images are asked for
        load_image_folder(str(tmp_path), limit=2)


def test_an_undecodable_image_is_named_once(tmp_path: Path) -> None:
    """extract_latents.py wrapped the dataset's whole sentence in its own: 'cannot decode image X (cannot read
    image X (...): replace or remove it): replace it ...'."""
    extract_latents = pytest.importorskip("extract_latents")
    root = write_image_folder(tmp_path / "train")
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not a png")
    message = str(extract_latents.decode_error(ImageFolderDataset(root, 16), 0, 0, 2))
    assert message.startswith(f"cannot decode image {tmp_path / 'train' / 'cat' / '0.png'} (cannot identify image")
    assert "cannot read image" not in message and message.count("replace") == 1, message


def test_the_scan_summary_reaches_log_txt_with_a_heldout_set(junk_root, vae_dir: str, tmp_path: Path) -> None:
    """With --eval-every left at its default the held-out split wrapped the data set, and the line was lost; a
    junk --eval-data-path folder gets its own line. (In-process: the scan opens no pipe, the test above shows.)"""
    train = pytest.importorskip("train")
    root, junk = junk_root
    val_root = write_image_folder(tmp_path / "val")
    val_junk = add_disk_junk(val_root)
    common = ["--data", "imagenet", "--data-path", root, "--vae", vae_dir, "--image-size", "16", "--model",
              "SiT-N/2", "--max-steps", "1", "--num-workers", "0", "--sample-every", "0", "--eval-samples", "2",
              "--results-dir", str(tmp_path / "r"), "--no-progress", "--no-console-log"]
    train.main(train.parse_args([*common, "--global-batch-size", "4", "--exp-name", "split"]))
    log = (tmp_path / "r" / "split" / "log.txt").read_text()
    assert_named_once(log, junk)
    assert "Data: 4 items" in log and "2 items of --data-path" in log  # the held-out split did wrap the data set
    train.main(train.parse_args([*common, "--global-batch-size", "6", "--exp-name", "val", "--eval-data-path",
                                 val_root]))
    lines = [line for line in (tmp_path / "r" / "val" / "log.txt").read_text().splitlines() if "non-regular" in line]
    assert len(lines) == 2 and f"image folder {root}:" in lines[0] and f"image folder {val_root}:" in lines[1], lines
    assert all(path in lines[1] for path in val_junk["not_regular"]), lines[1]
