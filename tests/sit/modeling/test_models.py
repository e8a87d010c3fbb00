"""Tests for examples/sit/modeling/models.py: configs, layout, init, CFG, checkpoint slicing, checkpointing."""

import pytest
import torch
from modeling.models import SiT, SiT_models, SiTBlock, create_model, get_2d_sincos_pos_embed, load_official_checkpoint
from numerics import assert_same_sums

# Parameter counts with learn_sigma=True (8 output channels), as the reference configs give them.
EXPECTED_PARAMS = {
    "SiT-XL/2": 675_129_632,
    "SiT-XL/4": 675_074_432,
    "SiT-XL/8": 675_683_072,
    "SiT-L/2": 458_102_816,
    "SiT-L/4": 458_053_760,
    "SiT-L/8": 458_594_816,
    "SiT-B/2": 130_512_416,
    "SiT-B/4": 130_475_648,
    "SiT-B/8": 130_881_536,
    "SiT-S/2": 32_963_360,
    "SiT-S/4": 32_945_024,
    "SiT-S/8": 33_148_160,
}
# Rounded figures quoted in the SiT paper / spec.
PAPER_PARAMS_M = {
    "SiT-S/2": 32.96,
    "SiT-B/2": 130.51,
    "SiT-L/2": 458.10,
    "SiT-XL/2": 675.13,
    "SiT-B/4": 130.48,
}


def tiny_sit(**kwargs) -> SiT:
    defaults = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
    )
    defaults.update(kwargs)
    return SiT(**defaults)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replaces every parameter by random values so that zero-initialised layers do not hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def meta_param_count(name: str, **kwargs) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- configs


def test_all_twelve_configs_exist():
    assert set(SiT_models) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_param_count_matches_reference(name):
    assert meta_param_count(name, learn_sigma=True) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_param_count_matches_paper_rounding(name):
    assert round(meta_param_count(name, learn_sigma=True) / 1e6, 2) == PAPER_PARAMS_M[name]


def test_xl2_exact_and_four_channel_head():
    assert meta_param_count("SiT-XL/2", learn_sigma=True) == 675_129_632
    # The 4-channel head drops p*p*4 rows of (hidden + 1) parameters.
    assert meta_param_count("SiT-XL/2", learn_sigma=False) == 675_129_632 - 2 * 2 * 4 * (1152 + 1)


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        create_model("SiT-XXL/2")


def test_state_dict_layout_matches_reference():
    with torch.device("meta"):
        model = create_model("SiT-XL/2", learn_sigma=True)
    sd = model.state_dict()
    d = 1152
    expected = {
        "pos_embed": (1, 256, d),
        "x_embedder.proj.weight": (d, 4, 2, 2),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.linear.weight": (2 * 2 * 8, d),
        "final_layer.linear.bias": (2 * 2 * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(28):
        expected |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
            f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
            f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad


def test_contract_attributes():
    model = tiny_sit()
    assert isinstance(model.blocks, torch.nn.ModuleList) and all(
        isinstance(b, SiTBlock) for b in model.blocks
    )
    assert (model.in_channels, model.out_channels, model.patch_size, model.num_classes) == (4, 4, 2, 10)
    assert model.grad_checkpointing is False
    assert tiny_sit(learn_sigma=True).out_channels == 8


# ----------------------------------------------------------------------------- embeddings


def test_pos_embed_formula():
    d, grid = 16, 4
    emb = get_2d_sincos_pos_embed(d, grid)
    assert emb.shape == (grid * grid, d)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for token in (0, 5, 14):
        row, col = divmod(token, grid)
        want = torch.cat(
            [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
        )
        torch.testing.assert_close(emb[token], want)
    model = tiny_sit(hidden_size=16, input_size=8, patch_size=2)
    torch.testing.assert_close(model.pos_embed[0], emb.float())


def test_timestep_embedding_cos_first_no_rescale():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = tiny_sit().t_embedder.timestep_embedding(t, 256)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[:, :128], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 128:], torch.sin(t[:, None] * freqs))


# ----------------------------------------------------------------------------- init


def test_fresh_model_outputs_zero_and_blocks_are_identity():
    torch.manual_seed(0)
    model = tiny_sit().eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks:
        out = block(h, c)
        assert torch.equal(out - h, torch.zeros_like(h))  # residual update exactly 0
        h = out


def test_init_distributions():
    torch.manual_seed(0)
    model = tiny_sit(hidden_size=64, depth=1)
    assert torch.equal(model.x_embedder.proj.bias, torch.zeros(64))
    assert model.x_embedder.proj.weight.abs().max() > 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.005
    # xavier-uniform bound for the qkv Linear: sqrt(6 / (fan_in + fan_out)).
    bound = (6 / (64 + 192)) ** 0.5
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(192))


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_scalar_t():
    model = randomize_(tiny_sit(learn_sigma=True)).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    out = model(x, torch.full((2,), 0.4), y)
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(model(x, torch.tensor(0.4), y), out)


