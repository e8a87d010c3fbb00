"""modeling/hub.py through load_vae and train.py: a hub id that cannot be fetched is one line naming why and
--vae PATH, without retrying. No request leaves this machine: the hub is switched off
(HF_HUB_OFFLINE=1), pointed at a closed port, or at a local server that knows no model."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from image_folders import write_image_folder
from modeling.hub import absolute_if_local
from tiny_vae import save_tiny_vae

pytest.importorskip("diffusers")

SIT_DIR = Path(__file__).resolve().parents[3] / "examples" / "sit"
FIX = "pass --vae PATH, a local diffusers AutoencoderKL folder"


def train(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """train.py with an empty Hugging Face cache and the given hub settings; --vae left at its hub default
    unless args give one."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RANK", "WORLD_SIZE"))}
    full_env.update(HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                    PYTHONWARNINGS="ignore", **env)
    return subprocess.run([sys.executable, str(SIT_DIR / "train.py"), "--model", "SiT-N/2", "--max-steps", "1",
                           "--num-workers", "0", "--results-dir", str(tmp_path / "r"), "--no-progress", *args],
                          cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Retrying" not in result.stderr, result.stderr  # huggingface_hub retries with growing waits
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: cannot fetch the VAE "), result.stderr
    for fragment in (*fragments, FIX):
        assert fragment in line, line
    return line


def write_latents(root: Path) -> str:
    """An extract_latents.py folder of 4 latents of 16px images (one chunk)."""
    root.mkdir()
    meta = dict(num_images=4, chunk_size=4, latent_shape=[4, 2, 2], num_classes=2, image_size=16)
    (root / "meta.json").write_text(json.dumps(meta))
    np.save(root / "labels.npy", np.array([0, 1, 0, 1], dtype=np.int64))
    moments = np.abs(np.random.default_rng(0).standard_normal((4, 2, 2, 4, 2, 2))).astype(np.float16)
    np.save(root / "chunk_000000.npy", moments)
    return str(root)


def test_readme_command_offline_names_the_flag(tmp_path: Path) -> None:
    """--data latents with sample grids loads the default hub VAE: offline it said "does not appear to have a
    file named config.json" after its retries."""
    result = train(tmp_path, "--data", "latents", "--data-path", write_latents(tmp_path / "latents"),
                   "--global-batch-size", "2", "--sample-every", "1", "--eval-every", "0", HF_HUB_OFFLINE="1")
    line = one_line(result, "stabilityai/sd-vae-ft-ema", "not in the local cache", "HF_HUB_OFFLINE is set",
                    "--sample-every 0 trains without it")
    assert "config.json" not in line
    assert not (tmp_path / "r").exists()  # refused before the run folder exists


def test_an_unreachable_hub_is_named(tmp_path: Path) -> None:
    result = train(tmp_path, "--data", "imagenet", "--data-path", write_image_folder(tmp_path / "train"),
                   "--image-size", "16", "--global-batch-size", "2", "--eval-every", "0", "--sample-every", "0",
                   HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: nothing listens there
    one_line(result, "the hub http://127.0.0.1:9 is unreachable")


class NoModels(http.server.BaseHTTPRequestHandler):
    """What the hub answers for a repository it does not have."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Repository not found"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow  # a third hub failure, through a local server
def test_an_unknown_hub_id_is_named(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoModels)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = train(tmp_path, "--data", "imagenet", "--data-path", write_image_folder(tmp_path / "train"),
                       "--vae", "nobody/no-such-vae", "--image-size", "16", "--global-batch-size", "2",
                       "--eval-every", "0", "--sample-every", "0", HF_ENDPOINT=endpoint)
    finally:
        server.shutdown()
    one_line(result, "nobody/no-such-vae", f"{endpoint} has no model of that id")


def test_local_paths_become_absolute_hub_ids_stay(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae").mkdir()
    assert absolute_if_local("vae") == str(tmp_path / "vae")
    assert absolute_if_local("stabilityai/sd-vae-ft-ema") == "stabilityai/sd-vae-ft-ema"
    assert absolute_if_local("missing/dir") == "missing/dir"


def test_a_relative_vae_is_found_from_another_folder(tmp_path: Path) -> None:
    """train.py stored --vae as given, so sample.py run elsewhere looked for ./vae there (or on the hub)."""
    (tmp_path / "run").mkdir()
    save_tiny_vae(tmp_path / "run" / "vae")
    result = train(tmp_path / "run", "--data", "imagenet", "--data-path", write_image_folder(tmp_path / "train"),
                   "--vae", "vae", "--image-size", "16", "--global-batch-size", "2", "--eval-every", "0",
                   "--sample-every", "0", "--exp-name", "e", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run" / "r" / "e"
    assert json.loads((run_dir / "args.json").read_text())["vae"] == str(tmp_path / "run" / "vae")
    (tmp_path / "elsewhere").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RANK", "WORLD_SIZE"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    sample = subprocess.run([sys.executable, str(SIT_DIR / "sample.py"), "--ckpt", str(run_dir / "checkpoints" /
                             "0000001.pt"), "--num-steps", "1", "--mode", "ode", "--method", "euler", "--num-samples",
                             "1", "--cfg-scale", "1", "--out", "grid.png"], cwd=tmp_path / "elsewhere", env=env,
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert (tmp_path / "elsewhere" / "grid.png").stat().st_size > 0
