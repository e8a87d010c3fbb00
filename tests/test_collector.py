import pytest
import torch
from torch import nn
from toy_models import ToyDiT, make_batch

import anm
from anm import ActivationCollector


def test_records_update_and_output_norms_per_call():
    model = ToyDiT(depth=3)
    x, t = make_batch()
    with ActivationCollector(model, site="output") as out_c, ActivationCollector(model, site="update") as upd_c:
        model(x, t)
        model(x, t)
        assert len(out_c.norms()) == 6 and [len(v) for v in upd_c.norms_by_layer().values()] == [2, 2, 2]
        h, c = model.embed(x), model.cond(t[:, None])
        for i, block in enumerate(model.blocks):
            new = block(h, c)
            torch.testing.assert_close(out_c.norms()[i], new.norm(dim=-1))
            torch.testing.assert_close(out_c.norms()[i + 3], new.norm(dim=-1))  # second call, same input
            torch.testing.assert_close(upd_c.norms()[i], (new - h).norm(dim=-1))
            h = new
    assert out_c.records == [] and all(len(b._forward_hooks) == 0 for b in model.blocks)


def test_values_match_manual_computation():
    model = ToyDiT(depth=3)
    x, t = make_batch()
    collector = ActivationCollector(model, site="update", keep_activations=True)
    model(x, t)
    h, c = model.embed(x), model.cond(t[:, None])
    for name, recorded, kept in zip(collector.names, collector.norms(), collector.activations.values(), strict=True):
        new = model.blocks[int(name[-1])](h, c)
        torch.testing.assert_close(recorded, (new - h).norm(dim=-1))
        torch.testing.assert_close(kept[0], new - h)
        h = new
    collector.remove()


def test_hooks_removed_on_exit_even_after_an_error():
    model = ToyDiT(depth=2)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCollector(model):
            assert all(len(b._forward_hooks) == 1 for b in model.blocks)
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)


def test_training_only_ignores_eval_and_no_grad(monkeypatch):
    model = ToyDiT(depth=2)
    collector = ActivationCollector(model, training_only=True)
    calls = []
    monkeypatch.setattr(anm.collector, "activation_norms", lambda *a, **k: calls.append(1))
    x, t = make_batch()
    model.eval()
    model(x, t)
    model.train()
    with torch.no_grad():
        model(x, t)
    assert collector.records == [] and calls == []  # and no norm was even computed


def test_collects_in_eval_by_default_for_analysis():
    model = ToyDiT(depth=2).eval()
    with torch.no_grad(), ActivationCollector(model) as collector:
        model(*make_batch())
        assert len(collector.norms()) == 2


class KwBlock(nn.Module):
    """diffusers / HF style: kwargs in, tuple out with the hidden state second."""

    def __init__(self, d=8):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, hidden_states=None, encoder_hidden_states=None):
        return encoder_hidden_states * 2, hidden_states + self.ff(hidden_states)


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(KwBlock() for _ in range(2))

    def forward(self, h, e):
        for block in self.transformer_blocks:
            e, h = block(hidden_states=h, encoder_hidden_states=e)
        return h


def test_kwargs_and_tuple_outputs_pick_the_hidden_state():
    model = KwModel()
    h, e = torch.randn(2, 5, 8), torch.randn(2, 3, 8)  # different token counts: the shape decides
    with ActivationCollector(model) as collector:
        model(h, e)
        first = collector.norms()[0]
    block = model.transformer_blocks[0]
    torch.testing.assert_close(first, block.ff(h).norm(dim=-1))


def test_select_overrides_and_bad_select_is_reported():
    model = KwModel()
    h, e = torch.randn(2, 3, 8), torch.randn(2, 3, 8)  # same shapes: ambiguous, select= decides
    with ActivationCollector(model, site="output", select=lambda out, hin: out[0]) as collector:
        model(h, e)
        torch.testing.assert_close(collector.norms()[0], (2 * e).norm(dim=-1))
    with ActivationCollector(model, select=lambda out, hin: "oops"):
        with pytest.raises(anm.ANMError, match="must return the hidden-state tensor"):
            model(h, e)


def test_update_site_on_shape_changing_layer_names_the_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
    with ActivationCollector(model, layers="0"):
        with pytest.raises(anm.ANMError, match="site='output'"):
            model(torch.randn(2, 4))


def test_invalid_arguments():
    with pytest.raises(anm.ANMError, match="unknown site"):
        ActivationCollector(ToyDiT(), site="input")
    with pytest.raises(anm.ANMError, match="unknown reduce"):
        ActivationCollector(ToyDiT(), reduce="l1")
    with pytest.raises(anm.ANMError, match="keep_activations=True"):
        _ = ActivationCollector(ToyDiT()).activations


def test_hidden_states_carry_gradients_and_share_blocks_with_a_regulariser():
    """keep_activations=True gives each hooked block's output with its graph; such a reader may hook the
    blocks an ANM regulariser already hooks (two regularisers on one block are still refused)."""
    model = ToyDiT(depth=3)
    reg = anm.attach(model, alpha=1.0)
    reader = ActivationCollector(model, layers="blocks.1", site="output", keep_activations=True, training_only=True)
    x, t = make_batch()
    model(x, t)
    (hidden,) = reader.hidden_states()
    h, c = model.embed(x), model.cond(t[:, None])
    torch.testing.assert_close(hidden, model.blocks[1](model.blocks[0](h, c), c))
    hidden.pow(2).sum().backward()
    assert model.blocks[0].mlp[0].weight.grad is not None  # through the hidden state, not a norm
    reader.clear()
    assert reader.hidden_states() == []
    with torch.no_grad():  # training_only: no record without autograd
        model(x, t)
    assert reader.hidden_states() == []
    with pytest.raises(anm.ANMError, match="already carries"):
        anm.attach(model, alpha=1.0)
    with pytest.raises(anm.ANMError, match="keep_activations=True"):
        ActivationCollector(model).hidden_states()
    reader.remove()
    reg.detach()
