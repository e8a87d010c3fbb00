"""The paper's L2 alpha at a width far from SiT's: one warning with the scaled alpha and the rms form."""

import warnings

import pytest
import torch
from torch import nn

import anm


def blocks(width):
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(2)])


def width_warnings(width, **options):
    net = blocks(width)
    reg = anm.attach(net, site="output", **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            net(torch.randn(1, 2, width))
            reg.loss()
    return [str(w.message) for w in caught if "wide" in str(w.message)]


def test_fires_once_for_a_narrow_model_naming_the_fix():
    messages = width_warnings(64)
    assert len(messages) == 1
    assert "64 wide" in messages[0] and "alpha=16.5" in messages[0] and "reduce='rms', alpha=2.06" in messages[0]


@pytest.mark.parametrize("width", [384, 768, 1152])  # SiT-S, SiT-B, SiT-XL
def test_silent_at_sit_widths(width):
    assert width_warnings(width) == []


def test_silent_when_alpha_or_reduction_was_chosen():
    assert width_warnings(64, alpha=16.5) == []
    assert width_warnings(64, reduce="rms", alpha=2.06) == []


def test_fires_for_a_very_wide_model():
    assert len(width_warnings(4096)) == 1
