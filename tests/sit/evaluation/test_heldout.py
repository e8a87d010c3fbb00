"""evaluation/heldout.py: a fixed held-out set, the FM loss on it and the per-block update norms."""
from __future__ import annotations

import pytest
import torch
from evaluation import heldout
from modeling.models import SiT
from modeling.transport import create_transport

import anm


def tiny_sit(seed: int = 0) -> SiT:
    torch.manual_seed(seed)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=1,
                class_dropout_prob=0.0)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the blocks something to do
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_make_heldout_fixes_noise_and_uses_a_uniform_t_grid():
    x = torch.randn(6, 3, 8, 8)
    a, b = heldout.make_heldout(x, seed=3), heldout.make_heldout(x, seed=3)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, heldout.make_heldout(x, seed=4).noise)
    assert a.t.tolist() == pytest.approx([(i + 0.5) / 6 for i in range(6)])
    assert a.y.tolist() == [0] * 6 and len(a) == 6
    labels = torch.arange(6)
    assert heldout.make_heldout(x, labels).y.tolist() == labels.tolist()
    gen = torch.Generator().manual_seed(9)
    assert torch.equal(heldout.make_heldout(x, generator=gen).noise,
                       torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))


def test_fm_loss_is_the_transport_loss_on_the_fixed_inputs_in_any_batch_size():
    model, transport = tiny_sit(), create_transport()
    held = heldout.make_heldout(torch.randn(10, 3, 8, 8), seed=1)
    model.train()
    loss = heldout.fm_loss(model, transport, held, batch_size=3)
    assert model.training  # the mode is restored
    with torch.no_grad():
        model.eval()
        expected = transport.training_losses(model, held.x, dict(y=held.y), t=held.t, noise=held.noise)["loss"]
    assert loss == pytest.approx(expected.mean().item(), rel=1e-6)
    assert heldout.fm_loss(model, transport, held, batch_size=256) == pytest.approx(loss, rel=1e-6)
    assert heldout.fm_loss(tiny_sit(1), transport, held) != pytest.approx(loss, rel=1e-3)


def test_update_norms_are_the_mean_residual_update_of_each_block():
    model, transport = tiny_sit(), create_transport()
    held = heldout.make_heldout(torch.randn(5, 3, 8, 8), seed=2)
    per_block = heldout.update_norms(model, transport, held, batch_size=2)
    assert len(per_block) == 2 and all(value > 0 for value in per_block)
    model.eval()
    with torch.no_grad(), anm.ActivationCollector(model, layers="auto", site="update") as collector:
        model(transport.plan(held.t, held.noise, held.x)[0], held.t, held.y)
        expected = [norms.mean().item() for norms in collector.norms()]
    assert per_block == pytest.approx(expected, rel=1e-5)
    # A freshly built SiT (adaLN-Zero) makes no update at all: norms are exactly zero.
    fresh = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=1)
    assert heldout.update_norms(fresh, transport, held) == [0.0, 0.0]


def test_measure_returns_per_token_norms_at_each_site_and_leaves_no_hooks():
    model, transport = tiny_sit(), create_transport()
    held = heldout.make_heldout(torch.randn(4, 3, 8, 8), seed=3)
    result = heldout.measure(model, transport, held, sites=("update", "output"), batch_size=3)
    assert result.norms["update"].shape == result.norms["output"].shape == (2, 4, 16)  # blocks, items, tokens
    assert result.mean_per_block("output") != result.mean_per_block("update")
    assert result.fm_loss == pytest.approx(heldout.fm_loss(model, transport, held), rel=1e-6)
    assert all(not block._forward_hooks for block in model.blocks)
