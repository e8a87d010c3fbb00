"""examples/sit/slurm/train.sbatch: valid bash, the torchrun command it builds, and its requeue decision,
run with stand-ins for srun, scontrol and torchrun on PATH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SBATCH = Path(__file__).resolve().parents[2] / "examples" / "sit" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options; one task here
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node-a; echo node-b; else echo "$@" >> "$FAKE_LOG"; fi
"""
FAKE_TORCHRUN = f"""#!{sys.executable}
import json, os, signal, sys
marker = os.path.join("res", "exp", "stopped.json")
record = dict(argv=sys.argv[1:], usr1_ignored=signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
              marker_at_start=os.path.exists(marker),
              shutdown_timeout=os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
with open(os.environ["FAKE_TORCHRUN_LOG"], "w") as f:
    json.dump(record, f)
if os.environ.get("FAKE_WRITE_STOPPED"):
    os.makedirs(os.path.join("res", "exp"), exist_ok=True)
    open(marker, "w").write("{{}}")
    # The shared file system's clock may lag the node's: the fresh marker can look older than the job.
    skew = float(os.environ.get("FAKE_MTIME_SKEW", "0"))
    os.utime(marker, (os.path.getmtime(marker) + skew,) * 2)
sys.exit(int(os.environ["FAKE_RC"]))
"""


def test_bash_syntax() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


@pytest.fixture()
def fake_cluster(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def submit(cluster: Path, rc: int, write_stopped: bool = False, stale_stopped: bool = False, skew: float = 0.0
           ) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """Run the script as SLURM would start it; returns (its result, scontrol requeue calls, torchrun's record).
    skew shifts the mtime of a stale marker (left by an earlier job) or of the fresh one torchrun writes, as a
    file server whose clock differs from the node's would."""
    if stale_stopped:  # left by an earlier job
        (cluster / "res" / "exp").mkdir(parents=True, exist_ok=True)
        (cluster / "res" / "exp" / "stopped.json").write_text("{}")
        old = time.time() - 3600 + skew
        os.utime(cluster / "res" / "exp" / "stopped.json", (old, old))
    env = dict(os.environ, PATH=f"{cluster / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(cluster / "scontrol.log"),
               FAKE_TORCHRUN_LOG=str(cluster / "torchrun.json"), FAKE_RC=str(rc), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(cluster), RESULTS="res",
               EXP="exp", GPUS_PER_NODE="8")
    if write_stopped:
        env.update(FAKE_WRITE_STOPPED="1", FAKE_MTIME_SKEW=str(skew))
    done = subprocess.run(["bash", str(SBATCH), "--model", "SiT-XL/2", "--anm"], env=env, capture_output=True,
                          text=True, timeout=60)
    log = cluster / "scontrol.log"
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls, json.loads((cluster / "torchrun.json").read_text())


def test_torchrun_command_line(fake_cluster: Path) -> None:
    done, calls, torchrun = submit(fake_cluster, rc=0)
    assert done.returncode == 0 and calls == [] and "training finished" in done.stdout
    argv = torchrun["argv"]
    assert argv[:10] == ["--nnodes", "2", "--nproc_per_node", "8", "--rdzv-id", "4242", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "node-a:29500"]
    assert argv[10:] == ["examples/sit/train.py", "--results-dir", "res", "--exp-name", "exp", "--resume", "auto",
                         "--model", "SiT-XL/2", "--anm"]
    assert torchrun["usr1_ignored"]  # the agent survives --signal's SIGUSR1
    # torchrun's own 30 s between SIGTERM and SIGKILL would cut a stop's save short of KillWait.
    assert int(torchrun["shutdown_timeout"]) >= 300


def test_the_signal_lead_is_the_one_the_docs_size() -> None:
    """docs/sit.md sizes the stop budget from benchmarks/checkpoint_write.py's record: it names the lead the
    script sets, so the two cannot drift apart."""
    import re

    lead = int(re.search(r"^#SBATCH --signal=USR1@(\d+)$", SBATCH.read_text(), re.M)[1])
    docs = (SBATCH.parents[3] / "docs" / "sit.md").read_text()
    assert f"--signal=USR1@{lead}" in docs and lead >= 120


@pytest.mark.parametrize("rc, write_stopped, stale, skew, requeued", [
    (75, False, False, 0, True),  # train.py alone, stopped by a signal
    (1, True, False, 0, True),  # torchrun's agent after its workers exited 75: the fresh stopped.json decides
    (1, True, False, -3600, True),  # the same, on a file server whose clock is an hour behind the node's
    (1, False, True, 0, False),  # a real failure; the stopped.json is an earlier job's
    (1, False, True, 7200, False),  # the same, the earlier job's marker stamped by a clock two hours ahead
    (2, False, False, 0, False),  # a usage error: requeueing would fail again
])
def test_requeue_only_after_a_stop(fake_cluster: Path, rc: int, write_stopped: bool, stale: bool, skew: float,
                                   requeued: bool) -> None:
    done, calls, torchrun = submit(fake_cluster, rc, write_stopped, stale, skew)
    assert calls == (["requeue 4242"] if requeued else [])
    assert done.returncode == (0 if requeued else rc), done.stdout + done.stderr
    assert not torchrun["marker_at_start"]  # an earlier job's marker is gone before this job's torchrun starts
