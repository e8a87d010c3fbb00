"""examples/sit/runtime/distributed.py: one process without torchrun; a 2-process gloo group under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port
from runtime.distributed import barrier, broadcast_object, cleanup, setup_distributed

SIT_DIR = Path(__file__).resolve().parents[3] / "examples" / "sit"


def test_single_process_without_torchrun(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed()
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.created, ctx.is_main) == (0, 0, 1, False, True)
    assert ctx.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    barrier()
    assert broadcast_object({"a": 1}) == {"a": 1}
    cleanup(ctx)


SCRIPT = """
import sys
sys.path.insert(0, {sit!r})
from runtime.distributed import barrier, broadcast_object, cleanup, setup_distributed
ctx = setup_distributed()
value = broadcast_object(("from rank", ctx.rank) if ctx.is_main else None)
barrier()
print(ctx.rank, ctx.local_rank, ctx.world_size, ctx.created, ctx.device.type, value)
cleanup(ctx)
"""


@pytest.mark.slow  # sample_ddp's two-process test covers the same path in the default suite
def test_two_gloo_processes_share_rank_zeros_object(tmp_path: Path) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT.format(sit=str(SIT_DIR))], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs == [f"{r} {r} 2 True cpu ('from rank', 0)" for r in range(2)]


def test_the_group_timeout_comes_from_the_environment(monkeypatch) -> None:
    from datetime import timedelta

    from runtime.cli import UsageError
    from runtime.distributed import TIMEOUT_ENV, group_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert group_timeout() is None  # torch's default
    monkeypatch.setenv(TIMEOUT_ENV, "45")
    assert group_timeout() == timedelta(minutes=45)
    for bad in ("0", "-1", "inf", "nan", "ten"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=f"{TIMEOUT_ENV}=.* must be a number of minutes > 0"):
            group_timeout()


LONG_WAIT_SCRIPT = """
import sys, time
sys.path.insert(0, {sit!r})
from runtime.distributed import barrier, broadcast_object, cleanup, setup_distributed
ctx = setup_distributed()
if ctx.is_main:
    time.sleep(5)  # rank 0's work alone, past the group's 3 s timeout
value = broadcast_object("done" if ctx.is_main else None, long_wait=True)
barrier(long_wait=True)
try:
    if ctx.is_main:
        time.sleep(5)
    barrier()  # the default group: times out
    print("no timeout")
except RuntimeError as error:
    print("default group:", "Timed out" in str(error) or "closed" in str(error))
print(ctx.rank, value)
cleanup(ctx)
"""


def test_a_long_wait_outlasts_the_group_timeout(tmp_path: Path) -> None:
    """SIT_DIST_TIMEOUT_MINUTES=0.05 (3 s): a plain barrier after 5 s of rank 0's work fails, the long-wait
    broadcast and barrier do not."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LONG_WAIT_SCRIPT.format(sit=str(SIT_DIR))],
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                       CUDA_VISIBLE_DEVICES="", SIT_DIST_TIMEOUT_MINUTES="0.05"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "default group: True" in outputs[1] and outputs[1].strip().endswith("1 done"), outputs
