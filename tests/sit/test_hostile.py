"""More hostile input and unlucky operations for the SiT scripts, run as a user runs them.

Each script runs as `python <script>.py ARGV` would, executed as __main__ in this process (no interpreter
start-up per case), except where the process itself matters (another process holding a lock). Every expected
failure must be one line `<script>: error: ...` naming the fix, exit code 2, no traceback, and nothing created
or changed on disk.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data.datasets import DataError, ImageFolderDataset, LatentDataset, center_crop_arr, find_image_files, to_rgb
from modeling.models import SiT
from PIL import Image
from runtime.atomic import check_writable
from runtime.cli import UsageError, run
from runtime.run_log import CSVLog, LogFile
from sample import save_grid

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
TINY = ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2", "--num-workers", "0",
        "--global-batch-size", "8", "--eval-every", "0", "--sample-every", "0", "--no-console-log", "--no-progress"]
CONFIG = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=4)


def run_script(script: str, argv: list, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python <script> ARGV`, run in this process."""
    monkeypatch.setattr(sys, "argv", [str(SIT_DIR / script), *map(str, argv)])
    code = 0
    try:
        runpy.run_path(str(SIT_DIR / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_error_line(code: int, stderr: str, script: str, *fragments: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("sampling", "\r"))]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith(f"{script}: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every path under folder with its bytes (folders as b"<dir>"): equal snapshots = nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A pixel-space checkpoint in train.py's format with a null class (label dropout)."""
    path = tmp_path_factory.mktemp("ckpt") / "ours.pt"
    torch.manual_seed(0)
    model = SiT(**CONFIG)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "model_config": CONFIG, "latent": False,
                "vae": None, "step": 2, "args": {"path_type": "Linear", "prediction": "velocity"}}, path)
    return str(path)


# --------------------------------------------------------------------------------------------- train.py flags


