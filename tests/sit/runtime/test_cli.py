"""examples/sit/runtime/cli.py: an expected error is one line, once per run, also under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port
from runtime import cli
from runtime.cli import UsageError, run

SIT_DIR = Path(__file__).resolve().parents[3] / "examples" / "sit"


def fail(message: str) -> None:
    raise UsageError(message)


@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False)])
def test_under_torchrun_rank_0_prints_and_every_rank_records(rank: str, prints: bool, tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "RANK_GRACE_S", 0)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        run(lambda args: fail("--lr must be > 0"), lambda: None)
    assert exit_.value.code == 2  # the same code on every rank
    assert capsys.readouterr().err == ("train.py: error: --lr must be > 0\n" if prints else "")
    record = json.loads(error_file.read_text())["message"]
    assert record["message"] == "--lr must be > 0" and int(record["extraInfo"]["timestamp"]) > 0


def test_without_torchrun_every_process_prints(monkeypatch, capsys) -> None:
    """A launcher that sets RANK without torchrun's error files (srun, mpirun): no rank may stay silent."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(sys, "argv", ["sample_ddp.py"])
    with pytest.raises(SystemExit):
        run(lambda args: fail("bad"), lambda: None)
    assert capsys.readouterr().err == "sample_ddp.py: error: bad\n"



def test_torchrun_shows_the_error_once_and_in_its_report(tmp_path: Path) -> None:
    """Two gloo ranks meet the same bad flag: the line was printed once per rank, and torchrun's report said
    only "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(SIT_DIR / "train.py"), "--data", "sinusoid",
                             "--lr", "inf", "--results-dir", str(tmp_path / "r")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    assert [line for line in lines if "error: " in line and line.startswith("train.py")] == [
        "train.py: error: --lr must be > 0 and finite, got inf"], result.stderr
    root_cause = result.stderr.split("Root Cause")[-1]
    assert "traceback : --lr must be > 0 and finite, got inf" in root_cause, result.stderr
    assert "To enable traceback see" not in result.stderr
    assert not (tmp_path / "r").exists()
