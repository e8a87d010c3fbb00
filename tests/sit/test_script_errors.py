"""sample.py, sample_ddp.py, extract_latents.py and evaluate.py under hostile input, run as a user runs them.

Every case starts the script in a subprocess (CPU, tiny models from checkpoints made here) and checks the
three things a user sees: one line ``<script>: error: <message>`` naming the problem and the fix, exit code
2 without a traceback, and a disk left as it was (nothing half-created). Each subprocess pays torch's import,
so a representative case per kind of error runs by default and the rest are marked slow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from data.npz import save_npz
from modeling.models import SiT
from PIL import Image

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
CONFIG = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=4)


def save_ours(path: Path, config: dict, **overrides) -> str:
    """A checkpoint in train.py's format (model config inside), pixel space."""
    torch.manual_seed(0)
    model = SiT(**config)
    state = {"model": model.state_dict(), "ema": model.state_dict(), "model_config": config, "latent": False,
             "vae": None, "step": 2, "args": {"path_type": "Linear", "prediction": "velocity"}}
    state.update(overrides)
    state = {k: v for k, v in state.items() if v is not DROP}
    torch.save(state, path)
    return str(path)


DROP = object()


@dataclass
class World:
    """Files the cases point at."""

    root: Path
    paths: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.paths[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    w = World(root)
    ckpt = save_ours(root / "ok.pt", CONFIG)
    w.paths["ckpt"] = ckpt
    w.paths["one_class"] = save_ours(root / "one.pt", dict(CONFIG, num_classes=1))
    data = Path(ckpt).read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("random", os.urandom(4096)), ("empty", b"")):
        (root / f"{name}.pt").write_bytes(content)
        w.paths[name] = str(root / f"{name}.pt")
    w.paths["no_ema"] = save_ours(root / "no_ema.pt", CONFIG, ema=DROP)
    broken = SiT(**CONFIG).state_dict()
    broken.pop("final_layer.linear.weight")
    w.paths["missing_keys"] = save_ours(root / "missing_keys.pt", CONFIG, ema=broken)

    rng = np.random.default_rng(0)
    images = root / "images" / "cls"
    images.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    corrupt = root / "corrupt" / "cls"
    corrupt.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(corrupt / "0.png")
    (corrupt / "1.png").write_bytes(os.urandom(300))
    w.paths["images"], w.paths["corrupt_images"] = str(root / "images"), str(root / "corrupt")
    w.paths["corrupt_png"] = str(corrupt / "1.png")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not latents")
    w.paths["foreign"] = str(root / "foreign")
    (root / "empty_dir").mkdir()
    w.paths["empty_dir"] = str(root / "empty_dir")
    temps = root / "temps_only"
    temps.mkdir()
    (temps / "000000.png.tmp.png").write_bytes(b"\x89PNG partial")  # an old-style partial write
    (temps / ".000001.png.tmp-12345").write_bytes(b"\x89PNG partial")  # runtime/atomic.py's temp name
    w.paths["temps_only"] = str(temps)
    npz = save_npz(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), str(root / "gen.npz"))
    w.paths["npz"] = npz
    (root / "truncated.npz").write_bytes(Path(npz).read_bytes()[:200])
    w.paths["truncated_npz"] = str(root / "truncated.npz")
    return w


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    """A 2x-downsampling diffusers VAE with random weights, saved locally (no download)."""
    pytest.importorskip("diffusers")
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder with its size and mtime: equal snapshots = nothing created or changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SIT_DIR / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, script: str, *fragments: str) -> str:
    """Exit code 2, no traceback, and the last stderr line is '<script>: error: ...' holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{script}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


@dataclass(frozen=True)
class Case:
    """A command line whose failure must read as `fragments`; {key} in args is a world path, {tmp} the cwd."""

    script: str
    args: tuple[str, ...]
    fragments: tuple[str, ...]
    slow: bool = False
    needs_vae: bool = False


SAMPLE = ("sample.py", "--num-steps", "2", "--mode", "ode", "--method", "euler")
DDP = ("sample_ddp.py", "--sample-dir", "{tmp}/samples", "--num-fid-samples", "2", "--mode", "ode",
       "--method", "euler", "--num-steps", "2")
EXTRACT = ("extract_latents.py", "--vae", "{vae}", "--out", "{tmp}/latents", "--image-size", "16",
           "--num-workers", "0", "--batch-size", "2", "--chunk-size", "2")

CASES = {
    # sample.py: checkpoints
    "sample-truncated-ckpt": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{truncated}"),
                                  ("cannot read checkpoint", "truncated.pt", "copy it again")),
    "sample-random-ckpt": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{random}"),
                               ("cannot read checkpoint", "random.pt"), slow=True),
    "sample-empty-ckpt": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{empty}"), ("empty.pt is empty",), slow=True),
    "sample-missing-ckpt": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{tmp}/nope.pt"),
                                ("nope.pt does not exist", "--ckpt"), slow=True),
    "sample-no-ema": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{no_ema}"),
                          ("no_ema.pt lacks ema", "--no-ema"), slow=True),
    "sample-missing-keys": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{missing_keys}"),
                                ("missing_keys.pt do not fit", "final_layer.linear.weight"), slow=True),
    # sample.py: flags
    "sample-out-extension": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{ckpt}", "--out", "{tmp}/grid.xyz"),
                                 ("unknown image extension '.xyz'", ".png")),
    "sample-label-range": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{ckpt}", "--class-labels", "1", "7",
                                           "--out", "{tmp}/g.png"), ("--class-labels 7 is out of range", "0..3"),
                               slow=True),
    "sample-one-class-labels": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{one_class}", "--class-labels", "0",
                                                "--out", "{tmp}/g.png"), ("one class", "drop the flag"), slow=True),
    "sample-zero-steps": Case("sample.py", ("--ckpt", "{ckpt}", "--num-steps", "0", "--out", "{tmp}/g.png"),
                              ("--num-steps must be >= 1",), slow=True),
    "sample-negative-cfg": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{ckpt}", "--cfg-scale", "-1",
                                            "--out", "{tmp}/g.png"), ("--cfg-scale must be >= 0",), slow=True),
    "sample-interval-unguided": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{ckpt}", "--cfg-scale", "1",
                                                 "--guidance-interval", "0", "0.5", "--out", "{tmp}/g.png"),
                                     ("--guidance-interval is ignored without guidance",), slow=True),
    "sample-official-flags-on-ours": Case(SAMPLE[0], (*SAMPLE[1:], "--ckpt", "{ckpt}", "--image-size", "128",
                                                      "--out", "{tmp}/g.png"),
                                          ("--image-size: only for official checkpoints",), slow=True),
    # sample_ddp.py
    "ddp-folder-outside": Case(DDP[0], (*DDP[1:], "--ckpt", "{ckpt}", "--folder-name", "../x"),
                               ("--folder-name '../x' must be a plain folder name",)),
    "ddp-folder-absolute": Case(DDP[0], (*DDP[1:], "--ckpt", "{ckpt}", "--folder-name", "{tmp}/abs"),
                                ("must be a plain folder name",), slow=True),
    "ddp-random-ckpt": Case(DDP[0], (*DDP[1:], "--ckpt", "{random}"), ("cannot read checkpoint", "random.pt"),
                            slow=True),
    "ddp-label-dropout-free-cfg": Case(DDP[0], (*DDP[1:], "--ckpt", "{ckpt}", "--cfg-channels", "3"),
                                       ("--cfg-channels is ignored without guidance",), slow=True),
    # extract_latents.py
    "extract-chunk-size-0": Case(EXTRACT[0], (*EXTRACT[1:], "--data-path", "{images}", "--chunk-size", "0"),
                                 ("--chunk-size must be >= 1",)),  # refused before the VAE is loaded
    "extract-missing-data": Case(EXTRACT[0], (*EXTRACT[1:], "--data-path", "{tmp}/nodata"),
                                 ("nodata", "does not exist", "--data-path"), needs_vae=True, slow=True),
    "extract-empty-data": Case(EXTRACT[0], (*EXTRACT[1:], "--data-path", "{empty_dir}"),
                               ("no images found", "root/<class>/<image>"), needs_vae=True, slow=True),
    "extract-foreign-out": Case(EXTRACT[0], (*EXTRACT[1:4], "{foreign}", *EXTRACT[5:], "--data-path", "{images}"),
                                ("is not empty and holds no extraction", "another --out"), slow=True),
    "extract-missing-vae": Case(EXTRACT[0], ("--vae", "{tmp}/novae", *EXTRACT[3:], "--data-path", "{images}"),
                                ("novae does not exist", "--vae"), needs_vae=True, slow=True),
    # evaluate.py
    "evaluate-temps-only": Case("evaluate.py", ("{temps_only}", "--ref", "sinusoid"),
                                ("no images found under", "temps_only")),
    "evaluate-corrupt-image": Case("evaluate.py", ("{corrupt_images}", "--ref", "sinusoid"),
                                   ("cannot decode image", "1.png")),
    "evaluate-truncated-npz": Case("evaluate.py", ("{truncated_npz}", "--ref", "sinusoid"),
                                   ("cannot read", "truncated.npz"), slow=True),
    "evaluate-missing-samples": Case("evaluate.py", ("{tmp}/none.npz", "--ref", "sinusoid"),
                                     ("none.npz does not exist",), slow=True),
    "evaluate-too-many": Case("evaluate.py", ("{npz}", "--ref", "sinusoid", "--num-samples", "9"),
                              ("--num-samples 9", "holds only 8"), slow=True),
    "evaluate-ignored-flag": Case("evaluate.py", ("{npz}", "--ref", "sinusoid", "--kid-subsets", "5"),
                                  ("--kid-subsets", "ignored with --ref sinusoid"), slow=True),
    "evaluate-out-extension": Case("evaluate.py", ("{npz}", "--ref", "sinusoid", "--out", "{tmp}/r.txt"),
                                   ("ending in .json",), slow=True),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c.slow else n
                                  for n, c in CASES.items()])
def test_hostile_input(name: str, world: World, tmp_path: Path, request) -> None:
    case = CASES[name]
    paths = dict(world.paths, tmp=str(tmp_path), vae=str(tmp_path / "never-loaded"))
    if case.needs_vae:
        paths["vae"] = request.getfixturevalue("tiny_vae")
    before_world, before_cwd = snapshot(world.root), snapshot(tmp_path)
    result = run_script(case.script, *(arg.format(**paths) for arg in case.args), cwd=tmp_path)
    assert_one_line_error(result, case.script, *case.fragments)
    assert snapshot(tmp_path) == before_cwd  # nothing created (no grid, sample folder, meta.json, results)
    assert snapshot(world.root) == before_world


@pytest.mark.slow
def test_corrupt_image_in_extraction_is_named_and_the_folder_stays_resumable(world: World, tiny_vae: str,
                                                                              tmp_path: Path) -> None:
    """A corrupt image is only found when decoded: the error names it; finished chunks stay, nothing partial."""
    out = tmp_path / "latents"
    result = run_script(*EXTRACT[:1], *(a.format(vae=tiny_vae, tmp=tmp_path) for a in EXTRACT[1:]),
                        "--data-path", world["corrupt_images"], "--chunk-size", "1", cwd=tmp_path)
    assert_one_line_error(result, "extract_latents.py", "cannot decode image", world["corrupt_png"],
                          "replace it", "1 of 2 chunks are done")
    assert sorted(os.listdir(out)) == ["chunk_000000.npy", "labels.npy", "meta.json"]


@pytest.mark.slow
def test_bad_flag_is_an_argparse_error(world: World, tmp_path: Path) -> None:
    result = run_script(*DDP, "--ckpt", world["ckpt"], "--num-fid-samples", "0", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--num-fid-samples: must be >= 1, got 0" in result.stderr.strip().splitlines()[-1]
    assert snapshot(tmp_path) == {}
