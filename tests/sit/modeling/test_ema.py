"""modeling/ema.py: the fused EMA update is the per-parameter loop it replaced, bit for bit (on the CPU), and the
reference formula ema = decay * ema + (1 - decay) * weights up to float rounding."""
from __future__ import annotations

import copy

import pytest
import torch
from modeling.ema import ema_parameters, update_ema
from modeling.models import SiT


def perturbed_pair() -> tuple[SiT, SiT]:
    """A small SiT (odd-sized tensors among its 30-odd parameters) and an EMA copy that differs from it."""
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=36, depth=2, num_heads=3, num_classes=5)
    ema = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model, ema


def loop_update(ema: SiT, model: SiT, decay: float) -> None:
    """train.py's update_ema before the multi-tensor ops."""
    ema_params = dict(ema.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


@pytest.mark.orders
@pytest.mark.parametrize("decay", [0.9999, 0.5, 0.0])
def test_the_fused_update_is_the_loop_bit_for_bit(decay: float) -> None:
    model, ema = perturbed_pair()
    reference = copy.deepcopy(ema)
    formula = {name: decay * p + (1 - decay) * dict(model.named_parameters())[name].detach()
               for name, p in ema.named_parameters()}
    ema_params, params = ema_parameters(ema, model)  # built once, stepped three times
    for _ in range(3):
        update_ema(ema_params, params, decay)
        loop_update(reference, model, decay)
    for (name, fused), (_, looped) in zip(ema.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(fused, looped), name
    _, once = perturbed_pair()
    update_ema(once, model, decay)  # the modules themselves: matched by name at the call
    for name, param in once.named_parameters():
        torch.testing.assert_close(param, formula[name], rtol=1e-6, atol=1e-6)


def test_the_model_keeps_its_weights_and_the_lists_follow_a_load() -> None:
    model, ema = perturbed_pair()
    before = copy.deepcopy(model.state_dict())
    ema_params, params = ema_parameters(ema, model)
    reference = copy.deepcopy(model).requires_grad_(False)  # an EMA that starts at the model's weights
    ema.load_state_dict(model.state_dict())  # as a resume does: a copy into the same tensors
    update_ema(ema_params, params, 0.9)
    loop_update(reference, model, 0.9)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and torch.equal(ema.state_dict()[key], reference.state_dict()[key])


def test_models_that_do_not_match_are_refused() -> None:
    model, _ = perturbed_pair()
    with pytest.raises(ValueError, match="do not match"):
        ema_parameters(torch.nn.Linear(2, 2), model)
