"""No script draws a progress bar (tqdm's \\r-frames) into a file: sample_ddp.py and train.py with their output
redirected, train.py also with only stdout on a terminal (the bar goes to stderr)."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import torch
from modeling.models import SiT

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
CONFIG = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=4)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return out


def run_to_files(argv: list[str], tmp_path: Path, stdout=None) -> tuple[int, str]:
    """(exit code, everything written to the files) of a script whose stderr (and stdout, unless given) is a file."""
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        code = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env(), stdout=stdout or out, stderr=err,
                              timeout=300).returncode
    return code, (tmp_path / "out.log").read_text() + (tmp_path / "err.log").read_text()


def test_sample_ddp_draws_no_bar_into_a_log_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SiT(**CONFIG)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "model_config": CONFIG, "latent": False,
                "vae": None, "step": 1, "args": {}}, tmp_path / "ckpt.pt")
    code, text = run_to_files([str(SIT_DIR / "sample_ddp.py"), "--ckpt", "ckpt.pt", "--num-fid-samples", "3",
                               "--per-proc-batch-size", "1", "--mode", "ode", "--method", "euler", "--num-steps", "1",
                               "--sample-dir", "samples"], tmp_path)
    assert code == 0, text
    assert "Saved " in text and "\r" not in text and "sampling:" not in text, text


def test_train_draws_no_bar_into_stderr_redirected_from_a_terminal(tmp_path: Path) -> None:
    """`train.py ... 2> err.log` in a terminal: stdout was a terminal, so the bar was drawn, into err.log."""
    terminal, stdout = pty.openpty()
    try:
        code, text = run_to_files([str(SIT_DIR / "train.py"), "--data", "sinusoid", "--image-size", "8",
                                   "--data-size", "16", "--model", "SiT-N/4", "--global-batch-size", "8",
                                   "--num-workers", "0", "--max-steps", "3", "--eval-every", "0", "--sample-every",
                                   "0", "--results-dir", "r", "--no-console-log"], tmp_path, stdout=stdout)
    finally:
        os.close(stdout)
        os.close(terminal)
    assert code == 0, text
    assert "\r" not in text and "it/s" not in text, text
    assert (tmp_path / "r").is_dir()
