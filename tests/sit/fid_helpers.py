"""What the tests of the metrics during and after training share (their fixtures are in conftest.py): a tiny
run's command line, a reference built the way docs/sit.md's toy recipe builds one, the stub network."""
from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import build_reference
import export_images
import pytest
import train
from evaluation import sample_metrics
from stub_features import StubFeatures, stub_factory

LAUNCHER = Path(__file__).resolve().parent / "fid_launcher.py"
TRAINING = ("fm_loss", "anm_loss", "loss", "grad_norm", "heldout_fm_loss", "heldout_fm_loss_ema")
METRICS = ("fid", "sfid", "precision", "recall")
FID = ("--fid-every", "2", "--fid-samples", "6", "--fid-num-steps", "2", "--fid-per-proc-batch-size", "4",
       "--fid-cfg-scale", "2.0")  # SDE (sample_ddp.py's default) with guidance: Brownian noise, doubled batches


class CountingStub(StubFeatures):
    """The stub network, counting its calls; on call number `signal_at`, SIGTERM to this process."""

    def __init__(self, signal_at: int | None = None):
        super().__init__()
        self.signal_at = signal_at

    def __call__(self, images):
        if len(self.calls) + 1 == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(images)


def argv(results: Path, *extra: str, name: str = "run") -> list[str]:
    """8x8 sinusoids, a 2-block SiT with ANM, 6 steps per epoch; checkpoints at steps 2 and 4."""
    return ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--exp-name", name,
            "--log-every", "2", "--eval-every", "2", "--eval-samples", "8", "--sample-every", "0", "--ckpt-every", "2",
            "--no-progress", "--max-steps", "4", "--anm", "--anm-alpha", "5", "--anm-warmup", "2", *extra]


def rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def fid_rows(run: Path) -> dict[int, dict]:
    """{step: log.csv row} of the rows that hold a FID."""
    return {int(row["step"]): row for row in rows(run) if row.get("fid")}



def make_reference(root: Path) -> str:
    """docs/sit.md's toy recipe at 8x8: export_images.py writes 40 fresh sinusoids, build_reference.py makes the
    reference batch of them (with the stub network's statistics)."""
    export_images.main(export_images.parse_args(["--data", "sinusoid", "--image-size", "8", "--num-images", "40",
                                                 "--seed", "7", "--out", str(root / "images")]))
    out = root / "ref.npz"
    build_reference.main(build_reference.parse_args(["--data-path", str(root / "images"), "--out", str(out),
                                                     "--image-size", "8", "--num-workers", "0", "--device", "cpu"]),
                         extractor_factory=stub_factory)
    return str(out)


def train_pair(results: Path, ref: str) -> dict[str, Path]:
    """The same 4 steps without and with --fid-every 2 (the stub network computing the features)."""
    train.main(train.parse_args(argv(results, name="plain")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample_metrics, "default_extractor", lambda device: StubFeatures())
        train.main(train.parse_args(argv(results, *FID, "--fid-ref", ref, name="fid")))
    return dict(plain=results / "plain", fid=results / "fid")
