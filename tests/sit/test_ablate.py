"""Tests of examples/sit/ablate*.py: alpha scaling, steps-to-baseline, the arm grid, budgets, records, a smoke run."""

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import ablate
import pytest
import torch
from ablation import arms as ablate_arms
from ablation import records as ablate_records
from ablation import report as ablate_report
from dinov2s import save_tiny_dinov2
from modeling.alpha_scaling import matched_alpha
from runtime.cli import UsageError

import anm

# ----------------------------------------------------------------------------- alpha scaling


def test_matched_alpha_keeps_the_per_feature_rms():
    assert matched_alpha(70.0, 1152) == pytest.approx(70.0)
    assert matched_alpha(70.0, 64) == pytest.approx(70.0 * math.sqrt(64 / 1152))
    assert matched_alpha(70.0, 64) == pytest.approx(16.499, abs=1e-3)  # the demo's alpha (D=64)
    for width in (384, 1152):  # the demo's GPU width, the paper's width
        assert matched_alpha(70.0, width) / math.sqrt(width) == pytest.approx(70 / math.sqrt(1152))
    # Same RMS per feature at both widths: alpha / sqrt(D) is constant.
    assert matched_alpha(70.0, 64) / math.sqrt(64) == pytest.approx(70.0 / math.sqrt(1152))


def test_arm_alpha_used_per_scaling():
    assert ablate_arms.Arm("a", alpha=50.0, scaling="raw").alpha_used(64) == 50.0
    matched = ablate_arms.Arm("a", alpha=50.0, scaling="matched")
    assert matched.alpha_used(64) == pytest.approx(50 * math.sqrt(64 / 1152))
    rms = ablate_arms.Arm("a", alpha=70.0, scaling="rms")
    assert rms.reduce == "rms" and rms.alpha_used(64) == pytest.approx(70 / math.sqrt(1152))
    assert ablate_arms.Arm("a", scaling="matched").reduce == "l2"


def test_rms_arm_is_the_matched_l2_arm_up_to_scale():
    # reduce="rms" at alpha/sqrt(1152) and reduce="l2" at the matched alpha give the same loss.
    h = torch.randn(4, 16, 64) * 1.7
    hidden = h.shape[-1]
    l2 = anm.anm_loss(anm.activation_norms(h, "l2"), alpha=matched_alpha(70.0, hidden))
    rms = anm.anm_loss(anm.activation_norms(h, "rms"), alpha=ablate_arms.Arm("r", scaling="rms").alpha_used(hidden))
    raw = anm.anm_loss(anm.activation_norms(h, "l2"), alpha=70.0)
    assert rms.item() == pytest.approx(l2.item(), rel=1e-5)
    assert raw.item() > l2.item()  # the raw alpha pushes harder on a narrow model


# ----------------------------------------------------------------------------- steps to baseline


def test_seed_speedup_interpolates_in_log_steps():
    base = dict(steps=[0, 10, 20, 40], heldout=[1.0, 0.8, 0.6, 0.5])
    # The arm crosses the baseline's final 0.5 halfway (in value) between steps 10 and 20: at 10·√2.
    arm = dict(steps=[0, 10, 20, 40], heldout=[1.0, 0.6, 0.4, 0.3])
    result = ablate_report.seed_speedup(arm, base)
    assert result["steps"] == pytest.approx(10 * math.sqrt(2)) and result["baseline_steps"] == 40
    assert result["speedup"] == pytest.approx(40 / (10 * math.sqrt(2))) and result["speedup_bound"] is None
    # The baseline never gets to the arm's final 0.3 within its 40 steps: no ratio, a lower bound.
    assert result["equiv"] is None and result["equiv_ratio"] is None
    assert result["equiv_bound"] == dict(relation=">", factor=1.0)
    # NaN evaluations are skipped, and step 0 (no log scale) is never a crossing.
    nan_arm = dict(steps=[0, 10, 20, 40], heldout=[0.1, float("nan"), 0.6, 0.45])
    assert ablate_report.seed_speedup(nan_arm, base)["steps"] == pytest.approx(20 * 2 ** (0.1 / 0.15))


