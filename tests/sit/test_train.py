"""train.py: exact resume, the CSV log, model sizes and a 2-process DDP run (CPU, tiny models)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train
from modeling.model_config import parse_model_name
from modeling.models import SIT_SIZES
from numerics import assert_same_adam_training
from ports import free_port
from runtime import checkpoints, run_log

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"


def tiny_args(results: Path, *extra: str):
    """8x8 sinusoids, a 2-block width-32 SiT, 6 steps per epoch (48 images / batch 8)."""
    return train.parse_args([
        "--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2",
        "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--exp-name", "run",
        "--log-every", "2", "--eval-every", "3", "--eval-samples", "8", "--sample-every", "0",
        "--ckpt-every", "1000", "--no-progress", *extra,
    ])


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def assert_same_tree(a, b, where: str = "") -> None:
    """Recursively compare checkpoint contents; tensors must be bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


ANM_FLAGS = ("--anm", "--anm-alpha", "5", "--anm-warmup", "4")  # ANM on, warm-up spans the resume point


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """8 uninterrupted steps (crossing one epoch boundary) to compare resumed runs against."""
    return train.main(tiny_args(tmp_path_factory.mktemp("straight"), "--max-steps", "8", *ANM_FLAGS))


@pytest.mark.parametrize("split", [3, 6])  # mid-epoch, and exactly at the epoch boundary
def test_resume_is_bit_exact(tmp_path: Path, straight: dict, split: int) -> None:
    first = train.main(tiny_args(tmp_path, "--max-steps", str(split), *ANM_FLAGS))
    assert first["step"] == split
    resumed = train.main(tiny_args(tmp_path, "--max-steps", "8", "--resume", "auto", *ANM_FLAGS))
    assert resumed["step"] == straight["step"] == 8

    ck_a = torch.load(straight["checkpoint"], weights_only=True)
    ck_b = torch.load(resumed["checkpoint"], weights_only=True)
    for key in ("model", "ema", "opt", "rng", "anm", "step", "epoch", "epoch_step"):
        assert_same_tree(ck_a[key], ck_b[key], key)
    assert (ck_b["epoch"], ck_b["epoch_step"]) == (1, 2)
    # Training moved the weights away from the (identical) initialisation.
    init = train.SiT(**straight["model_config"])
    assert not torch.equal(init.final_layer.linear.weight, straight["model"].final_layer.linear.weight)
    assert resumed["heldout_fm_loss"] == straight["heldout_fm_loss"]
    # The log of the resumed run reads as one run: every logged step once, in order.
    _, rows = read_csv(Path(resumed["log_csv"]))
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_resume_without_rng_restore_diverges(tmp_path: Path, straight: dict, monkeypatch) -> None:
    """The exact-resume test can fail: skipping the RNG restore breaks bit-equality."""
    train.main(tiny_args(tmp_path, "--max-steps", "3", *ANM_FLAGS))
    monkeypatch.setattr(checkpoints, "set_rng_state", lambda *a, **k: None)
    resumed = train.main(tiny_args(tmp_path, "--max-steps", "8", "--resume", "auto", *ANM_FLAGS))
    weight = straight["model"].final_layer.linear.weight
    assert not torch.equal(weight, resumed["model"].final_layer.linear.weight)


def test_csv_log_columns_and_outputs(tmp_path: Path) -> None:
    out = train.main(tiny_args(tmp_path, "--max-steps", "4", "--anm", "--anm-alpha", "5",
                               "--sample-every", "4",
                               "--sample-grid", "4", "--sample-num-steps", "2", "--ckpt-every", "2"))
    run = tmp_path / "run"
    fields, rows = read_csv(run / "log.csv")
    assert fields[: len(run_log.LOG_FIELDS)] == run_log.LOG_FIELDS
    assert {"anm/norm/blocks.0", "anm/norm/blocks.1", "anm/frac_below_alpha"} <= set(fields)
    by_step = {int(row["step"]): row for row in rows}
    assert sorted(by_step) == [0, 2, 3, 4]
    assert by_step[0]["heldout_fm_loss"] != "" and by_step[0]["fm_loss"] == ""  # evaluation before training
    assert by_step[2]["fm_loss"] != "" and by_step[2]["heldout_fm_loss"] == ""
    last = {key: float(by_step[4][key]) for key in ("loss", "fm_loss", "anm_loss")}
    assert last["loss"] == pytest.approx(last["fm_loss"] + last["anm_loss"])
    assert float(by_step[4]["anm_loss"]) > 0 and float(by_step[4]["img_per_sec"]) > 0
    assert sorted(os.listdir(run / "checkpoints")) == ["0000002.pt", "0000004.pt"]
    assert os.listdir(run / "samples") == ["0000004.png"] and out["sample_grid"].endswith("0000004.png")
    log_text = (run / "log.txt").read_text()
    assert "Saved checkpoint" in log_text and "\x1b" not in log_text  # plain text, no colour codes
    assert json.loads((run / "args.json").read_text())["anm_alpha"] == 5.0  # the run's configuration
    ckpt = torch.load(out["checkpoint"], weights_only=True)  # loads without unpickling arbitrary objects
    assert ckpt["step"] == 4 and ckpt["anm"] == {"step": 4} and ckpt["args"]["anm"] is True


