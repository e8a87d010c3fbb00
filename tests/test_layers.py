import pytest
import torch
from torch import nn
from toy_models import ToyBlock, ToyDiT

import anm
from anm import find_blocks, select_layers


class MLP(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)


class MoEBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.experts = nn.ModuleList(MLP(d) for _ in range(4))


def names(pairs):
    return [name for name, _ in pairs]


def test_auto_finds_sit_style_blocks():
    assert names(find_blocks(ToyDiT(depth=3))) == ["blocks.0", "blocks.1", "blocks.2"]


def test_auto_skips_experts_inside_blocks_and_lists_of_bare_layers():
    model = nn.Module()
    model.layers = nn.ModuleList(MoEBlock() for _ in range(3))
    model.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(50))
    assert names(find_blocks(model)) == ["layers.0", "layers.1", "layers.2"]


def test_auto_takes_two_stacks_like_flux_but_not_a_tiny_one():
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList(ToyBlock(16) for _ in range(2))
    model.single_transformer_blocks = nn.ModuleList(MLP(16) for _ in range(4))
    model.refiner = nn.ModuleList(MLP(2) for _ in range(2))  # far smaller: not a block stack
    found = names(find_blocks(model))
    singles = [f"single_transformer_blocks.{i}" for i in range(4)]
    assert found == ["transformer_blocks.0", "transformer_blocks.1", *singles]


def test_auto_error_lists_what_it_saw():
    with pytest.raises(anm.ANMError, match=r"layers='auto' found no.*Top-level modules seen: 0 \(Linear\)"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_wrapper_prefixes_are_ignored():
    class Wrapper(nn.Module):  # what DDP / torch.compile do to names
        def __init__(self, inner):
            super().__init__()
            self.module = nn.Module()
            self.module._orig_mod = inner

    wrapped = Wrapper(ToyDiT(depth=2))
    assert names(find_blocks(wrapped)) == ["blocks.0", "blocks.1"]
    assert names(select_layers(wrapped, "blocks.*")) == ["blocks.0", "blocks.1"]
    assert names(select_layers(wrapped, "module._orig_mod.blocks.1")) == ["blocks.1"]


def test_glob_star_stays_within_one_component():
    model = ToyDiT(depth=2)
    assert names(select_layers(model, "blocks.*")) == ["blocks.0", "blocks.1"]
    assert "blocks.0.mlp.0" in names(select_layers(model, "blocks.**"))
    assert names(select_layers(model, "blocks.[1].mlp")) == ["blocks.1.mlp"]


def test_class_module_predicate_and_mixed_lists():
    model = ToyDiT(depth=3)
    assert names(select_layers(model, ToyBlock)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert names(select_layers(model, [model.blocks[2], model.blocks[0]])) == ["blocks.0", "blocks.2"]
    assert names(select_layers(model, lambda n, m: n.endswith(".proj"))) == [f"blocks.{i}.proj" for i in range(3)]
    assert names(select_layers(model, ["embed", ToyBlock])) == ["embed", "blocks.0", "blocks.1", "blocks.2"]


def test_no_match_error_lists_candidates():
    with pytest.raises(anm.ANMError, match=r"matched no module.*blocks.0"):
        select_layers(ToyDiT(), "layers.*")
    with pytest.raises(anm.ANMError, match="not an nn.Module"):
        select_layers(ToyDiT(), int)
    with pytest.raises(anm.ANMError, match="empty list"):
        select_layers(ToyDiT(), [])
    with pytest.raises(anm.ANMError, match="use 'auto'"):
        select_layers(ToyDiT(), 3)


def test_meta_device_models_are_fine():
    with torch.device("meta"):
        model = ToyDiT(dim=1024, depth=4)
    assert len(find_blocks(model)) == 4


def test_auto_descends_into_stages_of_a_hierarchical_model():
    class Stage(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.downsample = nn.Linear(d, d)
            self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(2))

    model = nn.Module()
    model.stages = nn.ModuleList(Stage(8) for _ in range(3))
    assert names(find_blocks(model)) == [f"stages.{s}.blocks.{b}" for s in range(3) for b in range(2)]


def test_lists_of_lists_given_as_layers_mean_the_blocks_inside():
    model = nn.Module()
    model.stages = nn.ModuleList(nn.ModuleList(ToyBlock(8) for _ in range(2)) for _ in range(2))
    assert names(select_layers(model, model.stages)) == ["stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1"]


def lumina_like(refiner_depth: int, main_depth: int, refiner_width: int = 16) -> nn.Module:
    """Lumina2 / Z-Image layout: image and caption refiners of the main block class, then the main list."""
    model = nn.Module()
    model.noise_refiner = nn.ModuleList(ToyBlock(16) for _ in range(refiner_depth))
    model.context_refiner = nn.ModuleList(ToyBlock(refiner_width) for _ in range(refiner_depth))
    model.layers = nn.ModuleList(ToyBlock(16) for _ in range(main_depth))
    return model


@pytest.mark.parametrize("refiner_depth, main_depth", [(2, 24), (2, 2), (6, 2)])
def test_auto_leaves_out_caption_refiners_whatever_the_depths(refiner_depth, main_depth):
    found = names(find_blocks(lumina_like(refiner_depth, main_depth, refiner_width=32)))
    assert not any(name.startswith("context_refiner") for name in found)
    assert [name for name in found if name.startswith("layers.")] == [f"layers.{i}" for i in range(main_depth)]


def test_auto_leaves_out_a_token_refiner_inside_the_text_embedder():
    # HunyuanVideo: context_embedder.token_refiner.refiner_blocks, deeper than a small config's main lists.
    model = nn.Module()
    model.context_embedder = nn.Module()
    model.context_embedder.token_refiner = nn.Module()
    model.context_embedder.token_refiner.refiner_blocks = nn.ModuleList(ToyBlock(32) for _ in range(4))
    model.transformer_blocks = nn.ModuleList(ToyBlock(16) for _ in range(2))
    model.single_transformer_blocks = nn.ModuleList(ToyBlock(16) for _ in range(2))
    expected = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                "single_transformer_blocks.1"]
    assert names(find_blocks(model)) == expected


def test_a_text_model_keeps_its_own_layers():
    model = nn.Module()
    model.text_model = nn.Module()
    model.text_model.encoder = nn.Module()
    model.text_model.encoder.layers = nn.ModuleList(ToyBlock(16) for _ in range(3))
    assert names(find_blocks(model)) == [f"text_model.encoder.layers.{i}" for i in range(3)]


def test_depth_one_configs_have_their_one_block_lists_found():
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([ToyBlock(16)])
    model.single_transformer_blocks = nn.ModuleList([ToyBlock(16)])
    model.context_refiner = nn.ModuleList([ToyBlock(16)])
    assert names(find_blocks(model)) == ["transformer_blocks.0", "single_transformer_blocks.0"]
