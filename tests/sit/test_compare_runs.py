"""compare_runs.py: train.py run folders with synthetic curves of known speed-up, grouped into arms by seed,
the refusals (one line, nothing written), and the three outputs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import compare_runs
import pytest
import train
from PIL import Image
from runtime.cli import UsageError
from runtime.run_flags import saved_args
from runtime.run_log import MetricLog

SCRIPT = Path(compare_runs.__file__)
METRIC = "heldout_fm_loss_ema"
EVAL_STEPS = list(range(20, 201, 20))  # every --eval-every 20 steps up to 200
ANM = ["--anm", "--anm-alpha", "5", "--anm-warmup", "10"]


def loss(step: int, shift: float = 1.0) -> float:
    """A held-out loss falling like a − b·log(step); ``shift`` times fewer steps reach each value."""
    return 2.0 - 0.2 * math.log(shift * step) if step > 0 else 2.5


def make_run(root: Path, name: str, flags: list[str] = (), seed: int = 0, shift: float = 1.0,
             metric: str = METRIC, value=loss, extra_args: dict | None = None) -> str:
    """A run folder as train.py writes it: args.json from train.py's own parser, log.csv through its logger
    (training rows every 10 steps, held-out rows at step 0 and every 20 steps, so half the rows have an
    empty held-out cell)."""
    argv = ["--data", "sinusoid", "--model", "SiT-N/2", "--image-size", "8", "--results-dir", str(root),
            "--exp-name", name, "--global-seed", str(seed), "--max-steps", "200", "--log-every", "10",
            "--eval-every", "20", "--eval-samples", "8", "--num-workers", "0", *flags]
    args = train.parse_args(argv)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(saved_args(args) | (extra_args or {}), indent=1))
    log = MetricLog(args, str(folder), None, rank=0)
    log.write(dict(step=0, epoch=0, **{metric: value(0, shift)}))
    for step in range(10, 201, 10):
        row = dict(step=step, epoch=0, fm_loss=1.0 / step, anm_loss=0.0, loss=1.0 / step)
        if step in EVAL_STEPS:
            row[metric] = value(step, shift)
        log.write(row)
    log.close()
    return str(folder)


def compare(runs: list[str], baseline: list[str], out: Path, *extra: str, metric: str = METRIC) -> dict:
    return compare_runs.main(compare_runs.parse_args([*runs, "--baseline", *baseline, "--metric", metric,
                                                      "--out", str(out), *extra]))


def test_a_shift_by_two_in_steps_is_a_factor_two_in_both_directions(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    arm = make_run(tmp_path, "anm", ANM, shift=2.0)
    result = compare([arm], [base], tmp_path / "out")
    (entry,) = result["arms"]
    assert entry["label"] == "anm (anm_alpha=5, anm_warmup=10)"
    assert entry["differs"]["--anm"] == dict(baseline=False, arm=True)
    # Empty held-out cells and the step-0 row are skipped: the curves hold the evaluations at steps > 0.
    assert entry["curve"]["step"] == EVAL_STEPS == result["baseline"]["curve"]["step"]
    forward = entry["arm_reaches_baseline"]  # the arm reaches the baseline's value at S at S / 2
    for e in forward:
        if e["bound"] is None:
            assert e["factor"] == pytest.approx(2.0, rel=1e-12) and e["reached_at"] == pytest.approx(e["step"] / 2)
    assert sum(e["bound"] is None for e in forward) == 8  # S = 60 ... 200; at S = 20, 40 the arm starts there
    backward = entry["baseline_reaches_arm"]
    assert [e["factor"] for e in backward[:5]] == pytest.approx([2.0] * 5, rel=1e-12)  # s = 20 ... 100
    for e in backward[5:]:  # the baseline would need 2s > 200 steps: not reached, factor > 200 / s
        assert e["reached_at"] is None and e["factor"] is None
        assert e["bound"] == dict(relation=">", factor=pytest.approx(200 / e["step"]))
    assert entry["summary"]["arm_reaches_baseline"]["factor"] == pytest.approx(2.0)
    assert entry["summary"]["baseline_reaches_arm"] == backward[-1]


def test_outputs_and_the_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = compare([make_run(tmp_path, "anm", ANM, shift=0.5)], [make_run(tmp_path, "base")], out)
    assert sorted(os.listdir(out)) == ["curves.png", "speedup.json", "speedup.md"]
    assert json.loads((out / "speedup.json").read_text()) == json.loads(json.dumps(result))
    assert {"metric", "higher_is_better", "method", "baseline", "arms", "warnings"} <= set(result)
    assert result["metric"] == METRIC and result["higher_is_better"] is False and result["warnings"] == []
    (arm,) = result["arms"]
    assert {"label", "runs", "seeds", "differs", "curve", "arm_reaches_baseline", "baseline_reaches_arm",
            "summary", "per_seed"} <= set(arm)
    for direction in ("arm_reaches_baseline", "baseline_reaches_arm"):
        for entry in arm[direction]:
            assert set(entry) == {"step", "value", "reached_at", "factor", "bound"}
    assert arm["per_seed"]["seeds"] == [0] and set(arm["per_seed"]["by_seed"]) == {"0"}
    # Twice as slow: the arm never reaches the baseline's final value; the baseline reached the arm's at 100.
    summary = arm["summary"]
    assert summary["arm_reaches_baseline"]["factor"] is None
    assert summary["arm_reaches_baseline"]["bound"] == dict(relation="<", factor=1.0)
    assert summary["baseline_reaches_arm"]["factor"] == pytest.approx(0.5)
    text = (out / "speedup.md").read_text()
    assert "does not reach the baseline's final value, 0.9403 at step 200, within its logged steps: factor < 1.00" \
        in text
    assert "the baseline reaches the final value of anm (anm_alpha=5, anm_warmup=10)" in text and "×0.50" in text
    assert "| baseline step S | baseline value | arm reaches it at step s | factor |" in text
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()


def test_seeds_make_one_arm_and_pair_up(tmp_path: Path) -> None:
    shifts = {0: 1.5, 1: 2.0, 2: 2.5}  # seed k of the arm is shifts[k] times faster than the baseline's seed k
    base = [make_run(tmp_path, f"base-s{s}", seed=s, flags=["--log-every", str(5 * (s + 1))]) for s in shifts]
    arms = [make_run(tmp_path / "elsewhere", f"anm-s{s}", ANM, seed=s, shift=k) for s, k in shifts.items()]
    result = compare(arms, base, tmp_path / "out")
    (arm,) = result["arms"]  # another results folder, name and cadence do not make another arm
    assert arm["seeds"] == [0, 1, 2] and result["baseline"]["seeds"] == [0, 1, 2]
    stats = arm["per_seed"]["summary"]["arm_reaches_baseline"]
    assert (stats["reached"], stats["pairs"]) == (3, 3)
    assert (stats["mean"], stats["min"], stats["max"]) == pytest.approx((2.0, 1.5, 2.5), rel=1e-9)
    per_seed = arm["per_seed"]["by_seed"]["2"]["summary"]["arm_reaches_baseline"]
    assert per_seed["factor"] == pytest.approx(2.5) and per_seed["reached_at"] == pytest.approx(80)
    # The headline uses the mean curves over the seeds.
    assert arm["curve"]["value"][0] == pytest.approx(sum(loss(20, k) for k in shifts.values()) / 3)
    assert "Per seed pair (seeds 0, 1, 2)" in (tmp_path / "out" / "speedup.md").read_text()


def test_two_settings_are_two_arms_labelled_by_what_differs(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    result = compare([make_run(tmp_path, "a", ANM, shift=2.0), make_run(tmp_path, "b", [*ANM[:-1], "20"])],
                     [base], tmp_path / "out")
    assert [a["label"] for a in result["arms"]] == ["anm (anm_alpha=5, anm_warmup=10)",
                                                    "anm (anm_alpha=5, anm_warmup=20)"]


def test_higher_is_better(tmp_path: Path) -> None:
    def recall(step: int, shift: float) -> float:
        return 0.05 * math.log(shift * step) if step > 0 else 0.0

    base = make_run(tmp_path, "base", metric="recall", value=recall)
    arm = make_run(tmp_path, "anm", ANM, shift=2.0, metric="recall", value=recall)
    result = compare([arm], [base], tmp_path / "out", "--higher-is-better", metric="recall")
    assert result["arms"][0]["summary"]["arm_reaches_baseline"]["factor"] == pytest.approx(2.0)
    assert "(higher is better)" in (tmp_path / "out" / "speedup.md").read_text()


def test_a_repeated_step_keeps_its_last_row(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    arm = make_run(tmp_path, "anm", ANM)
    with open(Path(arm) / "log.csv", "a") as f:  # the last row for step 200 says the arm got there faster
        f.write(f"200,0,,,,,,,,{loss(200, 2.0)},\n")
    result = compare([arm], [base], tmp_path / "out")
    assert result["arms"][0]["curve"]["value"][-1] == pytest.approx(loss(200, 2.0))


@pytest.mark.parametrize("flag, value", [("--lr", "0.0002"), ("--global-batch-size", "128"), ("--ema-decay", "0.99"),
                                         ("--eval-samples", "16"), ("--model", "SiT-T/2")])
def test_runs_that_are_not_comparable_are_refused_naming_the_flag_and_both_values(tmp_path: Path, flag: str,
                                                                                     value: str) -> None:
    base = make_run(tmp_path, "base")
    arm = make_run(tmp_path, "anm", [*ANM, flag, value])
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="not comparable") as refused:
        compare([arm], [base], out)
    assert flag in str(refused.value) and "--force" in str(refused.value)
    assert not out.exists()
    if flag == "--lr":
        assert "0.0001" in str(refused.value) and "0.0002" in str(refused.value)


def test_force_compares_anyway_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, arm = make_run(tmp_path, "base"), make_run(tmp_path, "anm", [*ANM, "--lr", "0.0002"])
    result = compare([arm], [base], tmp_path / "out", "--force")
    assert result["forced_differences"][0]["flag"] == "--lr"
    assert len(result["warnings"]) == 1 and "--lr" in result["warnings"][0]
    assert "warning: --lr differs" in capsys.readouterr().out
    assert "**Warning:** --lr differs" in (tmp_path / "out" / "speedup.md").read_text()


def test_sampler_settings_matter_only_to_sample_metrics(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base", extra_args=dict(fid_num_steps=50, fid_samples=1000))
    arm = make_run(tmp_path, "anm", ANM, extra_args=dict(fid_num_steps=25, fid_samples=1000))
    assert compare([arm], [base], tmp_path / "ok")["arms"][0]["label"] == "anm (anm_alpha=5, anm_warmup=10)"
    fid_base = make_run(tmp_path, "fid-base", metric="fid", extra_args=dict(fid_num_steps=50))
    fid_arm = make_run(tmp_path, "fid-anm", ANM, metric="fid", extra_args=dict(fid_num_steps=25))
    with pytest.raises(UsageError, match="--fid-num-steps 50 .* vs 25"):
        compare([fid_arm], [fid_base], tmp_path / "fid", metric="fid")


def test_a_missing_column_is_refused_naming_the_columns_there(tmp_path: Path) -> None:
    base, arm = make_run(tmp_path, "base"), make_run(tmp_path, "anm", ANM)
    with pytest.raises(UsageError, match=r"has no column 'fid'; its columns: step, epoch, fm_loss") as refused:
        compare([arm], [base], tmp_path / "out", metric="fid")
    assert METRIC in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_missing_folders_files_and_short_logs_are_refused(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    with pytest.raises(UsageError, match="no such folder"):
        compare([str(tmp_path / "nope")], [base], tmp_path / "out")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UsageError, match="has no args.json"):
        compare([str(bare)], [base], tmp_path / "out")
    arm = make_run(tmp_path, "anm", ANM)
    os.remove(Path(arm) / "log.csv")
    with pytest.raises(UsageError, match="has no log.csv"):
        compare([arm], [base], tmp_path / "out")
    short = make_run(tmp_path, "short", ANM, value=lambda step, shift: 1.0 if step <= 20 else "")
    with pytest.raises(UsageError, match="has 1 logged value"):
        compare([short], [base], tmp_path / "out")
    # train.py always writes the held-out columns; without --eval-every they stay empty.
    blank = make_run(tmp_path, "blank", ANM, value=lambda step, shift: "")
    with pytest.raises(UsageError, match="has 0 logged value.*only with --eval-every > 0"):
        compare([blank], [base], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_arms_must_be_distinct_settings_with_distinct_seeds(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    with pytest.raises(UsageError, match="pass it with --baseline"):
        compare([make_run(tmp_path, "base-s1", seed=1)], [base], tmp_path / "out")
    with pytest.raises(UsageError, match="same setting with the same --global-seed 0"):
        compare([make_run(tmp_path, "a", ANM), make_run(tmp_path, "a-again", ANM)], [base], tmp_path / "out")
    with pytest.raises(UsageError, match="--baseline runs are not one setting: --anm"):
        compare([make_run(tmp_path, "b", ANM)], [base, make_run(tmp_path, "c", ANM, seed=1)], tmp_path / "out")
    with pytest.raises(UsageError, match="given twice"):
        compare([base], [base], tmp_path / "out")


def test_a_previous_comparison_is_kept_unless_overwrite(tmp_path: Path) -> None:
    base, arm = make_run(tmp_path, "base"), make_run(tmp_path, "anm", ANM)
    out = tmp_path / "out"
    compare([arm], [base], out)
    (out / "speedup.md").write_text("kept")
    with pytest.raises(UsageError, match="holds a previous comparison .* --overwrite"):
        compare([arm], [base], out)
    assert (out / "speedup.md").read_text() == "kept"
    compare([arm], [base], out, "--overwrite")
    assert (out / "speedup.md").read_text().startswith("# Speed-up in steps")


def test_the_script_ends_an_expected_error_with_one_line(tmp_path: Path) -> None:
    base, arm = make_run(tmp_path, "base"), make_run(tmp_path, "anm", [*ANM, "--lr", "0.0002"])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), arm, "--baseline", base, "--metric", METRIC, "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("compare_runs.py: error: the runs are not")


def fid(step: int, shift: float = 1.0) -> float:
    return 80.0 - 10.0 * math.log(shift * step) if step > 0 else 200.0


def add_eval_log(run: str, settings: dict, shift: float = 1.0) -> str:
    """evaluate_run.py's records for a run (its own writers): one settings group, FIDs at steps 50..200."""
    from evaluation import run_metrics

    folder = run_metrics.prepare_folder(run, settings, "/refs/ref.npz")
    for step in (50, 100, 150, 200):
        run_metrics.write_result(folder, step, dict(fid=fid(step, shift), sfid=1.0, precision=0.5, recall=0.5,
                                                    fid_seconds=1.0), f"{run}/checkpoints/{step:07d}.pt", {})
    run_metrics.write_eval_log(run)
    return os.path.basename(folder)


