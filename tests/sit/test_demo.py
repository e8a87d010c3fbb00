"""demo.py: a few-step run writes every output, the ANM run differs from the baseline, the table and plots."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import demo
import numpy as np
import pytest
from evaluation import demo_report
from modeling.alpha_scaling import matched_alpha
from PIL import Image
from runtime.cli import UsageError

SMOKE = ["--steps", "4", "--num-samples", "16", "--eval-samples", "16"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = demo.main(demo.parse_args([*SMOKE, "--no-parallel", "--out", str(out)]))
    return out, results, printed.getvalue()


def test_smoke_run_writes_every_output(smoke) -> None:
    out, results, printed = smoke
    for name in ("samples.png", "norms.png", "loss.png", "comparison.md", "metrics.json", "speedup/speedup.json",
                 "speedup/speedup.md", "speedup/curves.png"):
        assert (out / name).stat().st_size > 0, name
    samples = Image.open(out / "samples.png")
    assert samples.size[0] > 2 * samples.size[1]  # three grids side by side
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(results))
    assert "alpha = 70 * sqrt(64/1152) = 16.50" in printed and "| real vs real |" in printed
    assert (out / "comparison.md").read_text() in printed


def test_smoke_metrics_hold_both_runs_measured_the_same_way(smoke) -> None:
    out, results, _ = smoke
    scale = demo.SCALES["cpu"]
    assert results["config"]["anm"]["alpha"] == pytest.approx(matched_alpha(70.0, scale.hidden_size))
    for run in ("baseline", "anm"):
        r = results[run]
        assert r["fresh_fm_loss_ema"] > 0 and r["train_images_fm_loss_ema"] > 0 and math.isfinite(r["final_fm_loss"])
        assert {"frechet", "frechet_floor", "validity", "validity_real"} <= set(r["sinusoid"])
        assert r["curves"]["step"] == [1, 2, 3, 4]  # a checkpoint per step: eval points capped by the steps
        assert all(len(norms) == scale.depth for norms in r["curves"]["update_norms"])
        assert len(r["update_norms"]["per_block"]) == scale.depth and 0 <= r["update_norms"]["frac_below_alpha"] <= 1
        assert (out / r["checkpoint"]).exists()
    # Same seed, same data, same noise: only the ANM term can make the runs differ.
    assert results["anm"]["curves"]["update_norms"] != results["baseline"]["curves"]["update_norms"]
    assert results["timing"]["wall_s"] > 0 and results["timing"]["cpu_s"] > 0
    assert results["real_training_images_sinusoid"]["validity"] == 1.0  # the left grid is real sinusoids


def test_rerun_replaces_the_earlier_runs(smoke, tmp_path: Path) -> None:
    out, _, _ = smoke
    stale = out / "runs" / "baseline" / "checkpoints" / "0999999.pt"
    stale.write_bytes(b"from an earlier, longer run")
    results = demo.main(demo.parse_args(["--steps", "2", "--num-samples", "8", "--eval-samples", "8",
                                         "--no-parallel", "--out", str(out)]))
    assert not stale.exists() and results["baseline"]["curves"]["step"] == [1, 2]


@pytest.mark.parametrize("flag", ["--steps", "--num-samples", "--eval-samples", "--threads"])
def test_non_positive_counts_are_usage_errors_that_write_nothing(tmp_path: Path, flag: str) -> None:
    with pytest.raises(UsageError, match=f"{flag} must be > 0"):
        demo.main(demo.parse_args([flag, "0", "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_bad_seed_or_out_are_usage_errors_that_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--seed must be in"):
        demo.main(demo.parse_args(["--seed", "-1", "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()
    taken = tmp_path / "taken"
    taken.write_text("kept")
    with pytest.raises(UsageError, match="choose another --out"):
        demo.main(demo.parse_args(["--out", str(taken)]))
    assert taken.read_text() == "kept"


def test_a_runs_folder_demo_did_not_make_is_never_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "out" / "runs" / "anm" / "weeks-of-training.pt"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="did not make"):
        demo.main(demo.parse_args(["--out", str(tmp_path / "out")]))
    assert precious.read_bytes() == b"keep me"


def test_comparison_table_lists_both_runs_and_the_noise_floor(tmp_path: Path) -> None:
    def run(validity: float, norm: float) -> dict:
        return dict(final_fm_loss=0.5, train_images_fm_loss_ema=0.4, fresh_fm_loss_ema=0.3,
                    sinusoid=dict(validity=validity, validity_real=1.0, frechet=2.0, frechet_floor=0.1, mmd2=0.2,
                                  mmd2_floor=0.0),
                    update_norms=dict(mean=norm, frac_below_alpha=0.25))

    results = dict(baseline=run(0.75, 3.0), anm=run(0.5, 20.0),
                   config=dict(model="SiT-T/2", hidden_size=64, depth=4, image_size=8, data_size=64, batch=32,
                               steps=10, lr=1e-3, ema_decay=0.99, seed=0, num_samples=16, sample_steps=4,
                               eval_samples=16, anm=dict(alpha=16.5, lam=10.0, warmup=2)),
                   timing=dict(wall_s=1.0, cpu_s=2.0))
    rows = demo_report.comparison_rows(results, alpha=16.5)
    text = demo_report.write_table(rows, results, str(tmp_path / "comparison.md"))
    assert "| valid sinusoids (ρ < 0.05), EMA samples | 0.75 | 0.5 | 1 |" in text
    assert "| mean ‖Δh‖ per token, final weights | 3 | 20 | – |" in text
    assert "| FM loss on fresh sinusoids (never trained on), EMA | 0.3 | 0.3 | – |" in text
    assert "tokens with ‖Δh‖ < α = 16.5" in text and "neither for nor against" in text
    assert (tmp_path / "comparison.md").read_text() == text


def test_the_speed_up_in_steps_compares_the_two_runs_logs(smoke) -> None:
    out = smoke[0]  # read from disk: another test reruns the demo in this folder
    speedup = json.loads((out / "speedup" / "speedup.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    (arm,) = speedup["arms"]
    assert speedup["metric"] == metrics["speedup"]["metric"] == "fm_loss"
    assert [r["path"] for r in speedup["baseline"]["runs"]] == [str(out / "runs" / "baseline")]
    assert arm["label"].startswith("anm (anm_alpha=16.4992")
    assert arm["curve"]["step"] == metrics["anm"]["curves"]["step"]  # a log.csv row at every checkpoint
    assert metrics["speedup"]["summary"] == arm["summary"]
    assert "Speed-up in steps (`compare_runs.py`" in (out / "comparison.md").read_text()


def test_the_speed_up_lines_state_both_factors() -> None:
    def entry(step, value, reached_at, factor, bound=None) -> dict:
        return dict(step=step, value=value, reached_at=reached_at, factor=factor, bound=bound)

    summary = dict(arm_reaches_baseline=entry(5000, 0.166, None, None, dict(relation="<", factor=1.0)),
                   baseline_reaches_arm=entry(5000, 0.175, 4330.2, 0.866))
    text = " ".join(demo_report.speedup_lines(dict(metric="fm_loss", folder="speedup", summary=summary)))
    assert "ANM does not reach the baseline's final value, 0.166 at step 5000, within its logged steps: factor < 1.00" \
        in text
    assert "the baseline reaches the final value of ANM, 0.175 at step 5000, at step 4330: ×0.87" in text


def test_tile_lays_images_out_in_rows() -> None:
    images = np.zeros((10, 4, 4, 3), dtype=np.uint8)
    grid = demo_report.tile(images, nrow=8, pad=1)
    assert grid.shape == (2 * 5 + 1, 8 * 5 + 1, 3)
    assert grid[1:5, 1:5].max() == 0 and grid[0].min() == 255  # images on a white background
    assert grid[6:10, 11:15].max() == 255  # the second row holds only two images


@pytest.mark.slow
def test_demo_parallel_equals_sequential(tmp_path: Path) -> None:
    """The two CPU runs in worker processes give the numbers one process gives."""
    par = demo.main(demo.parse_args([*SMOKE, "--out", str(tmp_path / "par")]))
    seq = demo.main(demo.parse_args([*SMOKE, "--out", str(tmp_path / "seq"), "--no-parallel"]))
    for run in ("baseline", "anm"):
        assert par[run]["curves"] == seq[run]["curves"]
        assert par[run]["sinusoid"] == seq[run]["sinusoid"]
