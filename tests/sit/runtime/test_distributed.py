"""examples/sit/runtime/distributed.py: one process without torchrun; a 2-process gloo group under torchrun."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT.format(sit=str(SIT_DIR))], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs == [f"{r} {r} 2 True cpu ('from rank', 0)" for r in range(2)]
