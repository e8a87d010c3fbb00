"""runtime/checks.py read_checkpoint maps the file instead of reading it: under torchrun every rank of a node
loads the checkpoint to resume or sample from (SiT-XL/2: 10.8 GB, 86 GB of host memory on 8 ranks when each
holds a private copy); mapped, the ranks share the page cache and a rank touches only what it copies."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train
from runtime import checks
from runtime.checks import read_checkpoint

SIT_DIR = Path(__file__).resolve().parents[3] / "examples" / "sit"

RSS_SCRIPT = """
import resource, sys
sys.path.insert(0, {sit!r})
from runtime.checks import read_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state = read_checkpoint({path!r})
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(grown, sum(t.numel() for t in state["model"].values()))
"""


def test_the_checkpoint_is_memory_mapped(tmp_path: Path, monkeypatch) -> None:
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "c.pt")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(checks.torch, "load", spy)
    assert torch.equal(read_checkpoint(str(tmp_path / "c.pt"))["model"]["w"], torch.ones(3))
    assert calls == [dict(map_location="cpu", weights_only=True, mmap=True)]


def test_reading_a_large_checkpoint_does_not_copy_it_into_memory(tmp_path: Path) -> None:
    """256 MB of tensors: the process's peak RSS grows by far less than the file (it grew by all of it)."""
    path = tmp_path / "big.pt"
    subprocess.run([sys.executable, "-c", f"import torch; torch.save({{'model': {{f'w{{i}}': torch.rand(4_000_000) "
                    f"for i in range(16)}}}}, {str(path)!r})"], check=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(sit=str(SIT_DIR), path=str(path))],
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    grown, numel = int(out[0]), int(out[1])
    assert numel == 64_000_000
    assert grown < path.stat().st_size / 4, f"peak RSS grew by {grown / 2**20:.0f} MiB for a 256 MB checkpoint"


def test_a_checkpoint_in_torchs_legacy_format_is_read_whole(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.arange(4.0)}}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert read_checkpoint(str(tmp_path / "old.pt"))["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(checks.UsageError, match="cannot read checkpoint .*junk.pt"):
        read_checkpoint(str(tmp_path / "junk.pt"))


def test_training_on_from_a_mapped_checkpoint_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """On the CPU the optimizer keeps the mapped moments as its state and updates them in place: the mapping is
    private (copy on write), so the checkpoint on disk never changes."""
    argv = ["--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(tmp_path), "--exp-name", "run",
            "--eval-every", "0", "--sample-every", "0", "--no-progress", "--ckpt-every", "1000"]
    first = train.main(train.parse_args([*argv, "--max-steps", "2"]))["checkpoint"]
    digest = hashlib.sha256(Path(first).read_bytes()).hexdigest()
    assert train.main(train.parse_args([*argv, "--max-steps", "4", "--resume", "auto"]))["step"] == 4
    assert hashlib.sha256(Path(first).read_bytes()).hexdigest() == digest
