"""hidden_state_norms: ANM's norms from hidden states a model returns, equal to what the hooks record."""

import pytest
import torch
from toy_models import ToyDiT, make_batch

import anm


@pytest.mark.parametrize("site", ["update", "output"])
def test_agrees_with_the_hooks_on_a_toy_transformer(site):
    model = ToyDiT(depth=3)
    x, t = make_batch()
    h, c = model.embed(x), model.cond(t[:, None])
    states = [h]
    for block in model.blocks:
        states.append(block(states[-1], c))
    from_states = anm.hidden_state_norms(states, site=site, reduce="rms")
    with anm.ActivationCollector(model, site=site, reduce="rms") as hooks:
        model(x, t)
        for a, b in zip(from_states, hooks.norms(), strict=True):
            torch.testing.assert_close(a, b)


def test_agrees_with_the_hooks_on_hf_gpt2_hidden_states():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 50, (2, 8))
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=0)
    torch.manual_seed(0)
    out = model(input_ids=ids, output_hidden_states=True)
    hooked = [n.detach() for n in reg.collector.norms()]
    # GPT-2's last hidden state has ln_f applied: the function covers blocks 1 … L-1 from it exactly.
    from_states = anm.hidden_state_norms(out.hidden_states[:-1], reduce="rms")
    assert len(from_states) == 2
    for a, b in zip(from_states, hooked[:2], strict=True):
        torch.testing.assert_close(a.detach(), b)
    loss = anm.anm_loss(from_states, alpha=2.0)
    loss.backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


def test_timm_forward_intermediates():
    timm = pytest.importorskip("timm", reason="timm (and the torchvision it needs) not installed")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    x = torch.randn(2, 3, 32, 32)
    reg = anm.attach(model, site="output", reduce="rms", alpha=2.0)
    _, intermediates = model.forward_intermediates(x, norm=False, output_fmt="NLC")
    hooked = reg.collector.norms()
    tokens = intermediates[0].shape[1]
    from_states = anm.hidden_state_norms([intermediates[0]] + list(intermediates), site="output", reduce="rms")
    for a, b in zip(from_states, hooked, strict=True):
        torch.testing.assert_close(a, b[:, -tokens:] if b.shape[1] != tokens else b)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 4), "sequence"), ([torch.zeros(2, 3, 4)], "at least one block"),
    ([torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)], "same residual stream"),
    ([torch.zeros(2, 3, 4), "x"], "floating-point"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)], "floating"),
])
def test_bad_input_names_the_fix(bad, match):
    with pytest.raises(anm.ANMError, match=match):
        anm.hidden_state_norms(bad)
    with pytest.raises(anm.ANMError, match="site"):
        anm.hidden_state_norms([torch.zeros(1, 2)] * 2, site="middle")
