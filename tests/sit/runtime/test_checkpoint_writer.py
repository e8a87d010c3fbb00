"""runtime/checkpoint_writer.py and train.py's background checkpoints: training goes on while a checkpoint is
written, the checkpoint holds the state of its step, a stop does not wait for a rolling write (it abandons it,
leaving nothing behind), and a failed write stops the run at the next checkpoint."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import train
from runtime import checkpoints
from runtime.checkpoint_writer import CheckpointWriter, to_host, write_state
from runtime.cli import UsageError
from runtime.preemption import EXIT_PREEMPTED


def test_submit_returns_at_once_and_after_runs_once_the_file_is_on_disk(tmp_path: Path) -> None:
    gate, seen = threading.Event(), []

    def gated(path, state, abandoned):
        gate.wait(30)
        return write_state(path, state, abandoned)

    writer = CheckpointWriter(gated)
    path = str(tmp_path / "0000002.pt")
    writer.submit(path, {"w": torch.ones(2)}, rolling=False)
    writer.after(path, lambda stats: seen.append((os.path.exists(path), stats.bytes)))
    assert writer.pending == path and seen == [] and not os.path.exists(path)
    gate.set()
    assert writer.wait() == ("", None)
    assert seen == [(True, os.path.getsize(path))]
    writer.after(path, lambda stats: seen.append("now"))  # nothing in flight: at once
    assert seen[-1] == "now"


def test_abandoning_a_rolling_write_leaves_no_file_and_a_milestone_completes(tmp_path: Path) -> None:
    calls = []

    def slow(path, state, abandoned):
        time.sleep(0.3)
        calls.append(path)
        return write_state(path, state, abandoned)

    state = {f"w{i}": torch.rand(1000) for i in range(50)}
    writer = CheckpointWriter(slow)
    writer.submit(str(tmp_path / "0000003.pt"), state, rolling=True)
    assert writer.wait(abandon_rolling=True) == ("", str(tmp_path / "0000003.pt"))
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor its temp file
    writer.submit(str(tmp_path / "0000004.pt"), state, rolling=False)  # a milestone
    assert writer.wait(abandon_rolling=True) == ("", None)
    assert os.listdir(tmp_path) == ["0000004.pt"]
    assert torch.equal(torch.load(tmp_path / "0000004.pt", weights_only=True)["w7"], state["w7"])


def test_write_state_stops_where_abandoned_says() -> None:
    """torch.save calls the file's write once per record: abandoned() is asked before each one."""
    asked = []

    def abandoned() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(UsageError):  # torch.save reports the refused write as "unexpected pos"
        write_state("/tmp/never-kept.pt", {f"w{i}": torch.ones(10) for i in range(20)}, abandoned)
    assert not os.path.exists("/tmp/never-kept.pt") and len(asked) == 4


def test_to_host_copies_every_tensor() -> None:
    state = {"model": {"w": torch.ones(2)}, "opt": {"state": {0: {"exp_avg": torch.zeros(2)}}, "groups": [1]},
             "step": 3}
    copy = to_host(state)
    state["model"]["w"].add_(1)
    state["opt"]["state"][0]["exp_avg"].add_(1)
    assert copy["model"]["w"].tolist() == [1, 1] and copy["opt"]["state"][0]["exp_avg"].tolist() == [0, 0]
    assert copy["step"] == 3 and copy["opt"]["groups"] == [1]


def tiny(results: Path, *extra: str) -> list[str]:
    return ["--data", "sinusoid", "--image-size", "8", "--data-size", "32", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--exp-name", "run",
            "--eval-every", "0", "--sample-every", "0", "--no-progress", "--log-every", "1", *extra]


def slow_writes(monkeypatch, seconds: float) -> None:
    real = checkpoints._writer.write

    def slow(path, state, abandoned):
        if abandoned is not None:  # a background write (a synchronous one passes None)
            time.sleep(seconds)
        return real(path, state, abandoned)

    monkeypatch.setattr(checkpoints._writer, "write", slow)


def test_training_goes_on_while_a_milestone_is_written_and_it_holds_its_step(tmp_path: Path, monkeypatch) -> None:
    straight = train.main(train.parse_args(tiny(tmp_path / "a", "--max-steps", "2")))["checkpoint"]  # synchronous
    slow_writes(monkeypatch, 2.0)
    train.main(train.parse_args(tiny(tmp_path / "b", "--max-steps", "4", "--ckpt-every", "2")))
    log = (tmp_path / "b" / "run" / "log.txt").read_text()
    background = str(tmp_path / "b" / "run" / "checkpoints" / "0000002.pt")
    # Steps 3 and 4 were trained while step 2's checkpoint was being written.
    assert log.index(f"Writing checkpoint {background} in the background") < log.index("(step=0000003)") \
        < log.index(f"Saved checkpoint to {background}")
    a, b = (torch.load(path, weights_only=True) for path in (straight, background))
    for key in ("model", "ema", "opt", "rng", "step", "epoch", "epoch_step"):
        assert repr(a[key]) == repr(b[key]), key  # the weights at step 2, not those of steps 3-4


def test_a_stop_abandons_the_rolling_write_in_flight_and_resumes_from_its_own(tmp_path: Path, monkeypatch) -> None:
    """Rolling checkpoints after every step (--ckpt-every-minutes 1e-6), each written slowly; SIGUSR1 during step
    3: the stop's checkpoint does not wait for step 2's write, which is dropped without a trace."""
    slow_writes(monkeypatch, 1.5)
    real_update, steps = train.update_ema, []

    def update_ema(*args, **kwargs) -> None:
        real_update(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train, "update_ema", update_ema)
    argv = tiny(tmp_path, "--max-steps", "6", "--ckpt-every-minutes", "1e-6", "--keep-last", "0")
    with pytest.raises(SystemExit) as stopped:
        train.main(train.parse_args(argv))
    assert stopped.value.code == EXIT_PREEMPTED
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["0000001.pt", "0000003.pt", "rolling.json"]  # no 2, no temp file
    assert f"Abandoned the background write of {folder / '0000002.pt'}" in (tmp_path / "run" / "log.txt").read_text()
    monkeypatch.undo()
    assert train.main(train.parse_args([*argv, "--resume", "auto"]))["step"] == 6


def test_a_failed_background_write_stops_the_run_at_the_next_checkpoint(tmp_path: Path, monkeypatch) -> None:
    real = checkpoints._writer.write

    def full_disk(path, state, abandoned):
        if abandoned is not None:
            raise UsageError(f"no space left on device while writing {path}: free space and rerun")
        return real(path, state, abandoned)

    monkeypatch.setattr(checkpoints._writer, "write", full_disk)
    with pytest.raises(UsageError, match=r"no space left on device while writing .*0000002\.pt"):
        train.main(train.parse_args(tiny(tmp_path, "--max-steps", "3", "--ckpt-every", "2")))
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # the last step's was not written either
