"""demo.py: a tiny-step run writes all four outputs; the width-matched alpha."""
from __future__ import annotations

import json
import math
from pathlib import Path

import demo
import numpy as np
import pytest
from PIL import Image


def test_demo_smoke_writes_all_outputs(tmp_path: Path, capsys) -> None:
    results = demo.main(demo.parse_args(["--steps", "3", "--num-samples", "16", "--eval-samples", "16",
                                         "--out", str(tmp_path)]))
    for name in ("samples_baseline.png", "samples_anm.png", "loss.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    grid = np.array(Image.open(tmp_path / "samples_anm.png"))
    assert grid.shape == (2 * (64 + 2) + 2, 8 * (64 + 2) + 2, 3)  # 16 samples of 16px, upscaled 4x, 8 per row
    assert Image.open(tmp_path / "loss.png").size[0] > 500
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["anm"]["alpha"] == pytest.approx(demo.matched_alpha(demo.PAPER_ALPHA, 64))
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
