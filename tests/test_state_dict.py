"""Weights load into the wrapper exactly, whatever the wrapped model's key layout."""

import pytest
import torch
from torch import nn
from toy_models import ToyDiT

import anm


class HasModelChild(nn.Module):
    """A plain module whose top-level child is called ``model``, like every HF *ForCausalLM."""

    def __init__(self):
        super().__init__()
        self.model = ToyDiT(depth=2)
        self.lm_head = nn.Linear(6, 3)

    def forward(self, x, t):
        return self.lm_head(self.model(x, t))


def randomised(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_child_named_model_loads_exactly_strict():
    wrapped = anm.ANM(HasModelChild(), reduce="rms", alpha=2.0)
    source = randomised(HasModelChild())
    assert list(wrapped.state_dict()) == list(source.state_dict())
    assert wrapped.load_state_dict(source.state_dict()) is not None
    assert_same_weights(wrapped.model, source)


def test_non_strict_reports_the_true_missing_and_unexpected_keys():
    wrapped = anm.ANM(HasModelChild(), reduce="rms", alpha=2.0)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    source = randomised(HasModelChild())
    state = dict(source.state_dict())
    state.pop("model.embed.weight")
    state["model.not_a_weight"] = torch.zeros(1)
    result = wrapped.load_state_dict(state, strict=False)
    assert result.missing_keys == ["model.embed.weight"]
    assert result.unexpected_keys == ["model.not_a_weight"]
    after = wrapped.state_dict()
    torch.testing.assert_close(after["model.embed.weight"], before["model.embed.weight"])  # kept
    for key in state:  # every other tensor took the new value
        if key in after:
            torch.testing.assert_close(after[key], state[key], rtol=0, atol=0, msg=key)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"model\.embed\.weight\""):
        wrapped.load_state_dict(state)


def test_wrapper_nested_in_another_module_saves_and_loads_exactly():
    outer = nn.Module()
    outer.net = anm.ANM(HasModelChild(), reduce="rms", alpha=2.0)
    source = randomised(HasModelChild())
    assert list(outer.state_dict()) == ["net." + k for k in source.state_dict()]
    state = {"net." + k: v for k, v in source.state_dict().items()}
    state.pop("net.lm_head.bias")
    result = outer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["net.lm_head.bias"] and result.unexpected_keys == []
    torch.testing.assert_close(outer.net.model.model.embed.weight, source.model.embed.weight, rtol=0, atol=0)


def test_wrapper_state_round_trips_through_torch_save(tmp_path):
    wrapped = anm.ANM(randomised(HasModelChild()), reduce="rms", alpha=2.0)
    torch.save(wrapped.state_dict(), tmp_path / "w.pt")
    plain = HasModelChild()
    plain.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))  # a bare model reads it
    assert_same_weights(plain, wrapped.model)


LLAMA_LIKE = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"]


def tiny_config(transformers, name):
    config_class = getattr(transformers, name.replace("ForCausalLM", "Config"))
    return config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=50, max_position_embeddings=64)


@pytest.mark.parametrize("name", LLAMA_LIKE)
def test_hf_causal_lm_loads_into_the_wrapper(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, name):
        pytest.skip(f"transformers has no {name}")
    config = tiny_config(transformers, name)
    model_class = getattr(transformers, name)
    torch.manual_seed(0)
    source = model_class(config)
    source.save_pretrained(tmp_path / "pretrained")
    reloaded = model_class.from_pretrained(tmp_path / "pretrained")
    torch.manual_seed(1)
    wrapped = anm.ANM(model_class(config), reduce="rms", alpha=2.0, warmup=0)
    wrapped.load_state_dict(reloaded.state_dict())  # strict
    assert_same_weights(wrapped.model, source)
    ids = torch.randint(0, 50, (2, 8))
    wrapped.train()
    torch.testing.assert_close(wrapped(input_ids=ids).logits, source.train()(input_ids=ids).logits)
    assert wrapped.loss().item() > 0  # and ANM still records

    fresh = anm.ANM(model_class(config), reduce="rms", alpha=2.0)
    state = dict(reloaded.state_dict())
    dropped = "model.norm.weight"
    state.pop(dropped)
    result = fresh.load_state_dict(state, strict=False)
    assert dropped in result.missing_keys and result.unexpected_keys == []
    assert all(not key.startswith("model.model.") for key in result.missing_keys)
    for key, value in state.items():
        if key in fresh.state_dict():
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