@pytest.mark.parametrize("change, message", [
    (["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0"),
    (["--class-dropout-prob", "2"], "--class-dropout-prob must be in [0, 1]"),
    (["--class-dropout-prob", "-0.5"], "--class-dropout-prob must be in [0, 1]"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be > 0 and finite"),
    (["--global-seed", "-1"], "--global-seed must be in [0, 2**32)"),
    (["--global-seed", "99999999999999999999999"], "--global-seed must be in [0, 2**32)"),
    (["--data-size", "99999999999999999999"], "--data-size must be <= 100,000,000"),
    (["--resume", ""], "--resume '' names no checkpoint"),
    (["--results-dir", ""], "--results-dir '' names no folder"),
    (["--sample-every", "5", "--sample-cfg-scale", "nan"], "--sample-cfg-scale must be a finite number >= 0"),
    (["--sample-every", "5", "--sample-cfg-scale", "2", "--class-dropout-prob", "0"], "use --sample-cfg-scale 1"),
    (["--exp-name", "a" * 300], "--exp-name is 300 bytes long"),
    (["--hidden-size", "6", "--num-heads", "1"], "hidden size 6 is not a multiple of 4"),
])
def test_train_refuses_bad_numbers_before_creating_anything(tmp_path: Path, change: list, message: str,
                                                            monkeypatch, capsys) -> None:
    argv = [*TINY, "--results-dir", tmp_path / "r", "--max-steps", "2", *change]
    one_error_line(*run_script("train.py", argv, monkeypatch, capsys), "train.py", message)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------- train.py, the run folder


def test_a_second_training_in_the_same_folder_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """Another process holds the run folder's lock (a training in progress): the second run changes nothing."""
    folder = tmp_path / "r" / "x"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        argv = [*TINY, "--results-dir", tmp_path / "r", "--exp-name", "x", "--max-steps", "2", "--resume", "auto"]
        one_error_line(*run_script("train.py", argv, monkeypatch, capsys), "train.py",
                       "is in use by another train.py process", "another --exp-name")
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    lock = os.open(folder / ".lock", os.O_RDWR)  # the kernel dropped the killed holder's lock
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(lock)


def test_byte_named_run_folder_logs_every_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run folder name that is not UTF-8: log.txt and the console escape it instead of losing lines."""
    name = os.fsdecode(b"run-\xff")
    argv = [*TINY, "--results-dir", tmp_path, "--exp-name", name, "--max-steps", "2", "--ckpt-every", "2",
            "--console-log"]
    code, err = run_script("train.py", argv, monkeypatch, capsys)
    assert code == 0 and "Logging error" not in err, err
    log = (tmp_path / name / "log.txt").read_text(encoding="utf-8")
    assert "run-\\udcff" in log and "Saved checkpoint" in log


def test_a_log_line_on_a_full_disk_stops_the_run_with_one_line(monkeypatch, capsys) -> None:
    """/dev/full fails every write with ENOSPC, as log.txt on a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")

    def main(_) -> None:
        logger = logging.getLogger("hostile-full")
        logger.addHandler(LogFile("/dev/full"))
        try:
            logger.warning("a line that cannot be written")
        finally:
            with contextlib.suppress(OSError):  # closing flushes the unwritten line again
                logger.handlers[0].close()
            logger.handlers.clear()

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        run(main, lambda: None)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Logging error" not in err
    assert err.strip() == "train.py: error: no space left on device (/dev/full): free space or choose another folder."


def test_write_probe_on_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UsageError, match="no space left on device.*free space"):
        check_writable(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_resumed_log_drops_a_row_cut_short(tmp_path: Path) -> None:
    """A row cut by a full disk or a kill mid-append must not come back as a bogus early step."""
    path = tmp_path / "log.csv"
    path.write_text("step,epoch,loss\n1,0,0.5\n2,0,0.4\n7\n3,0\n")
    log = CSVLog(str(path), resume_step=5)
    log.write(dict(step=6, epoch=1, loss=0.3))
    assert path.read_text().splitlines() == ["step,epoch,loss", "1,0,0.5", "2,0,0.4", "6,1,0.3"]


@pytest.mark.parametrize("error", [errno.EPERM, errno.EACCES])
def test_a_folder_that_refuses_writes_is_one_line(error: int, monkeypatch, capsys) -> None:
    """chattr +i gives EPERM even to root; a full traceback was printed for it."""
    def main(_) -> None:
        raise PermissionError(error, os.strerror(error), "results/x/.args.json.tmp-1")

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        run(main, lambda: None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"train.py: error: {os.strerror(error).lower()} (results/x/")


# ----------------------------------------------------------------------------------------------- data


def write_latents(root: Path, labels=None, **meta_changes) -> Path:
    """A folder of 8 latents in extract_latents.py's layout; meta_changes edit meta.json only."""
    root.mkdir(parents=True)
    meta = dict(num_images=8, image_size=32, chunk_size=8, latent_shape=[4, 4, 4], num_classes=2)
    meta.update(meta_changes)
    (root / "meta.json").write_text(json.dumps(meta))
    np.save(root / "labels.npy", np.arange(8) % 2 if labels is None else labels)
    np.save(root / "chunk_000000.npy", np.zeros((8, 2, 2, 4, 4, 4), np.float16))
    return root


@pytest.mark.parametrize("kind, message", [
    ("labels out of range", "labels outside 0..1"),
    ("float labels", "float64 labels"),
    ("no images", "invalid num_images=0"),
    ("text count", "invalid num_images='8'"),
    ("zero chunk size", "invalid chunk_size=0"),
    ("flat latent shape", "invalid latent_shape=[4, 4]"),
    ("pipe meta.json", "meta.json is not a regular file"),
])
def test_bad_latent_folder_is_named_at_open(tmp_path: Path, kind: str, message: str) -> None:
    """Each of these used to pass the checks and fail mid-run (IndexError, ZeroDivisionError) or hang (a pipe)."""
    root = tmp_path / "latents"
    if kind == "labels out of range":
        write_latents(root, labels=np.arange(8) * 100)
    elif kind == "float labels":
        write_latents(root, labels=np.zeros(8))
    elif kind == "no images":
        write_latents(root, num_images=0)
    elif kind == "text count":
        write_latents(root, num_images="8")
    elif kind == "zero chunk size":
        write_latents(root, chunk_size=0)
    elif kind == "flat latent shape":
        write_latents(root, latent_shape=[4, 4])
    else:
        write_latents(root)
        (root / "meta.json").unlink()
        os.mkfifo(root / "meta.json")
    with pytest.raises(DataError, match="rerun extract_latents.py") as error:
        LatentDataset(str(root))
    assert message in str(error.value)


def test_a_symbolic_link_loop_in_an_image_folder_is_named(tmp_path: Path) -> None:
    """os.walk(followlinks=True) read the images under a loop some 40 times: a silently bloated data set."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "to_b").symlink_to("../b")
    (tmp_path / "b" / "to_a").symlink_to("../a")
    with pytest.raises(DataError, match="is a symbolic link back to .*remove the link"):
        find_image_files(str(tmp_path))
    (tmp_path / "b" / "to_a").unlink()
    (tmp_path / "b" / "1.png").write_bytes((tmp_path / "a" / "0.png").read_bytes())
    assert len(find_image_files(str(tmp_path))[0]) == 3  # a link to a sibling is no loop: a/to_b/1.png counts


def test_an_image_over_pils_pixel_limit_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    """PIL's DecompressionBombError is no OSError: it escaped as a traceback (here the limit is lowered)."""
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "cls" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="cannot read image .*big.png"):
        ImageFolderDataset(str(tmp_path), 8).load_array(0)
    one_error_line(*run_script("evaluate.py", [tmp_path, "--ref", "sinusoid"], monkeypatch, capsys), "evaluate.py",
                   "cannot decode image", "big.png")


def test_extraction_into_an_empty_out_name_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--data-path", "images", "--out", "", "--vae", "never-loaded"]
    one_error_line(*run_script("extract_latents.py", argv, monkeypatch, capsys), "extract_latents.py",
                   "--out '' names no folder")
    assert os.listdir(tmp_path) == []


def test_16_bit_grayscale_keeps_its_values() -> None:
    """PIL's convert("RGB") clips 16-bit grayscale to 255: a gradient became a white image."""
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0].ravel(), np.arange(256))


