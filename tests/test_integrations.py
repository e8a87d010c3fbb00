"""ANM wraps popular model families built from configs (random weights, nothing downloaded)."""

import sys
from pathlib import Path

import pytest
import torch

import anm
from anm import ANM


def check_wrap(model, call, expected_layers, min_records=None):
    """Output unchanged, every block recorded once per call, the loss has gradients for every block."""
    model.train()
    torch.manual_seed(0)
    reference = call(model)
    wrapped = ANM(model, alpha=1e4, warmup=0)  # alpha far above every norm: the hinge is active everywhere
    assert wrapped.collector.names == expected_layers
    torch.manual_seed(0)
    out = call(wrapped)
    ref_t = reference if torch.is_tensor(reference) else reference[0]
    out_t = out if torch.is_tensor(out) else out[0]
    torch.testing.assert_close(out_t, ref_t, rtol=0, atol=0)
    assert len(wrapped.collector.records) == (min_records or len(expected_layers))
    loss = wrapped.loss()
    assert 0 < loss.item() <= 10
    loss.backward()
    for name in expected_layers:
        block = dict(model.named_modules())[name]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()), name
    wrapped.unwrap()


def test_hf_gpt2_from_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (2, 8))
    check_wrap(model, lambda m: m(input_ids=ids).logits, [f"transformer.h.{i}" for i in range(3)])


def test_hf_llama_from_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 50, (2, 8))
    check_wrap(model, lambda m: m(input_ids=ids).logits, ["model.layers.0", "model.layers.1"])


def test_diffusers_dit_transformer_from_config():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    check_wrap(model, lambda m: m(x, timestep=t, class_labels=y).sample,
               ["transformer_blocks.0", "transformer_blocks.1"])


def test_diffusers_flux_double_and_single_stacks():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    b, n_img, n_txt = 2, 6, 3
    kwargs = dict(
        hidden_states=torch.randn(b, n_img, 4), encoder_hidden_states=torch.randn(b, n_txt, 16),
        pooled_projections=torch.randn(b, 16), timestep=torch.tensor([0.5, 0.7]),
        img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), guidance=None,
    )
    check_wrap(model, lambda m: m(**kwargs).sample,
               ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                "single_transformer_blocks.1"])


def lumina2(num_layers: int, num_refiner_layers: int):
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "Lumina2Transformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no Lumina2Transformer2DModel")
    torch.manual_seed(0)
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=num_layers,
        num_refiner_layers=num_refiner_layers, num_attention_heads=2, num_kv_heads=2, multiple_of=8,
        ffn_dim_multiplier=None, axes_dim_rope=(4, 6, 6), axes_lens=(64, 16, 16), cap_feat_dim=16,
    )


@pytest.mark.parametrize("num_refiner_layers", [2, 4])  # refiners as deep as the main list, and deeper
def test_diffusers_lumina2_hooks_the_image_stream_not_the_caption_refiner(num_refiner_layers):
    model = lumina2(num_layers=2, num_refiner_layers=num_refiner_layers)
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([0.3, 0.8]),
        encoder_hidden_states=torch.randn(2, 5, 16), encoder_attention_mask=torch.ones(2, 5, dtype=torch.bool),
    )
    expected = [f"noise_refiner.{i}" for i in range(num_refiner_layers)] + ["layers.0", "layers.1"]
    check_wrap(model, lambda m: m(**kwargs).sample, expected)


def test_diffusers_z_image_leaves_out_the_caption_refiner():
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "ZImageTransformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no ZImageTransformer2DModel")
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=2,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    )
    expected = ["noise_refiner.0", "noise_refiner.1", "layers.0", "layers.1"]
    assert [name for name, _ in anm.find_blocks(model)] == expected


@pytest.mark.parametrize("depth", [1, 2])
def test_diffusers_hunyuan_video_leaves_out_the_token_refiner(depth):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=depth,
        num_single_layers=depth, num_refiner_layers=2, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )
    expected = [f"{stack}.{i}" for stack in ("transformer_blocks", "single_transformer_blocks") for i in range(depth)]
    assert [name for name, _ in anm.find_blocks(model)] == expected


def test_timm_vit():
    # timm is in no extra: it needs torchvision, which does not load beside the CPU torch build CI installs.
    # Run it where both are installed, e.g. torch 2.14.1 + torchvision 0.29.1 + timm.
    timm = pytest.importorskip("timm", reason="timm (and the torchvision it needs) not installed")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    check_wrap(model, lambda m: m(x), ["blocks.0", "blocks.1"])


def test_sit_example_model():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
    models = pytest.importorskip("modeling.models")
    model = models.SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                       num_classes=10)
    for block in model.blocks:  # leave adaLN-Zero's identity start so the updates are non-zero
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    check_wrap(model, lambda m: m(x, t, y), [f"blocks.{i}" for i in range(3)])
    wrapped = ANM(model, warmup=0)
    model.eval()
    with torch.no_grad():
        wrapped.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.tensor([1, 2, 10, 10]), 4.0)
    assert wrapped.collector.records == []  # sampling: eval + no_grad records nothing


def test_hierarchical_models_get_the_blocks_inside_each_stage():
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                          num_heads=[2, 2], window_size=4))
    assert [name for name, _ in anm.find_blocks(swin)] == [
        f"encoder.layers.{stage}.blocks.{block}" for stage in range(2) for block in range(2)]
    swin.train()
    reg = anm.attach(swin, reduce="rms", alpha=1.0, warmup=0)
    swin(pixel_values=torch.randn(2, 3, 32, 32))
    assert [tuple(n.shape) for n in reg.collector.norms()] == [(2, 64), (2, 64), (2, 16), (2, 16)]
    reg.detach()

    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 2],
                                                                      num_stages=2)).train()
    reg = anm.attach(convnext, reduce="rms", alpha=1.0)
    with pytest.raises(anm.ANMError, match="feature_dim=1"):  # channel-first stages: the fix is named
        convnext(pixel_values=torch.randn(2, 3, 32, 32))
    reg.detach()
    reg = anm.attach(convnext, feature_dim=1, reduce="rms", alpha=1.0, warmup=0)
    convnext(pixel_values=torch.randn(2, 3, 32, 32))
    assert [tuple(n.shape) for n in reg.collector.norms()] == [(2, 8, 8), (2, 8, 8), (2, 4, 4), (2, 4, 4)]


def test_moe_layers_stay_the_blocks():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                        num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config)
    assert [name for name, _ in anm.find_blocks(model)] == ["model.layers.0", "model.layers.1"]
