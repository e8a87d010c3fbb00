"""train.py under hostile input and unlucky operators: every case is one clear line on stderr, a non-zero
exit, and nothing lost or half-created on disk.

The script runs as `python train.py ARGV` would: `run_script` executes it as __main__ in this process (no
interpreter start-up per case); the cases where the process itself matters (a hang, the exit code of a
diverging run) start a real subprocess.
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import train
from data import streams

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "sit" / "train.py"
TINY = ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2", "--num-workers", "0",
        "--global-batch-size", "8", "--eval-every", "0", "--sample-every", "0", "--log-every", "2",
        "--no-console-log", "--no-progress"]


def run_script(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python train.py ARGV`, run in this process."""
    monkeypatch.setattr(sys, "argv", [str(TRAIN), *map(str, argv)])
    code = 0
    try:
        runpy.run_path(str(TRAIN), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def run_subprocess(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGV` in a fresh interpreter (a hang fails the test through the timeout)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(TRAIN), *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def set_flags(argv: list, *flags) -> list:
    """argv with each "--flag value" replaced (or appended), and each bare "--flag" appended."""
    argv, flags = list(argv), list(flags)
    while flags:
        flag = flags.pop(0)
        if not flags or str(flags[0]).startswith("--"):
            argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = flags.pop(0)
        else:
            argv += [flag, flags.pop(0)]
    return argv


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder holding run "run": 4 steps of batch 8, checkpoints at steps 2 and 4."""
    results = tmp_path_factory.mktemp("finished")
    train.main(train.parse_args([*TINY, "--results-dir", str(results), "--exp-name", "run", "--max-steps", "4",
                                 "--ckpt-every", "2"]))
    return results


@pytest.fixture
def results(finished: Path, tmp_path: Path) -> Path:
    """A private copy of `finished`, to damage."""
    shutil.copytree(finished, tmp_path / "results")
    return tmp_path / "results"


def write_latents(root: Path, nan: bool = False, num_images: int = 16, chunk_size: int = 8) -> Path:
    """An extract_latents.py-style folder of 4x4x4 latents without a VAE."""
    root.mkdir(parents=True)
    meta = dict(num_images=num_images, image_size=32, chunk_size=chunk_size, latent_shape=[4, 4, 4], num_classes=2,
                scaling_factor=0.18215, dtype="float16")
    (root / "meta.json").write_text(json.dumps(meta))
    np.save(root / "labels.npy", np.arange(num_images, dtype=np.int64) % 2)
    rng = np.random.default_rng(0)
    for chunk in range(0, num_images, chunk_size):
        moments = rng.standard_normal((min(chunk_size, num_images - chunk), 2, 2, 4, 4, 4)).astype(np.float16)
        moments[:, :, 1] = 0.1  # std
        if nan:
            moments[:, :, 0, 0, 0, 0] = np.nan
        np.save(root / f"chunk_{chunk // chunk_size:06d}.npy", moments)
    return root


LATENT = ["--data", "latents", "--model", "SiT-N/2", "--num-workers", "0", "--global-batch-size", "8",
          "--eval-every", "0", "--sample-every", "0", "--no-console-log", "--no-progress"]


# --------------------------------------------------------------------------- resume with another batch / data

def test_resume_with_larger_batch_is_refused_not_hung(results: Path) -> None:
    before = snapshot(results)
    proc = run_subprocess([*TINY, "--results-dir", results, "--exp-name", "run", "--global-batch-size", "16",
                           "--max-steps", "10", "--resume", "auto"], cwd=results)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "--global-batch-size 16 (saved: 8)" in line and "new run under another --exp-name" in line
    assert snapshot(results) == before


@pytest.mark.parametrize("change", [["--global-batch-size", "4"], ["--data-size", "64"], ["--global-seed", "1"]])
def test_resume_with_other_data_stream_is_refused(results: Path, change, monkeypatch, capsys) -> None:
    argv = set_flags([*TINY, "--results-dir", results, "--exp-name", "run", "--max-steps", "8", "--resume", "auto"],
                     *change)
    before = snapshot(results)
    code, err = run_script(argv, monkeypatch, capsys)
    assert code == 2 and change[0] in one_error_line(err) and "0000004.pt" in err
    assert snapshot(results) == before


def test_resume_may_change_grad_accumulation(results: Path) -> None:
    out = train.main(train.parse_args([*TINY, "--results-dir", str(results), "--exp-name", "run", "--max-steps", "5",
                                       "--grad-accum-steps", "2", "--resume", "auto", "--ckpt-every", "100"]))
    assert out["step"] == 5 and out["checkpoint"].endswith("0000005.pt")


def test_an_empty_epoch_raises_instead_of_spinning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streams.StreamSampler, "__iter__", lambda self: iter(()))
    with pytest.raises(RuntimeError, match="yielded no batch"):
        train.main(train.parse_args([*TINY, "--results-dir", str(tmp_path), "--max-steps", "2"]))


def test_sampler_refuses_a_position_past_the_epoch() -> None:
    sampler = streams.StreamSampler(48, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="batch 6 of an epoch of 6"):
        sampler.set_position(0, 6)


# --------------------------------------------------------------------------- reruns

def test_rerun_without_resume_is_refused(results: Path, monkeypatch, capsys) -> None:
    before = snapshot(results)
    code, err = run_script([*TINY, "--results-dir", results, "--exp-name", "run", "--max-steps", "2"],
                           monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and "already holds a run" in line and "--resume auto" in line and "--exp-name" in line
    assert snapshot(results) == before


def test_resume_auto_on_a_new_experiment_starts_fresh(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = run_script([*TINY, "--results-dir", tmp_path, "--exp-name", "new", "--max-steps", "1",
                            "--resume", "auto"], monkeypatch, capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "new" / "checkpoints") == ["0000001.pt"]


# --------------------------------------------------------------------------- NaN and divergence

def test_divergence_stops_with_the_step_range_and_keeps_good_checkpoints(tmp_path: Path) -> None:
    proc = run_subprocess([*TINY, "--results-dir", tmp_path, "--exp-name", "nan", "--lr", "1e6", "--log-every", "2",
                           "--ckpt-every", "1", "--max-steps", "12"], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "NaN or infinite between steps" in line and "--lr" in line
    checkpoints = sorted((tmp_path / "nan" / "checkpoints").glob("*.pt"))
    assert checkpoints and str(checkpoints[-1].relative_to(tmp_path)) in line  # the newest is named ...
    for path in checkpoints:  # ... and every checkpoint on disk is finite
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
    last_step = int(checkpoints[-1].stem)
    assert f"between steps {last_step + 1} and" in line


def test_nan_in_a_latent_shard_stops_before_any_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    data = write_latents(tmp_path / "latents", nan=True)
    code, err = run_script([*LATENT, "--data-path", data, "--results-dir", tmp_path / "r", "--exp-name", "x",
                            "--max-steps", "4", "--log-every", "2", "--ckpt-every", "1"], monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and "between steps 1 and 1" in line and "no checkpoint was saved" in line
    assert list((tmp_path / "r" / "x" / "checkpoints").iterdir()) == []


# --------------------------------------------------------------------------- checkpoint storage

def test_results_dir_that_cannot_be_created(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "a-file").write_text("")
    code, err = run_script([*TINY, "--results-dir", tmp_path / "a-file" / "results", "--max-steps", "1"],
                           monkeypatch, capsys)
    assert code == 2 and "is a file" in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_checkpoint_folder_fails_at_start(results: Path, monkeypatch, capsys) -> None:
    checkpoints = results / "run" / "checkpoints"
    checkpoints.chmod(0o555)
    try:
        code, err = run_script([*TINY, "--results-dir", results, "--exp-name", "run", "--max-steps", "6",
                                "--resume", "auto"], monkeypatch, capsys)
    finally:
        checkpoints.chmod(0o755)
    assert code == 2 and "cannot write to" in one_error_line(err)


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    real_save = torch.save
    saves = []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(f.name)
        if len(saves) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed; unexpected pos 473984 vs 473872")

    monkeypatch.setattr(torch, "save", save_until_full)
    code, err = run_script([*TINY, "--results-dir", tmp_path, "--exp-name", "x", "--max-steps", "2",
                            "--ckpt-every", "1"], monkeypatch, capsys)
    monkeypatch.setattr(torch, "save", real_save)
    line = one_error_line(err)
    assert code == 2 and "no space left on device" in line and "0000002.pt" in line
    assert os.listdir(tmp_path / "x" / "checkpoints") == ["0000001.pt"]  # no temp file, no partial file
    assert torch.load(tmp_path / "x" / "checkpoints" / "0000001.pt", weights_only=True)["step"] == 1


def test_checkpoints_are_fsynced(tmp_path: Path, monkeypatch) -> None:
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train.main(train.parse_args([*TINY, "--results-dir", str(tmp_path), "--max-steps", "1"]))
    assert any(".0000001.pt.tmp-" in path for path in synced)  # the file, before its rename
    assert str(tmp_path / "SiT-N-2-sinusoid-baseline" / "checkpoints") in synced  # the folder, after it


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_removed_at_start(results: Path) -> None:
    checkpoints = results / "run" / "checkpoints"
    pid = dead_pid()
    stale = [checkpoints / f".0000006.pt.tmp-{pid}", checkpoints / f"0000006.pt.tmp-{pid}"]  # new and old naming
    for path in stale:
        path.write_bytes(b"half")
    train.main(train.parse_args([*TINY, "--results-dir", str(results), "--exp-name", "run", "--max-steps", "5",
                                 "--resume", "auto", "--ckpt-every", "100"]))
    assert sorted(os.listdir(checkpoints)) == ["0000002.pt", "0000004.pt", "0000005.pt"]
    log = (results / "run" / "log.txt").read_text()
    assert all(f"removed {path}" in log for path in stale)


def test_resume_auto_falls_back_to_the_newest_loadable_checkpoint(results: Path) -> None:
    checkpoints = results / "run" / "checkpoints"
    newest = checkpoints / "0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    (checkpoints / "0000005.pt").write_bytes(b"")  # empty
    out = train.main(train.parse_args([*TINY, "--results-dir", str(results), "--exp-name", "run", "--max-steps", "6",
                                       "--resume", "auto", "--ckpt-every", "2"]))
    log = (results / "run" / "log.txt").read_text()
    assert f"warning: skipping checkpoint {checkpoints / '0000005.pt'} is empty" in log
    assert f"warning: skipping cannot read checkpoint {newest}: truncated" in log
    assert "at step 2 (epoch 0, batch 2)" in log
    assert out["step"] == 6 and torch.load(newest, weights_only=True)["step"] == 4  # rewritten by the resumed run


def test_resume_auto_with_no_loadable_checkpoint_is_refused(results: Path, monkeypatch, capsys) -> None:
    for path in (results / "run" / "checkpoints").glob("*.pt"):
        path.write_bytes(b"garbage")
    code, err = run_script([*TINY, "--results-dir", results, "--exp-name", "run", "--max-steps", "6",
                            "--resume", "auto"], monkeypatch, capsys)
    assert code == 2 and "none of the 2 checkpoint(s)" in one_error_line(err)


def bad_checkpoint(kind: str, good: Path, path: Path) -> Path:
    data = good.read_bytes()
    contents = {"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}
    if kind == "missing-keys":
        state = torch.load(good, weights_only=True)
        del state["opt"], state["rng"]
        torch.save(state, path)
    elif kind != "missing-file":
        path.write_bytes(contents[kind])
    return path


@pytest.mark.parametrize("kind, message", [("empty", "is empty"), ("truncated", "cannot read checkpoint"),
                                           ("random", "cannot read checkpoint"), ("missing-keys", "lacks opt, rng"),
                                           ("missing-file", "does not exist")])
def test_explicit_resume_from_a_bad_file(finished: Path, tmp_path: Path, kind: str, message: str, monkeypatch,
                                         capsys) -> None:
    path = bad_checkpoint(kind, finished / "run" / "checkpoints" / "0000004.pt", tmp_path / "bad.pt")
    code, err = run_script([*TINY, "--results-dir", tmp_path / "r", "--exp-name", "x", "--max-steps", "6",
                            "--resume", path], monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and str(path) in line and message in line
    assert not (tmp_path / "r").exists()


def test_resume_from_another_model_size(finished: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    path = finished / "run" / "checkpoints" / "0000004.pt"
    argv = set_flags([*TINY, "--results-dir", tmp_path, "--exp-name", "x", "--max-steps", "6", "--resume", path],
                     "--model", "SiT-T/2")
    code, err = run_script(argv, monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and str(path) in line and "--model 'SiT-T/2' (saved: 'SiT-N/2')" in line
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- bad arguments and data

@pytest.mark.parametrize("change, message", [
    (["--model", "SiT-Q/2"], "unknown model 'SiT-Q/2'"),
    (["--model", "SiT-N/0"], "unknown model 'SiT-N/0'"),
    (["--model", "SiT-N/3"], "does not split into 3x3 patches"),
    (["--global-batch-size", "0"], "--global-batch-size must be > 0"),
    (["--global-batch-size", "-8"], "--global-batch-size must be > 0"),
    (["--grad-accum-steps", "3"], "not divisible by 1 process(es) x --grad-accum-steps 3"),
    (["--global-batch-size", "64"], "too small for a global batch of 64"),
    (["--max-steps", "0"], "--max-steps must be > 0, got 0 (nothing to train)"),
    (["--ckpt-every", "0"], "--ckpt-every must be > 0"),
    (["--log-every", "0"], "--log-every must be > 0"),
    (["--anm", "--anm-alpha", "0"], "alpha"),
    (["--anm", "--anm-alpha", "-5"], "alpha"),
    (["--exp-name", "../x"], "must be a plain folder name"),
    (["--exp-name", "/tmp/x"], "must be a plain folder name"),
    (["--exp-name", "a/b"], "must be a plain folder name"),
    (["--data-path", "somewhere"], "--data-path (--data sinusoid generates its images) would be ignored"),
    (["--eval-data-path", "somewhere"], "--eval-data-path"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--anm-alpha", "5"], "--anm-alpha (ANM is off: add --anm) would be ignored"),
    (["--no-anm", "--anm-warmup", "10"], "--anm-warmup (ANM is off: add --anm) would be ignored"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
])
def test_bad_arguments(tmp_path: Path, change: list[str], message: str, monkeypatch, capsys) -> None:
    argv = set_flags([*TINY, "--results-dir", tmp_path / "r", "--max-steps", "2"], *change)
    code, err = run_script(argv, monkeypatch, capsys)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_missing_optional_logger(tmp_path: Path, logger: str, monkeypatch, capsys) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == logger else real_find_spec(name, *a))
    code, err = run_script([*TINY, "--results-dir", tmp_path / "r", "--max-steps", "1", "--report-to", "csv", logger],
                           monkeypatch, capsys)
    assert code == 2 and f"pip install {logger}" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_missing_and_empty_image_folders(tmp_path: Path, monkeypatch, capsys) -> None:
    base = ["--data", "imagenet", "--model", "SiT-N/2", "--num-workers", "0", "--results-dir", tmp_path / "r",
            "--max-steps", "1"]
    code, err = run_script([*base, "--data-path", tmp_path / "missing"], monkeypatch, capsys)
    assert code == 2 and "does not exist" in one_error_line(err)
    (tmp_path / "empty" / "class").mkdir(parents=True)
    code, err = run_script([*base, "--data-path", tmp_path / "empty"], monkeypatch, capsys)
    assert code == 2 and "no images found" in one_error_line(err)
    code, err = run_script(base, monkeypatch, capsys)
    assert code == 2 and "needs --data-path" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def damage_shard(data: Path, kind: str) -> Path:
    shard = data / "chunk_000001.npy"
    if kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:300])
    elif kind == "short":
        np.save(shard, np.load(shard)[:5])
    elif kind == "malformed":
        shard.write_bytes(os.urandom(2048))
    return shard


@pytest.mark.parametrize("kind", ["truncated", "short", "malformed"])
def test_bad_latent_shard_is_named(tmp_path: Path, kind: str, monkeypatch, capsys) -> None:
    data = write_latents(tmp_path / "latents")
    shard = damage_shard(data, kind)
    code, err = run_script([*LATENT, "--data-path", data, "--results-dir", tmp_path / "r", "--max-steps", "1"],
                           monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and f"latent shard {shard}" in line and "extract_latents.py" in line
    assert not (tmp_path / "r").exists()


def test_latents_refuse_image_size_and_data_size(tmp_path: Path, monkeypatch, capsys) -> None:
    data = write_latents(tmp_path / "latents")
    for extra, flag in ((["--image-size", "32"], "--image-size"), (["--data-size", "10"], "--data-size")):
        code, err = run_script([*LATENT, "--data-path", data, "--results-dir", tmp_path / "r", "--max-steps", "1",
                                *extra], monkeypatch, capsys)
        assert code == 2 and f"{flag} (" in one_error_line(err) and "would be ignored" in err
    code, err = run_script([*LATENT, "--data-path", data, "--results-dir", tmp_path / "r", "--max-steps", "1"],
                           monkeypatch, capsys)
    assert code == 0, err  # the same folder trains when the flags are dropped


class CorruptFrom(torch.utils.data.Dataset):
    """Items 0..n-1, where item `bad` is a file that cannot be read."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad:
            raise train.DataError("cannot read image /data/x.png (truncated): replace or remove it")
        return torch.tensor(index)


# With a worker, the message arrives wrapped in the worker's traceback; the worker then takes a few seconds to
# shut down, hence slow.
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_data_error_mid_run_is_one_line(workers: int) -> None:
    loader = torch.utils.data.DataLoader(CorruptFrom(6, bad=4), batch_size=2, num_workers=workers)
    seen = []
    with pytest.raises(train.UsageError) as error:
        for batch in train.batches(loader):
            seen.append(batch.tolist())
    assert str(error.value) == "cannot read image /data/x.png (truncated): replace or remove it"
    assert seen == [[0, 1], [2, 3]]


def test_world_size_must_divide_the_batch() -> None:
    args = train.parse_args([*TINY, "--global-batch-size", "8"])
    with pytest.raises(train.UsageError, match="not divisible by 3 process"):
        train.check_args(args, world_size=3)
    train.check_args(args, world_size=4)


# --------------------------------------------------------------------------- data through a (tiny, local) VAE

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A random diffusers AutoencoderKL with 2x downsampling, saved locally (no download)."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.models.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                         down_block_types=("DownEncoderBlock2D",) * 2,
                                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                         norm_num_groups=4)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.mark.slow  # imports diffusers
def test_corrupt_image_is_named(tmp_path: Path, tiny_vae: Path, monkeypatch, capsys) -> None:
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "images" / name / f"{i}.png")
    corrupt = tmp_path / "images" / "dog" / "2.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # truncated mid-header
    code, err = run_script(["--data", "imagenet", "--data-path", tmp_path / "images", "--vae", tiny_vae,
                            "--image-size", "8", "--model", "SiT-N/2", "--num-workers", "0", "--global-batch-size",
                            "8", "--eval-every", "0", "--sample-every", "0", "--max-steps", "1", "--no-console-log",
                            "--no-progress", "--results-dir", tmp_path / "r"], monkeypatch, capsys)
    line = one_error_line(err)
    assert code == 2 and f"cannot read image {corrupt}" in line and "replace or remove it" in line


@pytest.mark.slow  # imports diffusers
def test_latent_sample_grids_are_decoded_images(tmp_path: Path, tiny_vae: Path) -> None:
    """--data latents decodes its sample grids with --vae (4x4 latents -> 8x8 RGB), not a picture of latents."""
    from PIL import Image

    data = write_latents(tmp_path / "latents")
    argv = set_flags(LATENT, "--sample-every", "1", "--sample-grid", "2", "--sample-num-steps", "1", "--data-path",
                     str(data), "--vae", str(tiny_vae), "--max-steps", "1", "--results-dir", str(tmp_path / "r"))
    out = train.main(train.parse_args(argv))
    grid = Image.open(out["sample_grid"])
    assert grid.mode == "RGB" and grid.size == (2 * (8 + 2) + 2, 8 + 2 + 2)


def test_resume_position_past_the_epoch_is_refused(finished: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A checkpoint without the data set's length (older format) whose batch index lies past this epoch."""
    state = torch.load(finished / "run" / "checkpoints" / "0000004.pt", weights_only=True)
    del state["num_items"]
    state["epoch_step"] = 99
    torch.save(state, tmp_path / "old.pt")
    argv = [*TINY, "--results-dir", tmp_path / "r", "--max-steps", "8", "--resume", tmp_path / "old.pt"]
    code, err = run_script(argv,
                           monkeypatch, capsys)
    assert code == 2 and "batch 99 of an epoch (now 6 batches per epoch)" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_any_junk_file_is_one_usage_error(tmp_path: Path) -> None:
    # Arbitrary bytes make torch's unpickler raise almost anything (IndexError, TypeError, ...), not only
    # the errors a truncated zip gives: every one must become the same one-line message.
    import random

    from runtime.checks import read_checkpoint
    from runtime.cli import UsageError

    path = tmp_path / "junk.pt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UsageError, match="cannot read checkpoint"):
            read_checkpoint(str(path))
