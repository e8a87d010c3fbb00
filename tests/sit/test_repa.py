"""REPA's pieces against independent computations, with a small randomly initialised DINOv2 saved to tmp (no
download): the loss, the encoder's input, the token grid, the one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dinov2s import save_tiny_dinov2
from regularizers import repa
from runtime.cli import UsageError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dinov2")
    save_tiny_dinov2(path, hidden_size=16, intermediate_size=32, image_size=28, patch_size=14)
    return path


def test_the_loss_is_the_mean_negative_cosine_of_the_projected_tokens() -> None:
    torch.manual_seed(0)
    hidden, target = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    projector = repa.Projector(8, 5, hidden=16)
    want = 0.0
    with torch.no_grad():
        for n in range(2):
            for t in range(3):
                z = projector(hidden[n, t]).double()
                y = target[n, t].double()
                want -= float(z @ y / (z.norm() * y.norm())) / 6
    assert repa.repa_loss(hidden, target, projector).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        repa.repa_loss(hidden, target[:, :2], projector)


def test_the_encoder_sees_the_batch_images_preprocessed_and_matches_the_grid(encoder_dir: Path) -> None:
    encoder = repa.load_encoder(str(encoder_dir))
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    images = torch.rand(3, 1, 8, 8) * 2 - 1  # grey images in [-1, 1], like Fashion-MNIST
    seen = []
    encoder.embeddings.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    tokens = repa.encoder_tokens(encoder, images, grid=4)
    # REPA's order: to [0, 1], ImageNet normalisation, then bicubic without antialiasing to the encoder's input
    # (8 pixels: 7 by REPA's 224-per-256 rule, raised to one whole 14-pixel patch).
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (((images + 1) / 2).repeat(1, 3, 1, 1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = F.interpolate(x, size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(seen[0], x)
    assert tokens.shape == (3, 16, 16)  # the encoder's 1x1 patch grid, resampled to the model's 4x4
    same_grid = repa.encoder_tokens(encoder, images, grid=2, size=28)
    torch.testing.assert_close(same_grid, encoder(pixel_values=seen[-1]).last_hidden_state[:, 1:])


def test_the_encoder_input_follows_repa_224_per_256_pixels() -> None:
    assert [repa.encoder_resolution(p, 14) for p in (256, 512, 128, 32, 8)] == [224, 448, 112, 28, 14]
    assert repa.encoder_resolution(64, 16) == 48  # 56 rounded down to whole 16-pixel patches


def test_tokens_are_area_averaged_to_a_coarser_grid_and_interpolated_to_a_finer_one() -> None:
    tokens = torch.randn(2, 16, 3)  # a 4x4 grid of 3-wide tokens
    grid = tokens.view(2, 4, 4, 3)
    want = torch.stack([grid[:, i:i + 2, j:j + 2].mean((1, 2)) for i in (0, 2) for j in (0, 2)], 1)
    torch.testing.assert_close(repa.resample_tokens(tokens, 2), want)
    assert repa.resample_tokens(tokens, 4) is tokens
    finer = repa.resample_tokens(torch.ones(1, 4, 2), 3)
    torch.testing.assert_close(finer, torch.ones(1, 9, 2))  # bilinear keeps a constant field
    with pytest.raises(ValueError, match="no square grid"):
        repa.resample_tokens(torch.randn(1, 5, 2), 2)


def test_the_projector_is_initialised_as_repa_does() -> None:
    projector = repa.Projector(8, 5, hidden=16)
    linears = [layer for layer in projector if isinstance(layer, torch.nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in linears] == [(16, 8), (16, 16), (5, 16)]
    assert [type(layer).__name__ for layer in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    for layer in linears:
        bound = (6 / sum(layer.weight.shape)) ** 0.5  # Xavier-uniform
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > bound / 2
        assert not layer.bias.any()


def test_a_missing_or_wrong_encoder_is_one_line(tmp_path: Path, encoder_dir: Path) -> None:
    with pytest.raises(UsageError, match="config.json missing") as error:
        repa.load_encoder(str(tmp_path / "nowhere"))
    assert "\n" not in str(error.value)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="not DINOv2"):
        repa.load_encoder(str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((encoder_dir / "config.json").read_text())
    with pytest.raises(UsageError, match="do not load"):
        repa.load_encoder(str(broken))
