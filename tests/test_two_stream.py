"""Two-stream blocks (text + image) get the image stream, never a silent mix of the two."""

import pytest
import torch
from torch import nn

import anm


def update_norms_by_direct_call(block, call_kwargs, image_index):
    """‖image output − image input‖ per token, computed by calling the block itself."""
    out = block(**call_kwargs)
    image_out = out[image_index] if isinstance(out, tuple) else out
    return torch.linalg.vector_norm(image_out - call_kwargs["hidden_states"], dim=-1).detach()


def record_block_inputs(model, run):
    calls = []
    handles = [block.register_forward_pre_hook(lambda m, a, k: calls.append((m, dict(k))), with_kwargs=True)
               for block in model.transformer_blocks]
    run()
    for h in handles:
        h.remove()
    return calls


def check_image_stream(model, run, image_index):
    model.train()
    calls = record_block_inputs(model, run)
    reg = anm.attach(model, layers="transformer_blocks.*", reduce="l2", alpha=1e6, warmup=0)
    run()
    recorded = [n.detach() for n in reg.collector.norms()]
    assert len(recorded) == len(calls)
    for (block, kwargs), norms in zip(calls, recorded, strict=True):
        text_len = kwargs["encoder_hidden_states"].shape[1]
        assert kwargs["hidden_states"].shape == kwargs["encoder_hidden_states"].shape[:1] + (text_len,) + \
            kwargs["hidden_states"].shape[2:]  # equal-length streams: shapes alone cannot tell them apart
        expected = update_norms_by_direct_call(block, kwargs, image_index)
        torch.testing.assert_close(norms, expected)
    reg.detach()


def test_sd3_joint_blocks_with_equal_length_streams():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8,
    )
    for block in model.transformer_blocks:  # leave adaLN-Zero's identity start
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.2)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)  # 16 image tokens (4x4 patches), 16 text tokens
    pooled = torch.randn(2, 16)

    def run():
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.tensor([1, 2])).sample
    check_image_stream(model, run, image_index=1)


def test_flux_double_blocks_with_equal_length_streams():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    n = 6
    kwargs = dict(hidden_states=torch.randn(2, n, 4), encoder_hidden_states=torch.randn(2, n, 16),
                  pooled_projections=torch.randn(2, 16), timestep=torch.tensor([0.5, 0.7]),
                  img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(n, 3), guidance=None)
    check_image_stream(model, lambda: model(**kwargs).sample, image_index=1)


def test_flux_auto_layers_hook_both_stacks_and_record_image_tokens():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    n_img, n_txt = 6, 6
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=0)
    model(hidden_states=torch.randn(2, n_img, 4), encoder_hidden_states=torch.randn(2, n_txt, 16),
          pooled_projections=torch.randn(2, 16), timestep=torch.tensor([0.5, 0.7]),
          img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), guidance=None)
    assert reg.names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                         "single_transformer_blocks.1"]
    assert [tuple(n.shape) for n in reg.collector.norms()] == [(2, n_img)] * 4


class UnknownTwoStream(nn.Module):
    """A two-stream block whose forward does not name what it returns."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, hidden_states, context):
        return tuple(t + layer(t) for t, layer in ((context, self.a), (hidden_states, self.b)))


def test_ambiguous_tuple_output_raises_naming_select():
    blocks = nn.ModuleList([UnknownTwoStream(), UnknownTwoStream()])

    def run(module):
        h, c = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
        for block in module:
            c, h = block(h, c)
    reg = anm.attach(blocks, layers="*", reduce="rms", alpha=2.0)
    with pytest.raises(anm.ANMError, match="select="):
        run(blocks)
    reg.detach()
    reg = anm.attach(blocks, layers="*", reduce="rms", alpha=2.0, select=lambda out, h_in: out[1])
    run(blocks)
    assert len(reg.collector.norms()) == 2


def test_return_positions_read_from_the_source():
    from anm.outputs import return_positions

    class Joint(nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, temb=None):
            if temb is None:
                return encoder_hidden_states, hidden_states
            return encoder_hidden_states, hidden_states + temb

    class Disagrees(nn.Module):
        def forward(self, hidden_states, encoder_hidden_states):
            if hidden_states.sum() > 0:
                return hidden_states, encoder_hidden_states
            return encoder_hidden_states, hidden_states

    assert return_positions(Joint) == {"encoder_hidden_states": 0}  # the second return computes a new value
    assert return_positions(Disagrees) == {}
