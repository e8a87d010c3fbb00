"""Channel-first activations: norms over the channel axis when asked, an error naming the fix otherwise."""

import pytest
import torch
from torch import nn

import anm


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-style block on channel-first maps (N, C, H, W): depthwise conv, LayerNorm over C, MLP."""

    def __init__(self, channels: int = 12):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(y)).permute(0, 3, 1, 2)


class SwinLikeBlock(nn.Module):
    """Channels-last maps (N, H, W, C), as timm's Swin: the last axis is the feature axis."""

    def __init__(self, channels: int = 12):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def stages(block_class):
    return nn.Sequential(*[block_class() for _ in range(3)])


@pytest.mark.parametrize("site", ["update", "output"])
def test_channel_first_without_feature_dim_raises_naming_it(site):
    net = stages(ConvNeXtBlock)
    reg = anm.attach(net, layers="*", site=site, reduce="rms", alpha=1.0)
    with pytest.raises(anm.ANMError, match="feature_dim=1"):
        net(torch.randn(2, 12, 5, 7))
    reg.detach()


def test_channel_first_with_feature_dim_1_takes_norms_over_channels():
    net = stages(ConvNeXtBlock)
    x = torch.randn(2, 12, 5, 7)
    expected, h = [], x
    for block in net:
        new = block(h)
        expected.append(torch.linalg.vector_norm(new - h, dim=1).detach())
        h = new
    reg = anm.attach(net, feature_dim=1, reduce="l2", alpha=100.0, warmup=0)  # "auto" finds the 3 blocks
    net(x)
    norms = [n.detach() for n in reg.collector.norms()]
    assert [tuple(n.shape) for n in norms] == [(2, 5, 7)] * 3
    for got, want in zip(norms, expected, strict=True):
        torch.testing.assert_close(got, want)
    loss = reg.loss()
    loss.backward()
    assert loss.item() > 0 and net[0].dwconv.weight.grad is not None


def test_channel_first_norms_for_rms_and_the_function_form():
    x, minus = torch.randn(2, 12, 5, 7), torch.randn(2, 12, 5, 7)
    got = anm.activation_norms(x, "rms", minus=minus, feature_dim=1)
    torch.testing.assert_close(got, torch.linalg.vector_norm(x - minus, dim=1) / 12 ** 0.5)
    with pytest.raises(anm.ANMError, match="out of range"):
        anm.activation_norms(torch.randn(2, 3), feature_dim=4)


def test_channels_last_maps_are_not_flagged():
    net = stages(SwinLikeBlock)
    reg = anm.attach(net, layers="*", reduce="rms", alpha=1.0, warmup=0)
    net(torch.randn(2, 5, 7, 12))
    assert [tuple(n.shape) for n in reg.collector.norms()] == [(2, 5, 7)] * 3


def test_feature_dim_1_on_channels_last_maps_raises_naming_minus_1():
    net = stages(SwinLikeBlock)
    reg = anm.attach(net, layers="*", feature_dim=1, reduce="rms", alpha=1.0)
    with pytest.raises(anm.ANMError, match="feature_dim=-1"):
        net(torch.randn(2, 5, 7, 12))
    reg.detach()


def test_timm_convnext_blocks_by_glob():
    timm = pytest.importorskip("timm", reason="timm (and the torchvision it needs) not installed")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    reg = anm.attach(model, layers="stages.*.blocks.*", site="output", reduce="rms", alpha=1.0)
    with pytest.raises(anm.ANMError, match="feature_dim=1"):
        model(x)
    reg.detach()
    reg = anm.attach(model, layers="stages.*.blocks.*", site="output", feature_dim=1, reduce="rms", alpha=1.0)
    model(x)
    assert all(n.dim() == 3 for n in reg.collector.norms())


def test_the_guard_also_holds_under_torch_compile():
    net = stages(ConvNeXtBlock)
    reg = anm.attach(net, layers="*", reduce="rms", alpha=1.0)
    with pytest.raises(anm.ANMError, match="feature_dim=1"):
        torch.compile(net, backend="aot_eager")(torch.randn(2, 12, 5, 7))
    reg.detach()
    torch.compiler.reset()


def test_sequence_first_torch_layers_give_batch_first_norms():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)  # torch's default: (tokens, batch, D)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    reg = anm.attach(net, reduce="rms", alpha=1.0, warmup=0)
    x = torch.randn(7, 3, 16)
    net(x)
    assert [tuple(n.shape) for n in reg.collector.norms()] == [(3, 7), (3, 7)]
    first = net.layers[0](x)
    expected = (torch.linalg.vector_norm(first - x, dim=-1) / 4).t()
    torch.testing.assert_close(reg.collector.norms()[0], expected)