def test_speedup_stats():
    base = {
        0: dict(steps=[0, 50, 100], heldout=[1.0, 0.7, 0.5]),
        1: dict(steps=[0, 50, 100], heldout=[1.0, 0.45, 0.5]),
    }  # seed 1 reaches its final value early
    arm = {
        0: dict(steps=[0, 50, 100], heldout=[1.0, 0.5, 0.4]),
        1: dict(steps=[0, 50, 100], heldout=[1.0, 0.8, 0.6]),
    }
    stats = ablate_report.speedup_stats(arm, base)
    # Seed 0 meets the baseline's final 0.5 at its first evaluation after step 0: the crossing is at step 50
    # or before, so the speed-up is at least 100 / 50.
    assert stats["per_seed"][0] == dict(steps=50.0, baseline_steps=100, speedup=2.0,
                                        speedup_bound=dict(relation=">=", factor=2.0), equiv=None,
                                        equiv_ratio=None, equiv_bound=dict(relation=">", factor=1.0))
    assert stats["per_seed"][1] == dict(steps=None, baseline_steps=100, speedup=None,
                                        speedup_bound=dict(relation="<", factor=1.0), equiv=50.0,
                                        equiv_ratio=0.5, equiv_bound=dict(relation="<=", factor=0.5))
    assert stats["reached"] == 1 and stats["seeds"] == 2
    assert stats["speedup_mean"] == stats["speedup_min"] == stats["speedup_max"] == 2.0
    assert stats["equiv_ratio_mean"] is None  # seed 0 is ahead of the whole baseline curve
    # A slower arm: the baseline got to its final loss in half the steps (seed 0). Seed 1 made no progress:
    # step 0 is not used, so the baseline's first evaluation (50) bounds it: ratio <= 0.5 (it was 0 / 100
    # when step 0 counted).
    slow = {
        0: dict(steps=[0, 50, 100], heldout=[1.0, 0.9, 0.7]),
        1: dict(steps=[0, 50, 100], heldout=[1, 1, 1]),
    }
    stats = ablate_report.speedup_stats(slow, base)
    assert stats["reached"] == 0 and stats["speedup_mean"] is None
    assert (stats["equiv_ratio_mean"], stats["equiv_ratio_min"]) == (0.5, 0.5)
    assert stats["per_seed"][1]["equiv_bound"] == dict(relation="<=", factor=0.5)
    # A baseline that improves to its last evaluation, against itself, is a speed-up of exactly 1.
    assert ablate_report.speedup_stats({0: base[0]}, {0: base[0]})["speedup_mean"] == 1.0


# ----------------------------------------------------------------------------- the grid


def test_build_arms_covers_the_supplement_grids_and_form_study():
    arms = ablate_arms.build_arms()
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) and names[0] == "baseline" and not arms[0].anm
    for scaling in ("raw", "matched"):
        for alpha in ablate_arms.ALPHA_GRID:
            assert ablate_arms.arm_name(scaling, alpha, 10.0) in names
        for lam in ablate_arms.LAMBDA_GRID:
            assert ablate_arms.arm_name(scaling, 70.0, lam) in names
    default = next(a for a in arms if a.name == "matched_a70_l10")
    fields = ("site", "scaling", "objective", "granularity", "warmup_frac")
    form = [a for a in arms if a.name.startswith("matched_a70_l10_") or a.scaling == "rms"]
    assert {a.site for a in form} >= {"output"} and {a.granularity for a in form} >= {"sample", "batch"}
    assert {a.objective for a in form} >= {"exp"} and {a.warmup_frac for a in form} >= {0.0, 0.5}
    for a in form:  # one factor at a time
        assert sum(getattr(a, f) != getattr(default, f) for f in fields) == 1, a.name


def test_select_arms_keeps_grid_order_and_names_unknown_arms():
    assert [a.name for a in ablate_arms.select_arms(["matched_a70_l10", "baseline"])] == ["baseline",
                                                                                           "matched_a70_l10"]
    assert len(ablate_arms.select_arms(None)) == len(ablate_arms.build_arms())
    with pytest.raises(ValueError, match="nope"):
        ablate_arms.select_arms(["baseline", "nope"])