def test_label_dropout_only_in_training():
    model = randomize_(tiny_sit(class_dropout_prob=0.5)).eval()
    x, t, y = torch.randn(64, 4, 8, 8), torch.rand(64), torch.randint(0, 10, (64,))
    null = torch.full_like(y, 10)
    a, b = model(x, t, y), model(x, t, y)
    assert torch.equal(a, b)  # eval: deterministic, no dropout
    model.train()
    torch.manual_seed(0)
    out = model(x, t, y)
    same_as_null = (out - model.eval()(x, t, null)).flatten(1).abs().amax(1) < 1e-5
    assert 10 < same_as_null.sum() < 54  # about half the labels were dropped


def test_unpatchify_is_inverse_of_patch_layout():
    model = tiny_sit(patch_size=2, in_channels=3)
    img = torch.randn(2, 3, 8, 8)
    # Build tokens with the (p, p, c) per-token layout by hand and check unpatchify reassembles the image.
    tokens = img.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    torch.testing.assert_close(model.unpatchify(tokens), img)


# ----------------------------------------------------------------------------- CFG


def cfg_setup(seed: int = 0):
    model = randomize_(tiny_sit(), seed).eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([1, 4, 7])
    t = torch.tensor([0.1, 0.5, 0.9])
    x2, t2, y2 = torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    # One batched forward, like forward_with_cfg does, so that both see identical numerics.
    cond, uncond = model(x2, t2, y2).chunk(2)
    return model, x2, t2, y2, cond, uncond


def test_cfg_scale_one_is_conditional():
    model, x2, t2, y2, cond, _ = cfg_setup()
    out = model.forward_with_cfg(x2, t2, y2, cfg_scale=1.0, cfg_channels=4)
    torch.testing.assert_close(out[:3], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3:], cond, atol=1e-5, rtol=1e-5)


def test_cfg_reference_guides_three_channels_only():
    model, x2, t2, y2, cond, uncond = cfg_setup()
    out = model.forward_with_cfg(x2, t2, y2, cfg_scale=4.0)  # cfg_channels=3: reference / DiT behaviour
    guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out[:3, :3], guided[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3:, :3], guided[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:3, 3], cond[:, 3], atol=0, rtol=0)  # channel 3 unguided
    torch.testing.assert_close(out[3:, 3], uncond[:, 3], atol=0, rtol=0)
    assert (out[:3, 3] - guided[:, 3]).abs().max() > 1e-3  # ... and guidance would have changed it


