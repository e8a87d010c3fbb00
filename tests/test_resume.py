"""Resuming: the warm-up clock against the optimizer's own step count (Adam's state[p]["step"])."""

import warnings

import pytest
import torch
from toy_models import ToyDiT, make_batch

import anm

ALPHA, WARMUP = 3.0, 40


def train(wrapped, opt, steps: int) -> list[float]:
    weights = []
    for _ in range(steps):
        x, t = make_batch()
        loss = wrapped(x, t).pow(2).mean() + wrapped.loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        weights.append(wrapped.stats()["anm/weight"])
    return weights


def first_run(tmp_path, steps: int = 5):
    torch.manual_seed(0)
    wrapped = anm.ANM(ToyDiT(), alpha=ALPHA, warmup=WARMUP)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    train(wrapped, opt, steps)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": wrapped.state_dict(), "opt": opt.state_dict(), "anm": wrapped.anm_state_dict()}, path)
    return path


def resumed(path, restore_anm: bool):
    wrapped = anm.ANM(ToyDiT(), alpha=ALPHA, warmup=WARMUP)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    checkpoint = torch.load(path, weights_only=True)
    wrapped.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    if restore_anm:
        wrapped.load_anm_state_dict(checkpoint["anm"])
    return wrapped, opt


def test_resuming_without_anm_state_warns_naming_the_fix(tmp_path):
    wrapped, opt = resumed(first_run(tmp_path), restore_anm=False)
    with pytest.warns(UserWarning, match=r"has taken 6 steps.*counted 1.*load_anm_state_dict"):
        weights = train(wrapped, opt, 3)
    assert weights == [0.0, 1 / WARMUP, 2 / WARMUP]  # what the warning is about: the warm-up restarted


def test_a_restored_resume_and_a_fresh_run_say_nothing(tmp_path):
    path = first_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped, opt = resumed(path, restore_anm=True)
        assert train(wrapped, opt, 3) == [5 / WARMUP, 6 / WARMUP, 7 / WARMUP]
        fresh = anm.ANM(ToyDiT(), alpha=ALPHA, warmup=WARMUP)
        train(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-3), 3)


def test_starting_anm_mid_training_on_purpose_is_said_with_step_zero():
    torch.manual_seed(0)
    model = ToyDiT()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):  # trained without ANM first
        x, t = make_batch()
        model(x, t).pow(2).mean().backward()
        opt.step()
    wrapped = anm.ANM(model, alpha=ALPHA, warmup=WARMUP)
    with pytest.warns(UserWarning, match=r"load_state_dict\(\{'step': 0\}\)"):
        train(wrapped, opt, 2)
    wrapped.close()
    again = anm.ANM(model, alpha=ALPHA, warmup=WARMUP)
    again.load_anm_state_dict({"step": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(again, opt, 2) == [0.0, 1 / WARMUP]
