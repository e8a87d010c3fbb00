"""runtime/checkpoint_weights.py, and train.py / sample.py on a checkpoint whose weights do not fit: one line."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from modeling.models import SiT
from runtime.checkpoint_weights import check_checkpoint_weights
from runtime.cli import UsageError

SIT_DIR = Path(__file__).resolve().parents[3] / "examples" / "sit"
CONFIG = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=4,
              class_dropout_prob=0.1, learn_sigma=False)
KEY = "blocks.0.attn.qkv.weight"


def good_checkpoint() -> dict:
    torch.manual_seed(0)
    model = SiT(**CONFIG)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    return dict(model=model.state_dict(), ema=model.state_dict(), opt=opt.state_dict())


def renamed(state: dict) -> dict:
    return {("blocks.0.attn.qkv_renamed.weight" if key == KEY else key): value for key, value in state.items()}


def shape_of_opt_moment(state: dict) -> dict:
    state = dict(state, state=dict(state["state"]))
    first = min(state["state"])  # the position embedding (fixed, no gradient) has no moments
    state["state"][first] = dict(state["state"][first], exp_avg=torch.zeros(3))
    return state


DAMAGE = {
    "renamed model key": ("model", renamed, ["model lacks blocks.0.attn.qkv.weight",
                                             "model has unknown blocks.0.attn.qkv_renamed.weight (renamed?)"]),
    "missing ema key": ("ema", lambda s: {k: v for k, v in s.items() if k != KEY}, ["ema lacks " + KEY]),
    "wrong shape": ("model", lambda s: dict(s, **{KEY: torch.zeros(3, 3)}), [f"model {KEY} is (3, 3), not (48, 16)"]),
    "not a tensor": ("ema", lambda s: dict(s, **{KEY: [1, 2]}), [f"ema {KEY} is a list, not (48, 16)"]),
    "opt moment shape": ("opt", shape_of_opt_moment, ["opt exp_avg of parameter 1 is (3,), not"]),
    "opt of another model": ("opt", lambda s: dict(s, param_groups=[dict(s["param_groups"][0], params=[0, 1])]),
                             ["opt holds 2 parameters, the model has"]),
    "opt not a state dict": ("opt", lambda s: [1], ["opt is a list without AdamW's state and param_groups"]),
}


def test_a_good_checkpoint_fits() -> None:
    check_checkpoint_weights(good_checkpoint(), "ok.pt", CONFIG)


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_unreadable_part_is_named(damage: str) -> None:
    part, change, fragments = DAMAGE[damage]
    checkpoint = good_checkpoint()
    checkpoint[part] = change(checkpoint[part])
    with pytest.raises(UsageError) as error:
        check_checkpoint_weights(checkpoint, "bad.pt", CONFIG)
    message = str(error.value)
    assert "\n" not in message and message.startswith("checkpoint bad.pt does not fit the model")
    for fragment in fragments:
        assert fragment in message, message


def run_script(script: str, argv: list, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python <script> ARGV`, run in this process."""
    monkeypatch.setattr(sys, "argv", [str(SIT_DIR / script), *map(str, argv)])
    try:
        runpy.run_path(str(SIT_DIR / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


TINY = ["--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/4", "--num-workers", "0",
        "--global-batch-size", "8", "--eval-every", "0", "--sample-every", "0", "--no-console-log", "--no-progress",
        "--max-steps", "2", "--ckpt-every", "2"]


def test_resume_and_sample_from_a_checkpoint_with_a_renamed_key(tmp_path: Path, monkeypatch, capsys) -> None:
    """A renamed key in model gave a raw load_state_dict traceback on resume, after the run folder was made."""
    code, err = run_script("train.py", [*TINY, "--results-dir", tmp_path / "r", "--exp-name", "a"], monkeypatch, capsys)
    assert code == 0, err
    checkpoint = torch.load(tmp_path / "r" / "a" / "checkpoints" / "0000002.pt", weights_only=False)
    checkpoint["model"] = renamed(checkpoint["model"]) if KEY in checkpoint["model"] else None
    assert checkpoint["model"] is not None, "the test's key is not in SiT-N/4"
    torch.save(checkpoint, tmp_path / "edited.pt")
    code, err = run_script("train.py", [*TINY, "--max-steps", "4", "--results-dir", tmp_path / "r", "--exp-name", "b",
                                        "--resume", tmp_path / "edited.pt"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"train.py: error: checkpoint {tmp_path / 'edited.pt'} does not "
                                                   "fit the model it was saved with (model lacks " + KEY), err
    assert not (tmp_path / "r" / "b").exists()
    checkpoint["ema"] = {key: value for key, value in checkpoint["ema"].items() if key != KEY}
    torch.save(checkpoint, tmp_path / "edited.pt")
    code, err = run_script("sample.py", ["--ckpt", tmp_path / "edited.pt", "--num-steps", "1", "--mode", "ode",
                                         "--method", "euler", "--out", tmp_path / "grid.png"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("sample.py: error: weights in checkpoint ") and KEY in line, err
    assert not (tmp_path / "grid.png").exists()
