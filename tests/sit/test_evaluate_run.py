"""evaluate_run.py: the metrics of train.py --fid-every for a run's checkpoints after training; resumable, kept
by settings in the run folder, sharded over gloo ranks (the stub network stands in for Inception)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate_run
import pytest
from evaluation import sample_metrics
from evaluation.sample_metrics import settings_digest
from fid_helpers import LAUNCHER, METRICS, CountingStub, fid_rows
from ports import free_port
from runtime.cli import UsageError
from runtime.preemption import EXIT_PREEMPTED

SETTINGS = ["--fid-samples", "6", "--fid-num-steps", "2", "--fid-per-proc-batch-size", "4", "--fid-cfg-scale", "2.0"]


def evaluate(run: Path, ref: str, *extra: str) -> dict:
    return evaluate_run.main(evaluate_run.parse_args([str(run), "--fid-ref", ref, *SETTINGS, *extra]))


def read_eval_log(run: Path) -> list[dict]:
    with open(run / "eval_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_trained_without_them_gets_the_metrics_of_a_run_trained_with_them(fid_runs, fid_ref, tmp_path,
                                                                                stub_network) -> None:
    run = Path(shutil.copytree(fid_runs["plain"], tmp_path / "plain"))  # the same weights as fid_runs["fid"], no FID
    results = evaluate(run, fid_ref)
    during = fid_rows(fid_runs["fid"])
    assert sorted(results) == [2, 4]
    for step in (2, 4):
        assert [results[step][k] for k in METRICS] == [float(during[step][k]) for k in METRICS]
    digest = settings_digest(json.loads((fid_runs["fid"] / "args.json").read_text())["fid_settings"])
    assert sorted(os.listdir(run / "metrics")) == [digest]  # the settings train.py recorded, the same digest
    assert sorted(os.listdir(run / "metrics" / digest)) == ["0000002.json", "0000004.json", "settings.json"]
    rows = read_eval_log(run)
    assert list(rows[0])[:8] == ["step", "fid", "sfid", "precision", "recall", "fid_seconds", "settings", "checkpoint"]
    assert [(r["step"], r["settings"], r["fid_samples"], r["fid_num_steps"]) for r in rows] == \
        [("2", digest, "6", "2"), ("4", digest, "6", "2")]
    assert rows[0]["fid_ref"] == fid_ref and rows[0]["fid_cfg_channels"] == "3" and rows[0]["fid_network"] == "stub"

    calls, before = len(stub_network.calls), (run / "eval_log.csv").read_bytes()
    assert evaluate(run, fid_ref) == results  # a rerun computes nothing
    assert len(stub_network.calls) == calls and (run / "eval_log.csv").read_bytes() == before

    other = evaluate(run, fid_ref, "--fid-samples", "5", "--steps", "4")  # other settings: a folder of their own
    assert sorted(other) == [4] and other[4]["fid"] != results[4]["fid"]
    assert len(os.listdir(run / "metrics")) == 2
    assert sorted((r["settings"] == digest, r["step"]) for r in read_eval_log(run)) == \
        [(False, "4"), (True, "2"), (True, "4")]


def test_a_stop_signal_drops_the_checkpoint_in_progress_and_the_rerun_finishes(fid_runs, fid_ref, tmp_path,
                                                                               monkeypatch) -> None:
    run = Path(shutil.copytree(fid_runs["plain"], tmp_path / "plain"))
    # Step 2: the reference's 10 batches, then 2 of samples; step 4: the signal comes with its first samples.
    network = CountingStub(signal_at=13)
    monkeypatch.setattr(sample_metrics, "default_extractor", lambda device: network)
    with pytest.raises(SystemExit) as stopped:
        evaluate(run, fid_ref)
    assert stopped.value.code == EXIT_PREEMPTED and len(network.calls) == 13
    (folder,) = (run / "metrics").iterdir()
    assert sorted(os.listdir(folder)) == ["0000002.json", "settings.json"]
    network = CountingStub()
    monkeypatch.setattr(sample_metrics, "default_extractor", lambda device: network)
    results = evaluate(run, fid_ref)
    assert len(network.calls) == 12  # the reference again, and step 4 only
    during = fid_rows(fid_runs["fid"])
    assert [results[4][k] for k in METRICS] == [float(during[4][k]) for k in METRICS]


def test_two_gloo_ranks_give_the_numbers_of_one_process(fid_runs, fid_ref, tmp_path, stub_network) -> None:
    run = Path(shutil.copytree(fid_runs["plain"], tmp_path / "plain"))
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, str(LAUNCHER), "evaluate_run", str(run), "--fid-ref", fid_ref,
                                       *SETTINGS, "--fid-per-proc-batch-size", "3"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    assert "on 2 process(es)" in outputs[0]
    during = fid_rows(fid_runs["fid"])
    for row in read_eval_log(run):
        assert [float(row[k]) for k in METRICS] == [float(during[int(row["step"])][k]) for k in METRICS]
    assert json.loads(next((run / "metrics").iterdir()).joinpath("0000004.json").read_text())["processes"] == 2


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "3"], r"--steps 3: .* has no checkpoint of that step \(it has 2, 4\)"),
    (["--fid-ref", "missing.npz"], "--fid-ref missing.npz does not exist"),
    (["--fid-cfg-channels", "all", "--fid-cfg-scale", "1"], "--fid-cfg-channels is ignored without guidance"),
])
def test_refusals_come_before_anything_is_written(flags, expected, fid_runs, fid_ref, tmp_path, stub_network) -> None:
    run = Path(shutil.copytree(fid_runs["plain"], tmp_path / "plain"))
    with pytest.raises(UsageError, match=expected):
        evaluate_run.main(evaluate_run.parse_args([str(run), "--fid-ref", fid_ref, *SETTINGS, *flags]))
    assert not (run / "metrics").exists() and not (run / "eval_log.csv").exists()
    with pytest.raises(UsageError, match="no train.py run folder"):
        evaluate_run.main(evaluate_run.parse_args([str(tmp_path), "--fid-ref", fid_ref]))