def test_cfg_all_channels():
    model, x2, t2, y2, cond, uncond = cfg_setup()
    out = model.forward_with_cfg(x2, t2, y2, cfg_scale=1.5, cfg_channels=4)
    torch.testing.assert_close(out[:3], uncond + 1.5 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_cfg_uses_only_the_first_half_of_x():
    model, x2, t2, y2, _, _ = cfg_setup()
    other = x2.clone()
    other[3:] = torch.randn_like(other[3:])
    torch.testing.assert_close(
        model.forward_with_cfg(other, t2, y2, 2.0), model.forward_with_cfg(x2, t2, y2, 2.0), atol=0, rtol=0
    )


def test_cfg_guidance_interval():
    model, x2, t2, y2, cond, uncond = cfg_setup()  # t = [0.1, 0.5, 0.9]
    out = model.forward_with_cfg(x2, t2, y2, cfg_scale=3.0, cfg_channels=4, guidance_interval=(0.3, 0.7))
    guided = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(out[1], guided[1], atol=1e-5, rtol=1e-5)  # inside: guided
    for i in (0, 2):  # outside: plain conditional output
        torch.testing.assert_close(out[i], cond[i], atol=0, rtol=0)
        assert (out[i] - guided[i]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- checkpoints


def test_load_official_checkpoint_slices_learn_sigma_head():
    big = randomize_(tiny_sit(learn_sigma=True, patch_size=2), seed=1).eval()
    small = tiny_sit(learn_sigma=False, patch_size=2).eval()
    assert load_official_checkpoint(small, big.state_dict()) is small
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])
    torch.testing.assert_close(small(x, t, y), big(x, t, y), atol=0, rtol=0)
    # The sliced output really is the first 4 of the 8 channels of the full head (not just "some" 4).
    big.learn_sigma = False  # forward() then returns all 8 channels of the head
    full = big(x, t, y)
    assert full.shape == (2, 8, 8, 8)
    torch.testing.assert_close(small(x, t, y), full[:, :4], atol=0, rtol=0)
    assert (full[:, 4:] - full[:, :4]).abs().max() > 1e-3


def test_naive_row_slicing_would_be_wrong():
    # Guards the test above: taking the first half of the head's rows mixes patch positions and channels.
    big = randomize_(tiny_sit(learn_sigma=True), seed=2).eval()
    sd = big.state_dict()
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:16]
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"][:16]
    small = tiny_sit().eval()
    small.load_state_dict(sd)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])
    assert (small(x, t, y) - big(x, t, y)).abs().max() > 1e-3


def test_load_official_checkpoint_wrappers_and_file(tmp_path):
    src = randomize_(tiny_sit(), seed=3)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "ema": sd, "args": __import__("argparse").Namespace(lr=1e-4)}, path)
    dst = load_official_checkpoint(tiny_sit(), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    with pytest.raises(ValueError, match="learn_sigma"):
        load_official_checkpoint(tiny_sit(patch_size=4), src.state_dict())


# ----------------------------------------------------------------------------- grad checkpointing


@pytest.mark.orders
def test_grad_checkpointing_same_gradients():
    model = randomize_(tiny_sit(class_dropout_prob=0.0), seed=4).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])

    def grads(flag: bool) -> dict[str, torch.Tensor]:
        model.grad_checkpointing = flag
        model.zero_grad(set_to_none=True)
        model(x, t, y).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert_same_sums(ckpt[name], plain[name], msg=name)  # recomputed blocks may sum in another order
    assert any(g.abs().max() > 0 for g in plain.values())


def test_grad_checkpointing_goes_through_checkpoint(monkeypatch):
    from modeling import models

    calls = []
    real = models.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(models, "checkpoint", spy)
    model = tiny_sit(depth=3).train()
    model.grad_checkpointing = True
    model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    assert calls == [False, False, False]
    calls.clear()
    model.eval()(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    assert calls == []  # no recomputation at inference


def test_residual_stream_is_token_major_contiguous():
    from modeling.models import SiT

    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    seen = []
    model.blocks[1].register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    block_in, block_out = seen[0]
    assert block_in.is_contiguous() and block_out.is_contiguous()


def test_compiled_anm_with_grad_checkpointing_is_one_graph_with_eager_gradients():
    # --compile --grad-checkpointing --anm: with the block call checkpointed, ANM's hook ran inside the
    # checkpointed region, where Dynamo refuses its side effect; SiT.forward then ran eagerly, every block.
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    import anm

    torch._dynamo.reset()
    counters.clear()
    base = randomize_(tiny_sit(depth=3, class_dropout_prob=0.0), seed=5).train()
    plain = randomize_(tiny_sit(depth=3, class_dropout_prob=0.0), seed=5).train()
    base.grad_checkpointing = True
    wrapped, reference = anm.ANM(base, alpha=5.0, warmup=0), anm.ANM(plain, alpha=5.0, warmup=0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(wrapped, backend=counter)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    for _ in range(2):
        base.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        loss = compiled(x, t, y).square().mean() + wrapped.loss()
        loss.backward()
        expected = reference(x, t, y).square().mean() + reference.loss()
        expected.backward()
        torch.testing.assert_close(loss, expected)
    assert counter.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    for (name, p), q in zip(base.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()
