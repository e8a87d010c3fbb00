"""train.py's command line and training options: help texts, progress bar, gradient accumulation and
clipping, metric loggers, and a two-node torchrun launch (CPU, gloo, tiny models)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train
from numerics import assert_same_adam_training
from ports import free_port

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "sit" / "train.py"
# Label dropout draws from each process's own stream; without it a step's numbers depend only on the batch.
TINY = ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2", "--num-workers", "0",
        "--eval-every", "0", "--sample-every", "0", "--no-console-log", "--no-progress", "--class-dropout-prob", "0"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_flag_has_help_and_shows_its_default(capsys) -> None:
    parser = train.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    # The description's examples are printed as written, not re-wrapped.
    assert "    torchrun --nproc_per_node 8 examples/sit/train.py --data latents --data-path latents/ \\\n" in text
    assert "(default: 256)" in text and "(default: 0.0001)" in text and "(default: ['csv'])" in text
    assert "(default: None)" not in text  # flags without a default say in words what happens


def test_progress_bar_follows_the_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # tqdm draws on stderr
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert train.parse_args([]).progress is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert train.parse_args([]).progress is True
    assert train.parse_args(["--no-progress"]).progress is False


def test_report_to_defaults_to_csv_and_keeps_the_old_flag() -> None:
    assert train.parse_args([]).report_to == ["csv"]
    assert train.parse_args(["--no-tensorboard"]).report_to == ["csv"]
    assert train.parse_args(["--report-to", "csv", "wandb"]).report_to == ["csv", "wandb"]


@pytest.mark.orders
def test_grad_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    """K micro-batches of b/K accumulate to the step of one batch b: same weights, loss and grad norm."""
    common = [*TINY, "--global-batch-size", "8", "--max-steps", "3", "--log-every", "1", "--max-grad-norm", "1e6",
              "--anm", "--anm-alpha", "5", "--anm-warmup", "0"]
    full = train.main(train.parse_args([*common, "--results-dir", str(tmp_path / "full")]))
    accum = train.main(train.parse_args([*common, "--results-dir", str(tmp_path / "accum"),
                                         "--grad-accum-steps", "2"]))
    init = train.SiT(**full["model_config"])
    assert not torch.equal(init.final_layer.linear.weight, full["model"].final_layer.linear.weight)
    # The micro-batches sum the gradient in another order: equal to float32 rounding, except where Adam
    # normalises a gradient element that is itself rounding noise (tests/numerics.py).
    assert_same_adam_training(accum["model"].state_dict(), full["model"].state_dict(), lr=1e-4, steps=3)
    for a, b in zip(read_rows(Path(full["log_csv"])), read_rows(Path(accum["log_csv"])), strict=True):
        for key in ("fm_loss", "anm_loss", "grad_norm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), (a["step"], key)
    assert float(read_rows(Path(full["log_csv"]))[-1]["grad_norm"]) > 0


def test_max_grad_norm_clips(tmp_path: Path) -> None:
    """With a tiny clip every update is tiny; without clipping it is not (same data and seed)."""
    common = [*TINY, "--global-batch-size", "8", "--max-steps", "1", "--lr", "0.1", "--log-every", "1"]
    free = train.main(train.parse_args([*common, "--results-dir", str(tmp_path / "free")]))
    clipped = train.main(train.parse_args([*common, "--results-dir", str(tmp_path / "clipped"),
                                           "--max-grad-norm", "1e-12"]))
    init = train.SiT(**free["model_config"]).state_dict()

    def moved(out: dict) -> float:
        return max((out["model"].state_dict()[k] - v).abs().max().item() for k, v in init.items())

    # AdamW's first step moves each weight by about lr whatever the gradient's scale, unless the gradient is
    # so small that Adam's eps dominates: that is what clipping to 1e-12 does.
    assert moved(free) > 0.05 and moved(clipped) < 1e-3
    assert "grad_norm" in read_rows(Path(clipped["log_csv"]))[-1]


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_optional_logger_writes_its_files(tmp_path: Path, logger: str, monkeypatch) -> None:
    pytest.importorskip(logger)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = train.main(train.parse_args([*TINY, "--global-batch-size", "8", "--max-steps", "2", "--log-every", "1",
                                       "--results-dir", str(tmp_path), "--report-to", "csv", logger]))
    folder = Path(out["experiment_dir"]) / ("tb" if logger == "tensorboard" else "wandb")
    assert folder.is_dir() and any(folder.rglob("*")), list(Path(out["experiment_dir"]).rglob("*"))
    assert len(read_rows(Path(out["log_csv"]))) == 2



@pytest.mark.orders
@pytest.mark.slow  # two torchrun launches plus a reference run
def test_two_nodes_train_like_one_process(tmp_path: Path) -> None:
    """torchrun --nnodes 2 (one process per "node", gloo on CPU) ends at the weights of one process with the
    same global batch."""
    argv = [*TINY, "--global-batch-size", "8", "--max-steps", "3", "--log-every", "1", "--anm", "--anm-alpha", "5",
            "--anm-warmup", "0", "--exp-name", "run"]
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"localhost:{port}", str(TRAIN), *argv, "--results-dir", str(tmp_path / "nodes")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    single = train.main(train.parse_args([*argv, "--results-dir", str(tmp_path / "single")]))
    two = torch.load(tmp_path / "nodes" / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert two["world_size"] == 2
    for part, module in (("model", single["model"]), ("ema", single["ema"])):
        assert_same_adam_training(two[part], module.state_dict(), lr=1e-4, steps=3)