def test_a_strip_image_is_cropped_without_exhausting_memory() -> None:
    start = time.perf_counter()
    strip = center_crop_arr(Image.new("RGB", (200_000, 1)), 256)  # resized first, this was 51 G pixels
    assert strip.size == (256, 256) and time.perf_counter() - start < 5
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    assert center_crop_arr(photo, 64).size == (64, 64)


def test_extraction_with_another_vae_is_refused(tmp_path: Path) -> None:
    """Only the VAE differs: resuming would mix latents of two encoders in one folder."""
    extract_latents = pytest.importorskip("extract_latents")
    same = {key: 1 for key in extract_latents.RESUME_KEYS}
    (tmp_path / "meta.json").write_text(json.dumps(dict(same, vae="/models/vae-a", vae_sha256="a" * 64)))
    new = dict(same, vae="/models/vae-b", vae_sha256="b" * 64)
    with pytest.raises(UsageError, match="holds latents of another VAE .*'/models/vae-a'.*resume with that VAE"):
        extract_latents.check_resume(str(tmp_path), new)
    assert extract_latents.check_resume(str(tmp_path), dict(new, vae_sha256="a" * 64))  # the same VAE, moved
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="holds a list"):
        extract_latents.check_resume(str(tmp_path), new)


# ------------------------------------------------------------------------------------- sample.py, sample_ddp.py


SAMPLE = ["--num-steps", "2", "--mode", "ode", "--method", "euler"]


@pytest.mark.parametrize("script, change, message", [
    ("sample.py", ["--seed", "99999999999999999999999"], "--seed must be in [0, 2**63)"),
    ("sample.py", ["--cfg-scale", "nan"], "--cfg-scale must be >= 0 and finite"),
    ("sample.py", ["--cfg-scale", "inf"], "--cfg-scale must be >= 0 and finite"),
    ("sample_ddp.py", ["--global-seed", "-1"], "--global-seed must be in [0, 2**63)"),
    ("sample_ddp.py", ["--sample-dir", ""], "--sample-dir '' names no folder"),
])
def test_sampling_refuses_bad_numbers_before_creating_anything(ckpt: str, tmp_path: Path, script: str, change: list,
                                                               message: str, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--ckpt", ckpt, *SAMPLE, *(["--out", "g.png"] if script == "sample.py" else
                                       ["--sample-dir", "s", "--num-fid-samples", "2"]), *change]
    one_error_line(*run_script(script, argv, monkeypatch, capsys), script, message)
    assert os.listdir(tmp_path) == []