def test_dispersive_search_changes_one_factor_at_a_time_and_is_selectable_by_name():
    default = next(a for a in ablate_arms.build_arms() if a.name == ablate_arms.DISPERSIVE_ARM)
    search = ablate_arms.dispersive_search_arms()
    names = [a.name for a in search]
    assert len(names) == len(set(names)) and not set(names) & {a.name for a in ablate_arms.build_arms()}
    fields = ("disp_lambda", "disp_tau", "disp_distance", "disp_block")
    for a in search:
        assert a.dispersive and not a.anm, a.name
        assert sum(getattr(a, f) != getattr(default, f) for f in fields) == 1, a.name
    by_name = {a.name: a for a in search}
    assert by_name["dispersive_l0.1"].disp_lambda == 0.1 and by_name["dispersive_t2"].disp_tau == 2.0
    assert by_name["dispersive_cos"].disp_distance == "cosine"
    assert (by_name["dispersive_first"].disp_block, by_name["dispersive_last"].disp_block) == ("0", "-1")
    assert {a.disp_lambda for a in search} >= {0.05, 0.1, 0.25} and {a.disp_tau for a in search} >= {1.0, 2.0}
    # The arm set: the baseline, the paper's setting and the search, all known to select_arms.
    chosen = ablate_arms.select_arms(ablate_arms.set_arm_names("dispersive"))
    assert [a.name for a in chosen] == ["baseline", "dispersive", *names]
    assert len(ablate_arms.select_arms(None)) == len(ablate_arms.build_arms())  # the default run is unchanged
    # The second round: the same changes from the cosine arm.
    cos = next(a for a in search if a.name == ablate_arms.COSINE_ARM)
    second = ablate_arms.dispersive_search_arms("cosine")
    assert all(a.disp_distance == "cosine" and a.name.startswith("dispersive_cos_") for a in second)
    for a in second:
        assert sum(getattr(a, f) != getattr(cos, f) for f in fields) == 1, a.name
    chosen = ablate_arms.select_arms(ablate_arms.set_arm_names("dispersive-cos"))
    assert [a.name for a in chosen] == ["baseline", "dispersive", "dispersive_cos", *(a.name for a in second)]
    with pytest.raises(ValueError, match="unknown arm set"):
        ablate_arms.set_arm_names("nope")


# ----------------------------------------------------------------------------- budgets and records


def test_budget_and_arms_from_the_command_line():
    args = ablate.parse_args(["--budget", "cpu", "--hidden", "128", "--depth", "4", "--heads", "8", "--lr", "1e-4",
                              "--batch", "64", "--steps", "1600", "--search", "dispersive"])
    budget = ablate.budget_from_args(args)
    cpu = ablate_arms.BUDGETS["cpu"]
    assert (budget.hidden, budget.depth, budget.heads, budget.lr, budget.steps) == (128, 4, 8, 1e-4, 1600)
    assert (budget.batch, budget.image_size, budget.name) == (64, cpu.image_size, "cpu")
    assert budget.cache_key() != replace(cpu, steps=1600).cache_key()  # a changed model is another cache entry
    assert [a.name for a in ablate.arms_from_args(args, budget)] == list(ablate_arms.ARM_SETS["dispersive"])
    assert ablate.budget_from_args(ablate.parse_args(["--budget", "cpu"])) == cpu


def test_cache_key_leaves_out_arms_and_workers_only():
    cpu = ablate_arms.BUDGETS["cpu"]
    key = cpu.cache_key()
    assert key["budget"] == "cpu" and key["seeds"] == [0, 1, 2] and key["steps"] == 400
    assert "arms" not in key and "workers" not in key and "name" not in key
    assert replace(cpu, workers=7, arms=("baseline",)).cache_key() == key
    assert replace(cpu, steps=401).cache_key() != key


def test_read_record_only_returns_records_of_the_same_config(tmp_path):
    smoke = ablate_arms.BUDGETS["smoke"]
    record = dict(dataset="sinusoid", seed=0, name="baseline", config=smoke.cache_key(), heldout=[1.0])
    path = ablate_records.write_record(str(tmp_path), record)
    assert path == ablate_records.run_path(str(tmp_path), "sinusoid", 0, "baseline")
    assert ablate_records.read_record(str(tmp_path), "sinusoid", 0, "baseline", smoke)["heldout"] == [1.0]
    assert ablate_records.read_record(str(tmp_path), "sinusoid", 0, "baseline", replace(smoke, steps=13)) is None
    assert ablate_records.read_record(str(tmp_path), "sinusoid", 1, "baseline", smoke) is None
    runs = ablate_records.load_runs(str(tmp_path), smoke, ablate_arms.select_arms(["baseline", "matched_a70_l10"]))
    assert list(runs["sinusoid"]) == ["baseline"] and list(runs["sinusoid"]["baseline"]) == [0]


