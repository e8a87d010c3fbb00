"""benchmarks/example_e2e.py, the example's end-to-end check for GPU machines: its verdicts on hand-made and
real run folders (fast), and the whole script on two gloo ranks (slow)."""

import doctest
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_example_e2e", BENCHMARKS / "example_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checks(e2e):
    return sys.modules["e2e_checks"]


@pytest.mark.parametrize("name", ["e2e_checks", "nan_check"])
def test_docstring_examples_run(e2e, name: str) -> None:
    assert doctest.testmod(sys.modules[name]).failed == 0


def test_compare_states_names_what_differs_and_by_how_much(checks) -> None:
    a = {"model": {"w": torch.ones(3), "b": torch.zeros(2)}, "rng": [torch.tensor([1, 2], dtype=torch.uint8)],
         "step": 4, "opt": {"state": {0: {"exp_avg": torch.ones(2)}}}}
    same = checks.compare_states(a, {**a})
    assert same == dict(bit_exact=True, max_abs_diff=dict(model=0.0, rng=0.0, opt=0.0), differing=[])
    b = {"model": {"w": torch.tensor([1.0, 1.0, 1.25]), "b": torch.zeros(3)},
         "rng": [torch.tensor([1, 9], dtype=torch.uint8)], "step": 5, "opt": {"state": {0: {"exp_avg": torch.ones(2)}}},
         "anm": {}}
    result = checks.compare_states(a, b)
    assert not result["bit_exact"]
    assert result["max_abs_diff"] == dict(model=float("inf"), rng=7.0, opt=0.0)  # b's shape differs: inf
    assert result["differing"] == ["model/w", "model/b: (2,) torch.float32 != (3,) torch.float32", "rng[0]",
                                   "anm: in one checkpoint only", "step: 4 != 5"]
    nan = checks.compare_states({"ema": {"w": torch.tensor([float("nan")])}}, {"ema": {"w": torch.zeros(1)}})
    assert nan["max_abs_diff"] == {"ema": float("inf")} and not nan["bit_exact"]


def test_log_readers_on_a_real_run(checks, ckpt: str) -> None:
    run = Path(ckpt).parents[1]
    assert checks.logged_step(run / "log.txt") == 2
    assert checks.logged_step(run / "missing.txt") == 0
    assert checks.last_write_seconds(run / "log.txt") >= 0
    assert checks.steps_per_sec(run / "log.csv") > 0
    assert checks.stop_budget(5.0, None, 1.0) is None and checks.stop_budget(5.0, 0.25, 1.0) == 6.25


def test_worker_exit_codes_from_torchruns_failure_report(checks) -> None:
    report = ("[0]:\n  time      : 2026-12-08_00:00:00\n  host      : node\n  rank      : 0 (local_rank: 0)\n"
              "  exitcode  : 75 (pid: 11)\n[1]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 12)\n")
    assert checks.worker_exit_codes(report) == [75, -9]


