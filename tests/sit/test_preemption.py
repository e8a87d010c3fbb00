"""train.py stopped by SIGTERM / SIGUSR1 at a step that varies with the test's seed, alone and as two torchrun
ranks: a checkpoint at the step reached, exit status 75, a line in log.txt, and ``--resume auto`` then ends
where a straight run ends (weights, EMA, optimizer, RNG, log.csv)."""
from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train
from ports import free_port
from runtime.preemption import EXIT_PREEMPTED

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
# One reader of log.txt and of the process tree, for these tests and benchmarks/example_e2e.py.
from e2e_checks import logged_step, process_tree, signal_tree  # noqa: E402

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
STEPS = 14
ANM = ("--anm", "--anm-alpha", "5", "--anm-warmup", "6")
TIMING = {"steps_per_sec", "img_per_sec", "elapsed_s"}  # wall-clock columns, different in every run


def tiny(results: Path, *extra: str, exp: str = "run") -> list[str]:
    """8x8 sinusoids, SiT-N/2, 6 steps per epoch, a log row every 3 steps (so a stop falls between rows)."""
    return ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--exp-name", exp,
            "--log-every", "3", "--eval-every", "4", "--eval-samples", "8", "--sample-every", "0",
            "--ckpt-every", "1000", "--no-progress", "--max-steps", str(STEPS), *extra]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def wait_for(condition, timeout: float = 240.0, what: str = "", proc: subprocess.Popen | None = None) -> None:
    """Poll until condition() holds (a loaded machine is slow, never flaky)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def torchrun(argv: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), str(SIT_DIR / "train.py"), *argv]


def start(cmd: list[str], ignore_usr1: bool = False) -> subprocess.Popen:
    """The job's first process, started with setsid."""
    def setup() -> None:
        if ignore_usr1:  # what the sbatch recipe does for torchrun's agent, which would die of SIGUSR1
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=setup)


def interrupt(cmd: list[str], run_dir: Path, sig: signal.Signals, seed: int, ignore_usr1: bool = False
              ) -> tuple[int, str, int]:
    """Start the run, signal all its processes once log.txt reached a step drawn from seed; returns
    (exit status, output, the step log.txt had reached when the signal was sent)."""
    target = random.Random(seed).choice([3, 6, 9])
    proc = start(cmd, ignore_usr1)
    try:
        wait_for(lambda: logged_step(run_dir / "log.txt") >= target, what=f"step {target}", proc=proc)
        reached = logged_step(run_dir / "log.txt")
        signal_tree(proc.pid, sig)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            for member in process_tree(proc.pid):
                os.kill(member, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, reached


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in (run_dir / "checkpoints").glob("*.pt"))


def log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    """The last checkpoints and the logs of two runs are identical (wall-clock columns aside)."""
    ck_a = torch.load(a / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)
    ck_b = torch.load(b / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)
    for key in ("model", "ema", "opt", "rng", "anm", "step", "epoch", "epoch_step"):
        assert_equal(ck_a[key], ck_b[key], key)
    assert log_rows(a) == log_rows(b)


def assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def assert_stopped(run_dir: Path, rc: int, out: str, sig: signal.Signals, reached: int) -> int:
    """Exit status 75, one checkpoint at the step reached (nothing trained is lost), log.txt and stopped.json
    saying which signal and step; returns that step."""
    assert rc == EXIT_PREEMPTED, out
    assert "Traceback" not in out, out
    stopped = json.loads((run_dir / "stopped.json").read_text())
    step = stopped["step"]
    assert stopped["signal"] == sig.name and stopped["exit_status"] == EXIT_PREEMPTED
    assert reached <= step < STEPS
    assert checkpoint_steps(run_dir) == [step]
    assert logged_step(run_dir / "log.txt") <= step  # no step trained after the checkpoint
    assert re.search(rf"Stopped by {sig.name} after step {step}; saved .*{step:07d}\.pt", (run_dir / "log.txt")
                     .read_text())
    assert out.count(f"train.py: stopped by {sig.name} after step {step}") == 1, out
    return step


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end at."""
    results = tmp_path_factory.mktemp("straight")
    train.main(train.parse_args(tiny(results, *ANM)))
    return results / "run"


# SIGUSR1 in one process is also the first signal of the in-process test at the end; its subprocess run is slow.
@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 1), pytest.param(signal.SIGUSR1, 2, marks=pytest.mark.slow)])
def test_signal_saves_the_step_reached_and_resume_matches_a_straight_run(tmp_path: Path, straight: Path,
                                                                         sig: signal.Signals, seed: int) -> None:
    cmd = [sys.executable, str(SIT_DIR / "train.py"), *tiny(tmp_path, *ANM, "--num-workers", "1")]
    rc, out, reached = interrupt(cmd, tmp_path / "run", sig, seed)
    assert_stopped(tmp_path / "run", rc, out, sig, reached)
    args_before = json.loads((tmp_path / "run" / "args.json").read_text())
    # Resumed without the ANM flags under the custom --exp-name: they come from the checkpoint.
    resumed = subprocess.run([sys.executable, str(SIT_DIR / "train.py"), *tiny(tmp_path), "--resume", "auto"],
                             env=env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / "run" / "stopped.json").exists()
    args_after = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args_after == dict(args_before, resume="auto", num_workers=0)
    assert_same_run(straight, tmp_path / "run")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "restored from" in log and "--anm True" in log and "--anm-alpha 5.0" in log
    assert "changed on resume: --num-workers 1 -> 0" in log


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("straight2")
    done = subprocess.run(torchrun(tiny(results, *ANM), free_port()), env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return results / "run"


@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 3), (signal.SIGUSR1, 4)])
def test_signal_under_torchrun_stops_both_ranks_at_one_step(tmp_path: Path, straight_two_ranks: Path,
                                                            sig: signal.Signals, seed: int) -> None:
    """SIGTERM reaches the agent (which forwards it again: a second signal) and the workers; SIGUSR1 reaches
    the workers while the agent ignores it, as in examples/sit/slurm/train.sbatch. Resumed under torchrun,
    the run ends where a straight two-rank run ends."""
    argv = tiny(tmp_path, *ANM, "--stop-sync-seconds", "0.01", exp="stopped")  # steps of this run take less
    rc, out, reached = interrupt(torchrun(argv, free_port()), tmp_path / "stopped", sig, seed,
                                 ignore_usr1=sig == signal.SIGUSR1)
    assert rc != 0, out  # torchrun's agent reports its workers' status 75 as a failure (exit 1)
    # Each worker stopped cleanly with 75: no worker traceback, no broken collective.
    worker_lines = [line for line in out.splitlines() if "torch/distributed" not in line]
    assert not any("Error" in line and "ChildFailedError" not in line and "SignalException" not in line
                   for line in worker_lines), out
    assert out.count(f"train.py: stopped by {sig.name} after step") == 1, out
    assert "exitcode  : -" not in out, out  # no worker killed by the agent (its report lists only status 75)
    stopped = json.loads((tmp_path / "stopped" / "stopped.json").read_text())
    assert stopped["signal"] == sig.name and reached <= stopped["step"] < STEPS
    assert checkpoint_steps(tmp_path / "stopped") == [stopped["step"]]
    resumed = subprocess.run(torchrun([*argv, "--resume", "auto"], free_port()), env=env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight_two_ranks, tmp_path / "stopped")


def test_a_second_signal_during_the_save_is_noted_and_the_checkpoint_completes(tmp_path: Path, monkeypatch) -> None:
    """In this process: SIGUSR1 during step 3, SIGTERM while its checkpoint is being written."""
    real_update, real_save = train.update_ema, train.save_checkpoint
    steps = []

    def update_ema(*args, **kwargs) -> None:
        real_update(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    def save_checkpoint(*args, **kwargs) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train, "update_ema", update_ema)
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    with pytest.raises(SystemExit) as stopped:
        train.main(train.parse_args(tiny(tmp_path)))
    assert stopped.value.code == EXIT_PREEMPTED
    assert checkpoint_steps(tmp_path / "run") == [3]
    assert torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)["step"] == 3
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "Stopped by SIGUSR1 after step 3" in log and "Ignored SIGTERM during the stop" in log
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # this process's handlers are back


def signal_after(monkeypatch, name: str, sig: signal.Signals = signal.SIGINT) -> None:
    """train.<name> sends sig to this process once it has run (Ctrl-C during that part of the setup)."""
    real = getattr(train, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(train, name, wrapped)


def test_ctrl_c_during_setup_exits_before_the_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """SIGINT during the data scan / VAE load / held-out encoding was only recorded: the run then trained step 1,
    saved a checkpoint and left a run folder that a rerun of the same command was refused for."""
    argv = tiny(tmp_path, "--max-steps", "2")
    signal_after(monkeypatch, "load_data")
    with pytest.raises(SystemExit) as stopped:
        train.main(train.parse_args(argv))
    assert stopped.value.code == EXIT_PREEMPTED
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["stopped.json", "stops.jsonl"]
    assert json.loads((run_dir / "stopped.json").read_text()) == dict(signal="SIGINT", step=0, checkpoint=None,
                                                                       exit_status=EXIT_PREEMPTED)
    assert json.loads((run_dir / "stops.jsonl").read_text())["signal"] == "SIGINT"  # no run files, a stop's record
    assert "train.py: stopped by SIGINT during setup, before step 1; nothing to save" in capsys.readouterr().err
    monkeypatch.undo()
    out = train.main(train.parse_args(argv))  # the same command, not refused: the run starts
    assert out["step"] == 2 and not (run_dir / "stopped.json").exists()


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_before_the_first_step_saves_no_checkpoint(tmp_path: Path, monkeypatch, resumed: bool) -> None:
    """A signal after the run folder is opened (checkpoint restore, the step-0 held-out loss) and before the first
    step: exit 75 with no new checkpoint, and --resume auto goes on."""
    run_dir = tmp_path / "run"
    if resumed:
        train.main(train.parse_args(tiny(tmp_path, "--max-steps", "2")))
    signal_after(monkeypatch, "restore", signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        train.main(train.parse_args(tiny(tmp_path, "--max-steps", "4", "--resume", "auto")))
    assert stopped.value.code == EXIT_PREEMPTED
    assert checkpoint_steps(run_dir) == ([2] if resumed else [])
    newest = str(run_dir / "checkpoints" / "0000002.pt") if resumed else None
    assert json.loads((run_dir / "stopped.json").read_text())["checkpoint"] == newest
    step = 2 if resumed else 0
    assert f"Stopped by SIGTERM before step {step + 1}, with no step to save" in (run_dir / "log.txt").read_text()
    monkeypatch.undo()
    assert train.main(train.parse_args(tiny(tmp_path, "--max-steps", "4", "--resume", "auto")))["step"] == 4