def test_model_sizes_and_overrides() -> None:
    args = train.parse_args(["--model", "SiT-T/4", "--depth", "3", "--hidden-size", "48"])
    config = train.model_config(args, in_channels=3, input_size=32, num_classes=1)
    assert [config[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")] == [3, 48, 4, 4]
    assert train.model_config(train.parse_args(["--model", "SiT-XL/2"]), 4, 32, 1000)["hidden_size"] == 1152
    with pytest.raises(train.UsageError, match="unknown model"):
        parse_model_name("SiT-Q/2")
    assert parse_model_name("SiT-N/2") == ("N", 2) and SIT_SIZES["T"] == (4, 64, 4)



def test_ddp_two_processes_end_identical(tmp_path: Path) -> None:
    """torchrun-style launch of 2 gloo ranks; both ranks must hold bit-identical weights at the end."""
    argv = [str(a) for a in ["--data", "sinusoid", "--image-size", "8", "--data-size", "48",
                             "--model", "SiT-N/2",
                             "--global-batch-size", "8", "--num-workers", "0", "--results-dir", tmp_path,
                             "--exp-name", "ddp", "--max-steps", "3", "--log-every", "1", "--eval-every", "3",
                             "--eval-samples", "8", "--sample-every", "0", "--no-progress", "--anm",
                             "--anm-alpha", "5", "--anm-warmup", "0"]]
    script = (
        "import os, sys, torch; sys.path.insert(0, sys.argv[1]); import train; "
        "out = train.main(train.parse_args(sys.argv[3:])); "
        "torch.save({'model': out['model'].state_dict(), 'ema': out['ema'].state_dict()}, "
        "os.path.join(sys.argv[2], 'rank%s.pt' % os.environ['RANK']))"
    )
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(SIT_DIR), str(tmp_path), *argv],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "ema"):
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), f"{part}.{key} differs between ranks"
    init = train.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                     num_classes=1)
    assert not torch.equal(r0["model"]["final_layer.linear.weight"], init.final_layer.linear.weight)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeds
    _, rows = read_csv(tmp_path / "ddp" / "log.csv")
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]


@pytest.mark.orders
def test_lambda_zero_only_measures(tmp_path: Path) -> None:
    """--anm --anm-lambda 0 logs the norms and trains like --no-anm, up to float rounding (the extra
    zero-gradient branches change autograd's summation order, so not bit-for-bit)."""
    plain = train.main(tiny_args(tmp_path / "plain", "--max-steps", "3"))
    measured = train.main(tiny_args(tmp_path / "measured", "--max-steps", "3", "--anm", "--anm-lambda", "0"))
    assert_same_adam_training(measured["model"].state_dict(), plain["model"].state_dict(), lr=1e-4, steps=3)
    fields, rows = read_csv(Path(measured["log_csv"]))
    assert "anm/norm/blocks.1" in fields and float(rows[-1]["anm/norm/blocks.1"]) > 0
    assert float(rows[-1]["anm_loss"]) == 0.0


@pytest.mark.orders
@pytest.mark.slow  # inductor compiles the tiny SiT's forward and backward
def test_compiled_training_matches_eager_and_keeps_the_anm_term(tmp_path: Path) -> None:
    eager = train.main(tiny_args(tmp_path / "eager", "--max-steps", "3", *ANM_FLAGS))
    compiled = train.main(tiny_args(tmp_path / "compiled", "--max-steps", "3", "--compile", *ANM_FLAGS))
    _, eager_rows = read_csv(Path(eager["log_csv"]))
    _, compiled_rows = read_csv(Path(compiled["log_csv"]))
    for a, b in zip(eager_rows, compiled_rows, strict=True):
        for key in ("loss", "anm_loss", "heldout_fm_loss"):
            if a[key] != "":
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), (a["step"], key)
    assert compiled["anm_loss"] > 0  # the hooks ran inside the compiled graph