def stopped_run(tmp_path: Path, step: int = 6, exit_status: int = 75, checkpoint: bool = True) -> Path:
    """A run folder as a stopped train.py leaves it: log.csv, log.txt's checkpoint line, stopped.json."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "log.csv").write_text("step,loss,steps_per_sec\n3,1.0,4.0\n")
    (run / "log.txt").write_text(f"[t] (step=0000003) FM loss 1.0\n[t] Saved checkpoint to {run}/checkpoints/"
                                 f"{step:07d}.pt (0.9 MB in 1.5 s, 1 MB/s)\n")
    (run / "stopped.json").write_text(json.dumps(dict(step=step, signal="SIGTERM", exit_status=exit_status)))
    if checkpoint:
        (run / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    return run


STOP_LINE = "train.py: stopped by SIGTERM after step 6; saved ..."


def test_stop_verdict_holds_a_stop_to_its_checkpoint_status_and_time(e2e, tmp_path: Path) -> None:
    budget = e2e.STOP_SYNC_SECONDS + 0.25 + 1.5  # agreement + a step (4 steps/s) + the write

    def verdict(name: str, output: str = STOP_LINE, reached: int = 3, took: float = 0.5, **run) -> tuple[bool, dict]:
        folder = stopped_run(tmp_path / name, **run)
        written = (folder / "stopped.json").stat().st_mtime if (folder / "stopped.json").exists() else time.time()
        return e2e.stop_verdict(folder, output, reached, signalled=3, sent_at=written - took)

    ok, details = verdict("a")
    assert ok and details["documented_budget_s"] == pytest.approx(budget) and details["within_budget"]
    assert details["stop_s"] == pytest.approx(0.5, abs=1e-3) and details["stop_lines"] == 1
    assert not verdict("slow", took=budget + e2e.STOP_SLACK_SECONDS + 0.5)[0]
    assert not verdict("status", exit_status=1)[0]
    assert not verdict("no-checkpoint", checkpoint=False)[0]
    assert not verdict("early", reached=7)[0]  # stopped before the step the signal was sent at
    assert not verdict("killed", output=STOP_LINE + "\n  exitcode  : -9 (pid: 3)")[0]
    assert not verdict("traceback", output=STOP_LINE + '\n  File "/x/examples/sit/train.py", line 9, in main')[0]
    assert not verdict("silent", output="")[0]
    no_record = stopped_run(tmp_path / "no-record")
    (no_record / "stopped.json").unlink()
    assert not e2e.stop_verdict(no_record, STOP_LINE, 3, 3, time.time())[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    ok, details = e2e.stop_verdict(empty, "", 3, 0, time.time())  # a run that died before writing anything
    assert not ok and details["documented_budget_s"] is None and details["checkpoints"] == []


def test_a_resume_must_match_bit_for_bit_while_a_repeat_is_only_recorded(e2e, tmp_path: Path) -> None:
    args = e2e.parse_args(["--scale", "cpu", "--device", "cpu", "--out", str(tmp_path / "e2e.json"), "--work",
                           str(tmp_path / "work")])
    suite = e2e.Suite(args, sys.modules["report"].ResultFile(args.out, {}))
    step = suite.scale.steps
    for name, weight in (("straight", 1.0), ("stopped", 1.0), ("again", 1.5)):
        run = suite.work / "runs" / name
        (run / "checkpoints").mkdir(parents=True)
        torch.save(dict(model={"w": torch.full((2,), weight)}, step=step), run / "checkpoints" / f"{step:07d}.pt")
        (run / "log.csv").write_text(f"step,loss,steps_per_sec\n{step},{weight},{weight * 7}\n")
    suite.compare("stopped", "straight")
    suite.compare("again", "straight", must_match=False)
    recorded = json.loads(Path(args.out).read_text())["rows"][1]
    assert suite.ok and recorded["ok"] and not recorded["bit_exact"] and not recorded["verdict"]
    suite.compare("again", "straight")  # the same difference where a match is required: a failure
    rows = json.loads(Path(args.out).read_text())["rows"]
    assert [(row["stage"], row["ok"], row["bit_exact"], row["same_log_csv"]) for row in rows] == [
        ("stopped_vs_straight", True, True, True), ("again_vs_straight", False, False, False)]
    assert rows[1]["max_abs_diff"] == {"model": 0.5} and rows[1]["verdict"] and not suite.ok


@pytest.mark.parametrize("flag", [[], ["--deterministic"]])
def test_deterministic_reaches_every_training_run(e2e, tmp_path: Path, monkeypatch, flag: list[str]) -> None:
    launched = []
    monkeypatch.setattr(e2e, "launch", lambda cmd, *rest: launched.append(cmd) or (1, "failed", 0.0))
    args = e2e.parse_args(["--scale", "cpu", "--device", "cpu", "--out", str(tmp_path / "e2e.json"), "--work",
                           str(tmp_path / "work"), *flag])
    (tmp_path / "work").mkdir()
    suite = e2e.Suite(args, sys.modules["report"].ResultFile(args.out, {}))
    suite.straight()
    stopped = tmp_path / "work" / "runs" / "stopped"
    stopped.mkdir(parents=True)
    suite.resume()  # refused: nothing was stopped, and --resume auto would start afresh
    assert len(launched) == 1
    (stopped / "stopped.json").write_text("{}")
    suite.resume()
    assert [cmd.count("--deterministic") for cmd in launched] == [len(flag)] * 2
    assert launched[1][launched[1].index("--resume") + 1] == "auto" and not suite.ok


def test_a_stage_that_raises_is_recorded_the_next_ones_run_and_the_logs_come_back(e2e, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    def broken(self) -> None:
        (self.work / "straight.log").write_text("what the command printed")
        raise OSError("disk full")

    monkeypatch.setattr(e2e.Suite, "straight", broken)
    out = tmp_path / "e2e.json"
    handlers = [signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
    assert not e2e.main(e2e.parse_args(["--scale", "cpu", "--device", "cpu", "--stages", "straight", "nan",
                                        "--out", str(out)]))
    result = json.loads(out.read_text())
    rows = {row["stage"]: row for row in result["rows"]}
    assert rows["straight"]["error"] == "OSError: disk full" and not rows["straight"]["ok"] and rows["nan"]["ok"]
    assert result["complete"] and not result["ok"] and not Path(result["meta"]["work"]).exists()  # a temp folder
    with tarfile.open(tmp_path / "e2e-logs.tar.gz") as archive:
        assert archive.extractfile("straight.log").read() == b"what the command printed"
    assert [signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)] == handlers


def test_nan_check_names_block_and_step_and_fails_when_nothing_is_raised(e2e, monkeypatch) -> None:
    nan_check = sys.modules["nan_check"]
    result = nan_check.check_nan_is_named(torch.device("cpu"), "SiT-N/2", image_size=8, bad_block=1, bad_step=2)
    assert result["ok"] and result["raised_at_step"] == 2 and "at step 2 in layer(s) ['blocks.1']" in result["message"]
    attach = nan_check.anm.attach
    monkeypatch.setattr(nan_check.anm, "attach", lambda *a, **k: attach(*a, **{**k, "nonfinite": "propagate"}))
    missed = nan_check.check_nan_is_named(torch.device("cpu"), "SiT-N/2", image_size=8)
    assert not missed["ok"] and missed["raised_at_step"] is None


def test_bad_arguments_are_refused_before_anything_is_written(e2e, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.log").write_text("an earlier run")
    with pytest.raises(SystemExit, match="not empty"):
        e2e.main(e2e.parse_args(["--device", "cpu", "--work", str(busy), "--out", str(tmp_path / "a.json")]))
    with pytest.raises(SystemExit, match="unknown stage"):
        e2e.main(e2e.parse_args(["--stages", "straight", "fly", "--out", str(tmp_path / "b.json")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_a_stopped_script_takes_its_running_commands_with_it(e2e, tmp_path: Path) -> None:
    """gpu_suite.sh's time limit sends SIGTERM to the script alone; torchrun's workers, started with setsid,
    must not outlive it (they would hold the GPUs through the next part)."""
    work = tmp_path / "work"
    script = subprocess.Popen([sys.executable, str(BENCHMARKS / "example_e2e.py"), "--scale", "cpu", "--device",
                               "cpu", "--nproc", "2", "--stages", "straight", "--work", str(work), "--out",
                               str(tmp_path / "e2e.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checks = sys.modules["e2e_checks"]
    launched: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (work / "runs" / "straight" / "log.txt").exists():
            assert script.poll() is None and time.monotonic() < deadline, script.stdout.read()
            time.sleep(0.05)
        launched = checks.process_tree(script.pid)[1:]
        assert len(launched) >= 3  # torchrun's agent and its two workers
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert [pid for pid in launched if Path(f"/proc/{pid}").exists() and not zombie(pid)] == []
    finally:  # a failure leaves nothing running either
        for pid in [script.pid, *launched]:
            checks.signal_tree(pid, signal.SIGKILL)
    assert json.loads((tmp_path / "e2e.json").read_text())["stage"] == "straight"
    with tarfile.open(tmp_path / "e2e-logs.tar.gz") as archive:  # written on the way out
        assert "runs/straight/log.txt" in archive.getnames()
    assert work.exists() and not (work / "runs").exists()  # a given --work stays; its checkpoints go


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow  # five torchrun launches and FIDs on the CPU: 3 to 6 min on 2 cores
def test_every_stage_passes_on_two_gloo_ranks(e2e, tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("needs a POSIX process tree")
    out = tmp_path / "e2e.json"
    assert e2e.main(e2e.parse_args(["--scale", "cpu", "--device", "cpu", "--nproc", "2", "--out", str(out)]))
    result = json.loads(out.read_text())
    rows = {row["stage"]: row for row in result["rows"]}
    assert result["complete"] and result["ok"] and all(row["ok"] for row in rows.values())
    assert list(rows) == ["reference", "straight", "stop", "resume", "stopped_vs_straight", "sample", "nan",
                          "again", "again_vs_straight"]
    assert len(rows["straight"]["fid"]) == 2 and rows["straight"]["checkpoints"] == ["0000012.pt", "0000024.pt"]
    assert rows["stopped_vs_straight"]["bit_exact"] and rows["stopped_vs_straight"]["same_log_csv"]
    assert rows["stop"]["exit_status"] == 75 and rows["stop"]["within_budget"]
    assert rows["sample"]["metrics"]["fid"] > 0
    assert not Path(result["meta"]["work"]).exists()  # a temporary folder, removed
    with tarfile.open(tmp_path / "e2e-logs.tar.gz") as archive:
        assert {"runs/straight/log.csv", "runs/stopped/log.txt", "stop.log"} <= set(archive.getnames())