@pytest.mark.parametrize("argv, message", [(["--arms", "nope"], "unknown arms"),
                                           (["--steps", "0"], "--steps must be > 0"),
                                           (["--seeds", "-1"], "--seeds must be in"),
                                           (["--device", "mps"], "cpu or cuda only"),
                                           (["--hidden", "0"], "--hidden must be > 0"),
                                           (["--batch", "0"], "--batch must be > 0"),
                                           (["--lr", "-1"], "--lr must be a finite number > 0"),
                                           (["--hidden", "30", "--heads", "4"], "must be a multiple of"),
                                           (["--search", "dispersive", "--arms", "baseline"], "give one")])
def test_bad_arguments_are_usage_errors_that_create_nothing(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=message):
        ablate.main(ablate.parse_args(["--budget", "smoke", "--out", str(out), *argv]))
    assert not out.exists()


# ----------------------------------------------------------------------------- smoke run


def _run(out, **overrides):
    args = ablate.parse_args(["--budget", "smoke", "--out", str(out)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return ablate.main(args)


def _record(out, arm):
    with open(ablate_records.run_path(str(out), "sinusoid", 0, arm)) as f:
        return json.load(f)


def test_smoke_run_writes_outputs_and_arms_share_init_and_data(tmp_path):
    summary = _run(tmp_path / "a")
    out = tmp_path / "a"
    for name in ("tables.md", "runs.csv", "summary.json", "curves.png", "grids.png", "norms.png"):
        assert (out / name).exists(), name
    base, arm = _record(out, "baseline"), _record(out, "matched_a70_l10")
    assert base["init_checksum"] == arm["init_checksum"] == base["base_init_checksum"]
    assert base["data_checksum"] == arm["data_checksum"] != 0
    assert len(base["heldout"]) == len(base["steps"]) == 4 and base["steps"][-1] == 12
    assert base["heldout"][0] == arm["heldout"][0]  # same weights, same fixed held-out noise and t
    assert arm["heldout"][-1] != base["heldout"][-1]  # ... and the ANM term did change the training
    assert len(arm["norm_update"][-1]) == 2 and 0.0 <= arm["frac_below"][-1] <= 1.0
    assert "frechet" in arm["sample_metric"]
    assert set(summary["sinusoid"]) == {"baseline", "matched_a70_l10"}
    assert "Tab. 3" in (out / "tables.md").read_text()

    # Cached: a second call trains nothing.
    mtime = os.path.getmtime(ablate_records.run_path(str(out), "sinusoid", 0, "baseline"))
    _run(out, no_plots=True)
    assert os.path.getmtime(ablate_records.run_path(str(out), "sinusoid", 0, "baseline")) == mtime

    # Trained alone, an arm sees the same initial weights and data as in the lockstep group.
    _run(tmp_path / "b", arms=["matched_a70_l10"], no_plots=True)
    alone = _record(tmp_path / "b", "matched_a70_l10")
    assert alone["init_checksum"] == arm["init_checksum"] and alone["data_checksum"] == arm["data_checksum"]
    assert alone["heldout"] == pytest.approx(arm["heldout"], rel=1e-5)


def test_an_out_that_is_a_file_is_a_usage_error(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("kept")
    with pytest.raises(UsageError, match="is a file, not a folder; choose another --out"):
        ablate.main(ablate.parse_args(["--budget", "smoke", "--out", str(out)]))
    assert out.read_text() == "kept"


def test_dispersive_arms_train_in_lockstep_and_get_their_table(tmp_path):
    """Dispersive Loss alone and beside the default ANM arm: same initial weights and data as the baseline,
    a training the term changes, and a table of their own in tables.md."""
    names = ["baseline", "dispersive", "dispersive+anm"]
    arms = {a.name: a for a in ablate_arms.select_arms(names)}
    assert arms["dispersive"].dispersive and not arms["dispersive"].anm and arms["dispersive+anm"].anm
    summary = _run(tmp_path, arms=names, no_plots=True)
    base, disp, both = (_record(tmp_path, name) for name in names)
    assert base["init_checksum"] == disp["init_checksum"] == both["init_checksum"]
    assert base["data_checksum"] == disp["data_checksum"] == both["data_checksum"] != 0
    assert base["heldout"][0] == disp["heldout"][0] and disp["heldout"][-1] != base["heldout"][-1]
    assert disp["anm_loss"][-1] < 0  # the regulariser column holds lambda * L_disp (<= 0) for this arm
    assert set(summary["sinusoid"]) == set(names)
    assert "Beside Dispersive Loss" in (tmp_path / "tables.md").read_text()


def test_search_arms_train_their_own_block_and_distance(tmp_path):
    """The block and distance of a search arm reach the training: the first block's and the cosine term
    train otherwise than the paper's setting, from the same weights and data; runs.csv names the settings."""
    names = ["baseline", "dispersive", "dispersive_first", "dispersive_cos"]
    summary = _run(tmp_path, arms=names, no_plots=True)
    base, disp, first, cos = (_record(tmp_path, name) for name in names)
    assert base["init_checksum"] == first["init_checksum"] == cos["init_checksum"]
    assert base["data_checksum"] == first["data_checksum"] == cos["data_checksum"] != 0
    assert first["arm"]["disp_block"] == "0" and cos["arm"]["disp_distance"] == "cosine"
    assert len({disp["heldout"][-1], first["heldout"][-1], cos["heldout"][-1], base["heldout"][-1]}) == 4
    # Cosine: D = -cos, so L_disp lies in [1/tau - log N, 1/tau] (N = 8); L2's lies in [-log N, 0].
    assert 2 - math.log(8) <= cos["anm_loss"][-1] / 0.5 <= 2 and disp["anm_loss"][-1] <= 0
    assert set(summary["sinusoid"]) == set(names)
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert "disp_distance" in rows[0] and any(",cosine,middle," in row for row in rows)
    assert any(",l2,0," in row for row in rows)
    assert "dispersive_first (L_disp λ=0.5, τ=0.5, l2, block 0)" in (tmp_path / "tables.md").read_text()


# ----------------------------------------------------------------------------- REPA arms


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    """A random 1-layer DINOv2 with 4-pixel patches for the smoke budget's 8-pixel images."""
    pytest.importorskip("transformers")
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"), image_size=8)


def test_repa_arms_train_in_lockstep_and_get_their_table(tmp_path, tiny_dinov2):
    names = ["baseline", "repa", "repa+anm", "repa_l0.05"]
    summary = _run(tmp_path, arms=names, repa_encoder=tiny_dinov2, no_plots=True)
    base, repa, both, weak = (_record(tmp_path, name) for name in names)
    assert base["init_checksum"] == repa["init_checksum"] == both["init_checksum"]
    assert base["data_checksum"] == repa["data_checksum"] == weak["data_checksum"] != 0
    assert base["heldout"][0] == repa["heldout"][0]
    assert len({base["heldout"][-1], repa["heldout"][-1], weak["heldout"][-1]}) == 3  # the term changes training
    assert -0.5 <= repa["anm_loss"][-1] <= 0.5 and abs(weak["anm_loss"][-1]) <= 0.05  # lambda * (-cos)
    assert repa["config"]["repa_encoder"] == tiny_dinov2 and set(summary["sinusoid"]) == set(names)
    tables = (tmp_path / "tables.md").read_text()
    assert "## Beside REPA" in tables and "repa+anm (REPA λ=0.5 + ANM default)" in tables
    assert ",0.05," in (tmp_path / "runs.csv").read_text()


def test_arms_without_repa_are_cached_whatever_the_encoder(tmp_path, tiny_dinov2):
    """A baseline does not depend on the encoder (its own stream, init and steps): one trained beside REPA
    arms equals one trained alone, and either serves the other search without training again."""
    def record_bytes(out):
        return Path(ablate_records.run_path(str(out), "sinusoid", 0, "baseline")).read_bytes()

    _run(tmp_path / "alone", arms=["baseline"], no_plots=True)
    _run(tmp_path / "beside", arms=["baseline", "repa"], repa_encoder=tiny_dinov2, no_plots=True)
    alone, beside = _record(tmp_path / "alone", "baseline"), _record(tmp_path / "beside", "baseline")
    for key in ("heldout", "train_loss", "data_checksum", "init_checksum", "config"):
        assert alone[key] == beside[key], key
    assert _record(tmp_path / "beside", "repa")["config"]["repa_encoder"] == tiny_dinov2
    before = record_bytes(tmp_path / "beside")
    _run(tmp_path / "beside", arms=["baseline"], no_plots=True)  # no encoder now: the baseline is reused
    assert record_bytes(tmp_path / "beside") == before  # a retrain would rewrite its wall times
    before = record_bytes(tmp_path / "alone")
    _run(tmp_path / "alone", arms=["baseline", "repa"], repa_encoder=tiny_dinov2, no_plots=True)
    assert record_bytes(tmp_path / "alone") == before and (tmp_path / "alone" / "runs" / "sinusoid" / "seed0" /
                                                            "repa.json").exists()
    other = ablate_arms.BUDGETS["smoke"]
    assert other.cache_key(uses_encoder=False) == replace(other, repa_encoder="/x").cache_key(uses_encoder=False)
    assert replace(other, repa_encoder="/x").cache_key() != other.cache_key()


@pytest.mark.parametrize("argv, message", [
    (["--arms", "baseline", "repa"], "need --repa-encoder PATH"),
    (["--repa-encoder", "ENC"], "--repa-encoder would be ignored: no REPA arm"),
    (["--search", "repa", "--repa-encoder", "/nowhere"], "--repa-encoder /nowhere: no transformers model folder"),
])
def test_repa_refusals_are_one_line_and_create_nothing(tmp_path, tiny_dinov2, argv, message):
    out = tmp_path / "out"
    argv = [tiny_dinov2 if arg == "ENC" else arg for arg in argv]
    with pytest.raises(UsageError, match=message) as error:
        ablate.main(ablate.parse_args(["--budget", "smoke", "--out", str(out), *argv]))
    assert "\n" not in str(error.value) and not out.exists()


def test_the_stand_in_encoder_is_trained_once_and_recorded(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from ablation import stand_in
    from data.fashion_mnist import FASHION_MNIST_ROOT

    if not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST is not installed (Debian's dataset-fashion-mnist)")
    real = stand_in.train_stand_in
    calls = []
    monkeypatch.setattr(ablate, "train_stand_in", lambda path, size: calls.append(path) or real(path, size, steps=2,
                                                                                                  batch=4))
    summary_path = tmp_path / "summary.json"
    _run(tmp_path, arms=["baseline", "repa"], repa_encoder="stand-in", no_plots=True)
    trained = json.loads(summary_path.read_text())["meta"]["repa_encoder"]["stand_in"]
    weights = next((tmp_path / "stand_in_encoder").glob("*.safetensors")).read_bytes()
    _run(tmp_path, arms=["baseline", "repa"], repa_encoder="stand-in", no_plots=True)  # cached: nothing retrained
    record = json.loads(summary_path.read_text())["meta"]["repa_encoder"]
    assert record["stand_in"] == trained  # its "seconds" would differ had it trained again
    assert next((tmp_path / "stand_in_encoder").glob("*.safetensors")).read_bytes() == weights
    assert record["path"] == str(tmp_path / "stand_in_encoder") and calls == [record["path"]] * 2
    assert record["stand_in"]["steps"] == 2 and 0 <= record["stand_in"]["test_accuracy"] <= 1
    assert (tmp_path / "stand_in_encoder" / "config.json").exists()


def test_a_dispersive_arm_of_weight_zero_trains_exactly_as_the_baseline(tmp_path):
    """The term's hooks change nothing but the loss: at λ = 0 (L2 and cosine) the arm's held-out curve is the
    baseline's, bit for bit, and its regulariser column is 0."""
    from ablation.lockstep import Job, train_group

    smoke = ablate_arms.BUDGETS["smoke"]
    zero = ablate_arms.Arm("disp0", anm=False, dispersive=True, disp_lambda=0.0)
    arms = (ablate_arms.Arm("baseline", anm=False), zero,
            replace(zero, name="disp0_cos_last", disp_distance="cosine", disp_block="-1"))
    paths = train_group(Job(smoke, "sinusoid", 0, arms, str(tmp_path), "cpu"))
    base, *zeros = (json.load(open(path)) for path in paths)
    for record in zeros:
        assert record["heldout"] == base["heldout"] and record["sample_metric"] == base["sample_metric"]
        assert all(value == 0.0 for value in record["anm_loss"][1:])
