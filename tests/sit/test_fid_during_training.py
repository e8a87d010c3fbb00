"""train.py --fid-every: FID-N, sFID, precision, recall of the EMA in log.csv, equal to sample_ddp.py +
evaluate.py on the same checkpoint, without changing training; refusals, stops and resumes. The stub feature
network (tests/sit/stub_features.py) stands in for Inception, whose 2048-d square roots take minutes here."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import sample_ddp
import torch
import train
from data.npz import save_npz
from evaluation import sample_metrics
from fid_helpers import FID, LAUNCHER, METRICS, TRAINING, CountingStub, argv, fid_rows, rows
from ports import free_port
from runtime.cli import UsageError
from runtime.preemption import EXIT_PREEMPTED
from stub_features import StubFeatures
from test_train import assert_same_tree


def test_training_is_bit_identical_with_and_without_the_evaluation(fid_runs) -> None:
    for step in ("0000002.pt", "0000004.pt"):
        a, b = (torch.load(fid_runs[k] / "checkpoints" / step, weights_only=True) for k in ("plain", "fid"))
        for key in ("model", "ema", "opt", "rng", "anm", "step", "epoch", "epoch_step"):
            assert_same_tree(a[key], b[key], f"{step}/{key}")  # tensors bit for bit
        assert_same_tree(a["log_state"]["running"], b["log_state"]["running"], "running losses")
    plain, fid = rows(fid_runs["plain"]), rows(fid_runs["fid"])
    columns = [c for c in plain[0] if c in TRAINING or c.startswith("anm/")]
    assert len(columns) > 6
    assert [[row[c] for c in columns] for row in plain] == [[row[c] for c in columns] for row in fid]
    assert sorted(fid_rows(fid_runs["fid"])) == [2, 4] and not fid_rows(fid_runs["plain"])
    row = fid_rows(fid_runs["fid"])[4]
    assert all(np.isfinite(float(row[key])) for key in (*METRICS, "fid_seconds")) and float(row["fid"]) > 0
    log = (fid_runs["fid"] / "log.txt").read_text()
    assert "(step=0000004) FID " in log and "FID-6 of the EMA against" in log and "cfg 2.0 on all 3 channels" in log
    assert "ref.npz holds 40 images: FID compares a 2048-dimensional mean" in log and "--fid-samples 6: fewer" in log
    saved = json.loads((fid_runs["fid"] / "args.json").read_text())
    assert all(key.startswith("fid_") for key in saved if "fid" in key)
    assert saved["fid_num_steps"] == 2 and saved["fid_diffusion_form"] == "sigma" and saved["fid_cfg_channels"] == 3
    assert saved["fid_settings"]["samples"] == 6 and saved["fid_settings"]["network"] == "stub"
    # the default --ema-decay 0.9999 over 4 steps: the EMA is its initialisation
    plain_log = (fid_runs["plain"] / "log.txt").read_text()
    assert "--ema-decay 0.9999 over 4 steps leaves 100% of the initial weights" in plain_log


def test_the_fid_is_sample_ddp_plus_evaluate_on_the_same_checkpoint(fid_runs, fid_ref, tmp_path) -> None:
    npz = sample_ddp.main(sample_ddp.parse_args([
        "--ckpt", str(fid_runs["fid"] / "checkpoints" / "0000004.pt"), "--sample-dir", str(tmp_path),
        "--folder-name", "s", "--num-fid-samples", "6", "--num-steps", "2", "--cfg-scale", "2.0",
        "--per-proc-batch-size", "5"]))
    result = evaluate.main(evaluate.parse_args([npz, "--ref", fid_ref, "--k", "3"]), extractor=StubFeatures())
    row = fid_rows(fid_runs["fid"])[4]
    for key in METRICS:
        assert float(row[key]) == pytest.approx(result[key], rel=1e-12, abs=1e-12), key


REFUSALS = {  # case: (what --fid-ref is, the error)
    "missing": ("nope.npz", "--fid-ref .*nope.npz does not exist: pass an ADM reference batch"),
    "folder": (".", "is a folder: pass an ADM reference batch"),
    "not an npz": ("x.npz", "x.npz is not a readable .npz"),
    "no statistics": ("plain.npz", r"plain.npz holds no statistics \(mu, sigma\).*build_reference.py"),
    "another resolution": ("r16.npz", r"holds 16x16 images, and this run's samples are 8x8.*--image-size 8\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_bad_reference_is_refused_before_the_run_folder_exists(case, fid_ref, tmp_path, stub_network) -> None:
    save_npz(np.zeros((5, 8, 8, 3), np.uint8), str(tmp_path / "plain.npz"))
    save_npz(np.zeros((5, 16, 16, 3), np.uint8), str(tmp_path / "r16.npz"),
             **{k: np.load(fid_ref)[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    (tmp_path / "x.npz").write_text("not a zip")
    name, expected = REFUSALS[case]
    results = tmp_path / "results"
    with pytest.raises(UsageError, match=expected):
        train.main(train.parse_args(argv(results, *FID, "--fid-ref", str(tmp_path / name))))
    assert not results.exists()


FLAG_REFUSALS = [  # (flags, with --fid-ref, the error)
    (["--fid-every", "2"], False, "--fid-every needs --fid-ref"),
    (["--fid-samples", "8"], False, "^--fid-samples would be ignored without --fid-every K"),
    ([*FID[:-2], "--fid-cfg-channels", "2"], True, "^--fid-cfg-channels is ignored without guidance"),
    ([*FID, "--fid-atol", "0.1"], True, "^--fid-atol only applies to the adaptive ODE solvers"),
    ([*FID, "--fid-samples", "3"], True, "^--fid-samples 3: precision and recall"),
]


@pytest.mark.parametrize("flags, with_ref, expected", FLAG_REFUSALS)
def test_fid_flags_that_cannot_work_are_refused_first(flags, with_ref, expected, fid_ref, tmp_path,
                                                      stub_network) -> None:
    results = tmp_path / "results"
    with pytest.raises(UsageError, match=expected):
        train.main(train.parse_args(argv(results, *flags, *(["--fid-ref", fid_ref] if with_ref else []))))
    assert not results.exists()


def test_a_stop_signal_during_the_evaluation_saves_the_step_and_a_resume_evaluates_it(fid_runs, fid_ref, tmp_path,
                                                                                       monkeypatch) -> None:
    # The reference's 40 images take 10 batches of 4, then the samples 2: the signal comes with the first samples.
    network = CountingStub(signal_at=11)
    monkeypatch.setattr(sample_metrics, "default_extractor", lambda device: network)
    with pytest.raises(SystemExit) as stopped:
        train.main(train.parse_args(argv(tmp_path, *FID, "--fid-ref", fid_ref, "--max-steps", "4")))
    assert stopped.value.code == EXIT_PREEMPTED and len(network.calls) == 11  # not one batch more
    run = tmp_path / "run"
    assert [name for name in sorted(os.listdir(run / "checkpoints")) if name.endswith(".pt")] == ["0000002.pt"]
    assert fid_rows(run) == {} and [int(row["step"]) for row in rows(run)] == [0, 2]  # the step's row, no fid
    assert json.loads((run / "stopped.json").read_text())["step"] == 2
    assert "FID evaluation abandoned for a stop signal" in (run / "log.txt").read_text()

    moved = shutil.copy(fid_ref, tmp_path / "moved.npz")  # the same reference elsewhere: the same metric
    resumed = train.main(train.parse_args([*argv(tmp_path), "--resume", "auto", "--fid-ref", str(moved)]))
    straight = torch.load(fid_runs["fid"] / "checkpoints" / "0000004.pt", weights_only=True)
    after = torch.load(resumed["checkpoint"], weights_only=True)
    for key in ("model", "ema", "opt", "rng", "anm"):
        assert_same_tree(after[key], straight[key], key)  # the stop and the caught-up evaluation changed nothing
    expected = fid_rows(fid_runs["fid"])
    assert {step: [row[k] for k in METRICS] for step, row in fid_rows(run).items()} == \
        {step: [row[k] for k in METRICS] for step, row in expected.items()}  # step 2 caught up, in a row of its own
    assert "has no FID of the resumed step" in (run / "log.txt").read_text()
    assert "--fid-every 2" in (run / "log.txt").read_text().split("restored from", 1)[1].splitlines()[0]


def test_a_resume_with_other_metric_settings_is_refused(fid_runs, fid_ref, tmp_path, stub_network) -> None:
    shutil.copytree(fid_runs["fid"], tmp_path / "run")
    before = (tmp_path / "run" / "args.json").read_text()
    for change, named in ((["--fid-num-steps", "3"], "num_steps 2 (now 3)"), (["--fid-mode", "ode"], "--fid-mode"),
                          (["--fid-samples", "7"], "samples 6 (now 7)")):
        pattern = rf"this run's FIDs were computed with other settings \(.*{re.escape(named)}"
        with pytest.raises(UsageError, match=pattern):
            train.main(train.parse_args([*argv(tmp_path), "--max-steps", "6", "--resume", "auto", *change]))
    other = save_npz(np.load(fid_ref)["arr_0"][:30], str(tmp_path / "other.npz"),
                     **{k: np.load(fid_ref)[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    with pytest.raises(UsageError, match="ref_fingerprint"):
        train.main(train.parse_args([*argv(tmp_path), "--max-steps", "6", "--resume", "auto", "--fid-ref", other]))
    assert (tmp_path / "run" / "args.json").read_text() == before


def test_two_gloo_ranks_train_and_evaluate_as_one_process_evaluates_their_checkpoint(fid_ref, tmp_path,
                                                                                      stub_network) -> None:
    """In-training FID on two ranks (samples sharded, features all-gathered) = evaluate_run.py on one process."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, str(LAUNCHER), "train",
                                       *argv(tmp_path, *FID, "--fid-ref", fid_ref, "--max-steps", "2")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    in_training = fid_rows(tmp_path / "run")[2]
    import evaluate_run

    after = evaluate_run.main(evaluate_run.parse_args([str(tmp_path / "run"), "--fid-ref", fid_ref, "--fid-samples",
                                                       "6", "--fid-num-steps", "2", "--fid-cfg-scale", "2.0"]))
    assert [float(in_training[k]) for k in METRICS] == [after[2][k] for k in METRICS]


def test_a_reference_is_read_memory_mapped_or_whole_with_the_same_images(fid_ref, tmp_path) -> None:
    from evaluation.reference_batch import ReferenceBatch

    with np.load(fid_ref) as data:
        arrays = {key: data[key] for key in data.keys()}
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    dims = dict(pool=16, spatial=12)
    stored, compressed = ReferenceBatch.open(fid_ref, dims, 8), ReferenceBatch.open(str(tmp_path / "compressed.npz"),
                                                                                    dims, 8)
    assert isinstance(stored.images(), np.memmap) and not isinstance(compressed.images(), np.memmap)
    assert np.array_equal(stored.images(), arrays["arr_0"]) and np.array_equal(compressed.images(), arrays["arr_0"])
    assert stored.num_images == 40 and stored.fingerprint == compressed.fingerprint  # the content, not its encoding
    moved = shutil.copy(fid_ref, tmp_path / "moved.npz")
    assert ReferenceBatch.open(str(moved), dims, 8).fingerprint == stored.fingerprint
    np.savez(tmp_path / "other.npz", **dict(arrays, mu=arrays["mu"] + 1))
    assert ReferenceBatch.open(str(tmp_path / "other.npz"), dims, 8).fingerprint != stored.fingerprint
