"""demo.py: a tiny-step run writes all four outputs; the width-matched alpha."""
from __future__ import annotations

import json
import math
from pathlib import Path

import demo
import numpy as np
import pytest
from PIL import Image


def test_matched_alpha_keeps_the_papers_rms() -> None:
    assert demo.matched_alpha(1152) == pytest.approx(70.0)
    assert demo.matched_alpha(64) == pytest.approx(16.499, abs=1e-3)
    for width in (64, 384, 1152):
        assert demo.matched_alpha(width) / math.sqrt(width) == pytest.approx(70 / math.sqrt(1152))


def test_demo_smoke_writes_all_outputs(tmp_path: Path, capsys) -> None:
    results = demo.main(demo.parse_args(["--steps", "3", "--num-samples", "16", "--eval-samples", "16",
                                         "--out", str(tmp_path)]))
    for name in ("samples_baseline.png", "samples_anm.png", "loss.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    grid = np.array(Image.open(tmp_path / "samples_anm.png"))
    assert grid.shape == (2 * (64 + 2) + 2, 8 * (64 + 2) + 2, 3)  # 16 samples of 16px, upscaled 4x, 8 per row
    assert Image.open(tmp_path / "loss.png").size[0] > 500
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["anm"]["alpha"] == pytest.approx(demo.matched_alpha(64))
    for run in ("baseline", "anm"):
        assert metrics[run]["heldout_fm_loss"] > 0 and math.isfinite(metrics[run]["final_fm_loss"])
        assert {"frechet", "frechet_floor", "validity", "validity_real"} <= set(metrics[run]["sinusoid"])
        assert len(metrics[run]["update_norms"]["per_block"]) == 4
        assert Path(metrics[run]["checkpoint"]).exists()
    assert metrics == json.loads(json.dumps(results))  # what main() returns is what it wrote
    out = capsys.readouterr().out
    assert "alpha = 70 * sqrt(64/1152) = 16.50" in out and "real vs real" in out


@pytest.mark.slow
def test_demo_parallel_equals_sequential(tmp_path: Path) -> None:
    """The two CPU runs in worker processes give the numbers one process gives."""
    argv = ["--steps", "3", "--num-samples", "16", "--eval-samples", "16"]
    par = demo.main(demo.parse_args([*argv, "--out", str(tmp_path / "par")]))
    seq = demo.main(demo.parse_args([*argv, "--out", str(tmp_path / "seq"), "--no-parallel"]))
    for run in ("baseline", "anm"):
        assert par[run]["heldout_fm_loss"] == seq[run]["heldout_fm_loss"]
        assert par[run]["sinusoid"] == seq[run]["sinusoid"]
