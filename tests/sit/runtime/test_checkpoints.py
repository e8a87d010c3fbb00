"""examples/sit/runtime/checkpoints.py: --keep-last bounds the rolling checkpoints, milestones stay."""
from __future__ import annotations

import json
from pathlib import Path

import train
from runtime.checkpoints import prune_checkpoints


def test_prune_deletes_only_recorded_rolling_checkpoints(tmp_path: Path) -> None:
    for step in (2, 3, 4, 5, 9):
        (tmp_path / f"{step:07d}.pt").write_bytes(b"x")
    assert prune_checkpoints(str(tmp_path), str(tmp_path / "0000004.pt"), rolling=False, keep_last=1) == []
    assert not (tmp_path / "rolling.json").exists()  # a milestone alone records nothing
    for step in (3, 5):
        prune_checkpoints(str(tmp_path), str(tmp_path / f"{step:07d}.pt"), rolling=True, keep_last=1)
    # 3 went when 5 came; 2 (never recorded: a milestone of another --ckpt-every) and 9 (past 5) stay.
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["0000002.pt", "0000004.pt", "0000005.pt", "0000009.pt"]
    assert json.loads((tmp_path / "rolling.json").read_text()) == ["0000005.pt"]
    assert prune_checkpoints(str(tmp_path), str(tmp_path / "0000005.pt"), rolling=True, keep_last=0) == []


def test_time_cadence_with_keep_last_keeps_milestones_and_the_newest_rolling(tmp_path: Path) -> None:
    # A cadence of 1e-6 minutes is due after every step: rolling checkpoints at every step but the milestones.
    train.main(train.parse_args([
        "--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
        "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(tmp_path), "--exp-name", "run",
        "--eval-every", "0", "--sample-every", "0", "--no-progress", "--max-steps", "9", "--ckpt-every", "4",
        "--ckpt-every-minutes", "1e-6", "--keep-last", "2"]))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["0000004.pt", "0000006.pt", "0000007.pt",
                                                                "0000008.pt", "0000009.pt"]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("Saved checkpoint") == 9 and log.count("(--keep-last 2)") == 4  # 1, 2, 3, 5 removed


def test_every_stop_stays_in_stops_jsonl_and_the_log_names_the_last_one(tmp_path: Path) -> None:
    """stopped.json is removed when the run starts again (a requeue script tests its presence after each job);
    stops.jsonl keeps every stop, and log.txt says which one the run continues after."""
    from runtime.checkpoints import previous_stop, write_stopped

    run = tmp_path / "run"
    argv = ["--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(tmp_path), "--exp-name", "run",
            "--eval-every", "0", "--sample-every", "0", "--no-progress", "--ckpt-every", "1000"]
    train.main(train.parse_args([*argv, "--max-steps", "2"]))
    write_stopped(str(run), "SIGTERM", 2, str(run / "checkpoints" / "0000002.pt"), 75)
    write_stopped(str(run), "SIGUSR1", 2, str(run / "checkpoints" / "0000002.pt"), 75)
    assert json.loads((run / "stopped.json").read_text())["signal"] == "SIGUSR1"
    assert "stopped by SIGUSR1 after step 2 (stopped.json)" in previous_stop(str(run))
    train.main(train.parse_args([*argv, "--max-steps", "3", "--resume", "auto"]))
    assert not (run / "stopped.json").exists() and previous_stop(str(run)) is None
    history = [json.loads(line) for line in (run / "stops.jsonl").read_text().splitlines()]
    assert [(h["signal"], h["step"], h["exit_status"]) for h in history] == [("SIGTERM", 2, 75), ("SIGUSR1", 2, 75)]
    assert all(h["time"].endswith("Z") for h in history)
    assert "This run was stopped by SIGUSR1 after step 2 (stopped.json); the marker is removed as the run goes " \
           "on, stops.jsonl keeps every stop" in (run / "log.txt").read_text()


def test_each_rank_resumes_its_own_loss_sums() -> None:
    """The first log row after a resume averages every rank's sums as a straight run's does: each rank gets its
    own back (their mean, saved before, rounds otherwise); another world size, or an older checkpoint, the mean."""
    import torch
    from runtime.checkpoints import restore_log_state

    sums = torch.tensor([[1.0, 2.0, 3.0], [1.0000001, 4.0, 5.0]])
    checkpoint = {"log_state": dict(running=sums, log_steps=2, log_seconds=1.5, elapsed_s=9.0)}
    running, steps, seconds, elapsed = restore_log_state(checkpoint, torch.device("cpu"), rank=1, world_size=2)
    assert torch.equal(running, sums[1]) and (steps, seconds, elapsed) == (2, 1.5, 9.0)
    assert torch.equal(restore_log_state(checkpoint, torch.device("cpu"), rank=0, world_size=3)[0], sums.mean(0))
    old = {"log_state": dict(running=sums.mean(0), log_steps=2, log_seconds=1.5, elapsed_s=9.0)}
    assert torch.equal(restore_log_state(old, torch.device("cpu"), rank=1, world_size=2)[0], sums.mean(0))
    assert torch.equal(restore_log_state(None, torch.device("cpu"))[0], torch.zeros(3))