SETTINGS = dict(version=1, samples=10000, ref_fingerprint="abc", mode="sde", num_steps=250, cfg_scale=1.0,
                global_seed=0, num_steps_list=None)


def test_fid_from_evaluate_run_compares_and_settings_must_match(tmp_path: Path) -> None:
    """Runs trained without --fid-every, scored afterwards by evaluate_run.py: compare_runs.py takes their
    eval_log.csv's FIDs, refuses runs scored otherwise (naming the setting), and asks which group to use when
    a run holds several."""
    base, arm = make_run(tmp_path, "base"), make_run(tmp_path, "anm", ANM)
    add_eval_log(base, SETTINGS)
    add_eval_log(arm, SETTINGS, shift=2.0)
    result = compare([arm], [base], tmp_path / "fid", metric="fid")
    final = result["arms"][0]["summary"]["arm_reaches_baseline"]
    assert final["reached_at"] == pytest.approx(100) and final["factor"] == pytest.approx(2.0)  # the FIDs' shift
    other = dict(SETTINGS, num_steps=50)
    digest = add_eval_log(arm, other, shift=2.0)
    with pytest.raises(UsageError, match="holds results of 2 settings.*--fid-settings"):
        compare([arm], [base], tmp_path / "two", metric="fid")
    base_other = make_run(tmp_path, "base-other")
    assert add_eval_log(base_other, other) == digest
    arm_250 = make_run(tmp_path, "anm-250", ANM)
    add_eval_log(arm_250, SETTINGS, shift=2.0)
    with pytest.raises(UsageError, match=r"settings of the sample metrics.*num_steps=50 vs num_steps=250"):
        compare([arm_250], [base_other], tmp_path / "other", metric="fid")
    assert compare([arm], [base_other], tmp_path / "chosen", "--fid-settings", digest, metric="fid")["arms"]
    assert not (tmp_path / "two").exists() and not (tmp_path / "other").exists()