def test_sample_folder_edited_by_hand_is_named(ckpt: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """A PNG of another size (np.stack's ValueError) or a manifest whose settings are not a mapping
    (a TypeError while comparing) used to end in a traceback."""
    argv = ["--ckpt", ckpt, *SAMPLE, "--sample-dir", tmp_path, "--folder-name", "run", "--num-fid-samples", "3"]
    assert run_script("sample_ddp.py", argv, monkeypatch, capsys)[0] == 0
    (tmp_path / "run.npz").unlink()
    Image.new("RGB", (5, 5)).save(tmp_path / "run" / "000001.png")
    one_error_line(*run_script("sample_ddp.py", argv, monkeypatch, capsys), "sample_ddp.py",
                   "000001.png is 5x5 pixels, sample 0 is 8x8", "delete the odd one")
    assert not (tmp_path / "run.npz").exists()
    manifest = tmp_path / "run" / "manifest.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), settings=[1])))
    one_error_line(*run_script("sample_ddp.py", argv, monkeypatch, capsys), "sample_ddp.py",
                   "manifest.json is unreadable", "--folder-name")


def test_a_huge_nrow_is_one_row(tmp_path: Path) -> None:
    save_grid(np.zeros((3, 4, 4, 3), np.uint8), str(tmp_path / "g.png"), nrow=10**9)
    assert Image.open(tmp_path / "g.png").size == (3 * 6 + 2, 6 + 2)


# ----------------------------------------------------------------------------------------------- evaluate.py


def npz(path: Path, images: np.ndarray) -> str:
    np.savez(path, arr_0=images)
    return str(path)


@pytest.mark.parametrize("images, extra, message", [
    (np.zeros((8, 8, 8, 4), np.uint8), [], "expected 1 or 3 colour channels"),
    (np.zeros((0, 8, 8, 3), np.uint8), [], "holds no pixels"),
    (np.zeros((1, 8, 8, 3), np.uint8), [], "holds 1 of 8x8"),
    (np.zeros((8, 1, 1, 3), np.uint8), [], "holds 8 of 1x1"),
    (np.zeros((8, 8, 16, 3), np.uint8), [], "holds 8 of 8x16"),
])
def test_evaluate_refuses_arrays_the_metric_cannot_read(tmp_path: Path, images: np.ndarray, extra: list,
                                                        message: str, monkeypatch, capsys) -> None:
    argv = [npz(tmp_path / "gen.npz", images), "--ref", "sinusoid", *extra]
    one_error_line(*run_script("evaluate.py", argv, monkeypatch, capsys), "evaluate.py", message)


@pytest.mark.parametrize("flags, message", [
    (["--device", "mps"], "--device mps: this script runs on cpu or cuda only"),
    (["--out", "{tmp}/results.json", "--overwrite"], "is a folder: give a file name"),
])
def test_evaluate_refuses_bad_flags_before_loading(tmp_path: Path, flags: list, message: str, monkeypatch,
                                                   capsys) -> None:
    (tmp_path / "results.json").mkdir()
    gen = npz(tmp_path / "gen.npz", np.zeros((4, 8, 8, 3), np.uint8))
    argv = [gen, "--ref", gen, *(flag.format(tmp=tmp_path) for flag in flags)]
    one_error_line(*run_script("evaluate.py", argv, monkeypatch, capsys), "evaluate.py", message)


def test_a_checkpoint_given_as_samples_is_named_briefly(ckpt: str, monkeypatch, capsys) -> None:
    line = one_error_line(*run_script("evaluate.py", [ckpt, "--ref", "sinusoid"], monkeypatch, capsys),
                          "evaluate.py", "no arr_0", "more")
    assert len(line) < 400
