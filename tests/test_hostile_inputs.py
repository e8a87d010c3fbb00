"""Every public entry point answers bad input with one ANMError that names the fix, never a deep TypeError."""

import numpy as np
import pytest
import torch
from torch import nn
from toy_models import ToyDiT, make_batch

import anm

NORMS = torch.ones(2, 3)


@pytest.mark.parametrize("weight", [torch.tensor(-1.0), torch.tensor(float("nan")), torch.tensor([2.0, 3.0]),
                                    torch.tensor(1), True, None, "1", float("inf"), -0.5])
def test_anm_loss_rejects_bad_weights(weight):
    with pytest.raises(anm.ANMError, match="weight"):
        anm.anm_loss(NORMS, alpha=2.0, weight=weight)


@pytest.mark.parametrize("norms", [None, {"a": NORMS}, "norms", 3.0, [NORMS, None], torch.ones(2, 3, dtype=torch.long),
                                   torch.ones(2, 3, dtype=torch.complex64)])
def test_anm_loss_rejects_what_is_not_a_norm(norms):
    with pytest.raises(anm.ANMError, match="norms must be"):
        anm.anm_loss(norms, alpha=2.0)


@pytest.mark.parametrize("granularity", ["token", "sample", "batch"])
def test_an_empty_batch_adds_no_term(granularity):
    assert anm.anm_loss(torch.ones(0, 3), alpha=2.0, granularity=granularity).item() == 0.0


def test_numpy_numbers_are_numbers():
    reg = anm.attach(ToyDiT(), alpha=np.int64(2), lam=np.float32(10), warmup=np.int64(4), reduce="rms")
    assert reg.warmup == 4 and reg.alpha == 2.0
    reg.detach()
    anm.attach(ToyDiT(), warmup=4.0, reduce="rms", alpha=2.0).detach()
    assert anm.warmup_weight(np.int64(2), np.int64(4)) == 0.5
    with pytest.raises(anm.ANMError, match="warmup"):
        anm.attach(ToyDiT(), warmup=2.5)


@pytest.mark.parametrize("call, match", [
    (lambda: anm.activation_norms(torch.ones(2, 0), "rms"), "no features"),
    (lambda: anm.activation_norms(torch.ones(2, 3), minus="x"), "minus="),
    (lambda: anm.activation_norms(torch.ones(2, 3), minus=torch.ones(2, 3, dtype=torch.long)), "minus="),
    (lambda: anm.activation_norms(torch.ones(2, 3), minus=torch.ones(2, 3, device="meta")), "device"),
    (lambda: anm.find_blocks(None), "nn.Module"),
    (lambda: anm.select_layers([1, 2], "x"), "nn.Module"),
    (lambda: anm.select_layers(ToyDiT(), lambda name: True), r"f\(name, module\)"),
    (lambda: anm.warmup_weight(torch.tensor(3.0, device="meta"), 10), "step"),
    (lambda: anm.ActivationCollector(ToyDiT(), training_only="no"), "training_only"),
    (lambda: anm.ActivationCollector(ToyDiT(), keep_activations=1), "keep_activations"),
])
def test_bad_calls_name_the_fix(call, match):
    with pytest.raises(anm.ANMError, match=match):
        call()


def test_a_feature_dim_out_of_range_is_named_at_the_first_forward():
    model = ToyDiT()
    reg = anm.attach(model, feature_dim=5, reduce="rms", alpha=2.0)
    with pytest.raises(anm.ANMError, match="feature_dim=5 is out of range"):
        model(*make_batch())
    reg.detach()


def test_errors_are_value_and_runtime_errors():
    with pytest.raises(ValueError):
        anm.attach(nn.Linear(2, 2))
    with pytest.raises(RuntimeError):
        anm.attach(nn.Linear(2, 2))
