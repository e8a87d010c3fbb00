"""examples/sit/data/train_data.py with --data latents: the VAE a run takes from meta.json is recorded as an
absolute path, and a resume whose held-out choice (--eval-every, --eval-data-path) changes the training set's
length is refused naming those flags (runtime/checks.py, heldout_fix)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import train
from runtime.checks import check_resume_compatible, heldout_fix
from runtime.cli import UsageError

NUM, HELD = 12, 4


def write_latents(root: Path, **meta_changes) -> Path:
    """An extract_latents.py folder: NUM latents (4x2x2) of 16px images, 2 classes, one chunk."""
    root.mkdir(parents=True)
    meta = dict(num_images=NUM, image_size=16, chunk_size=NUM, latent_shape=[4, 2, 2], num_classes=2,
                scaling_factor=0.18215, shift_factor=None, dtype="float16", **meta_changes)
    (root / "meta.json").write_text(json.dumps(meta))
    np.save(root / "labels.npy", np.arange(NUM, dtype=np.int64) % 2)
    moments = np.random.default_rng(0).standard_normal((NUM, 2, 2, 4, 2, 2)).astype(np.float16)
    moments[:, :, 1] = -2.0  # the log-variances: a small posterior spread
    np.save(root / "chunk_000000.npy", moments)
    return root


def argv(latents: Path, results: Path, *extra: str) -> list[str]:
    return ["--data", "latents", "--data-path", str(latents), "--model", "SiT-N/2", "--num-workers", "0",
            "--global-batch-size", "4", "--eval-samples", str(HELD), "--sample-every", "0", "--results-dir",
            str(results), "--exp-name", "run", "--no-console-log", "--no-progress", *extra]


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("train-data") / "latents")


def test_a_relative_vae_in_meta_json_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VAE named by meta.json went into args.json and the checkpoint as written, relative to a folder that
    sample.py, run from elsewhere, does not know."""
    data = write_latents(tmp_path / "latents", vae="my-vae")
    (tmp_path / "my-vae").mkdir()
    monkeypatch.chdir(tmp_path)
    out = train.main(train.parse_args(argv(data, tmp_path / "r", "--max-steps", "1", "--eval-every", "0")))
    expected = str(tmp_path / "my-vae")
    assert json.loads((Path(out["experiment_dir"]) / "args.json").read_text())["vae"] == expected
    checkpoint = torch.load(out["checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["vae"] == expected and checkpoint["args"]["vae"] == expected


@pytest.mark.parametrize("first, then, fix", [
    (["--eval-every", "0"], [], "resume with --eval-every 0 or --eval-data-path"),
    (["--eval-every", "2"], ["--eval-every", "0"], "while --eval-every 0 trains on all of them: resume with "
                                                   "--eval-every 2 and without --eval-data-path"),
    (["--eval-every", "2"], ["--eval-data-path", "LATENTS"], "trains on all of them: resume with --eval-every 2 "
                                                             "and without --eval-data-path"),
])
def test_a_resume_with_another_heldout_choice_names_the_flags(latents: Path, tmp_path: Path, first: list[str],
                                                              then: list[str], fix: str) -> None:
    """--eval-every is operational, but with latents and no --eval-data-path it removes --eval-samples items
    from training: the refusal pointed at the data set, not at the flag to pass."""
    train.main(train.parse_args(argv(latents, tmp_path, "--max-steps", "1", *first)))
    then = [str(latents) if value == "LATENTS" else value for value in then]
    before = (tmp_path / "run" / "args.json").read_text()
    with pytest.raises(UsageError) as error:
        train.main(train.parse_args(argv(latents, tmp_path, "--max-steps", "2", "--resume", "auto", *then)))
    message = str(error.value)
    assert "a data set of" in message and fix in message, message
    assert "resume with those settings" not in message  # the generic advice, which did not name the flags
    assert (tmp_path / "run" / "args.json").read_text() == before
    # The advice works: the run resumes with what the message says.
    advice = ["--eval-every", "0"] if not then else ["--eval-every", "2"]
    out = train.main(train.parse_args(argv(latents, tmp_path, "--max-steps", "2", "--resume", "auto", *advice)))
    assert out["step"] == 2


def checkpoint_of(num_items: int, **saved) -> dict:
    return dict(model_config={}, num_items=num_items, epoch_step=0, args=saved)


def args_of(**values) -> argparse.Namespace:
    base = dict(data="latents", data_size=None, global_batch_size=4, global_seed=0, eval_every=5000,
                eval_samples=HELD, eval_data_path=None)
    return argparse.Namespace(**(base | values))


def test_heldout_fix_only_for_a_difference_of_the_heldout_items() -> None:
    assert "--eval-every 0 or --eval-data-path" in heldout_fix({}, NUM, args_of(), NUM - HELD)
    assert heldout_fix({}, NUM, args_of(), NUM - HELD + 1) is None  # another data set
    assert heldout_fix({}, NUM, args_of(eval_every=0), NUM - HELD) is None  # nothing held out now
    assert heldout_fix({}, NUM, args_of(data="sinusoid"), NUM - HELD) is None  # its held-out set is its own
    assert "--eval-every N > 0" in heldout_fix({}, NUM - HELD, args_of(eval_every=0), NUM)  # no saved cadence
    assert heldout_fix({}, NUM - HELD, args_of(), NUM) is None  # holds out now too: the data changed
    with pytest.raises(UsageError, match=r"a data set of 12 items \(now 14\): .* or start a new --exp-name$"):
        check_resume_compatible(checkpoint_of(NUM), "ck.pt", args_of(), {}, NUM + 2, 3)
