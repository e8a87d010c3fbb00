"""REPA's pieces (Yu et al. 2024, "Representation Alignment for Generation", arXiv 2410.06940): a frozen
DINOv2 encoder loaded from a local folder, its preprocessing, the MLP projector, and the alignment loss.
regularizers/repa_term.py puts them into train.py's loop.

The loss aligns the hidden state after block k (REPA: k = 8 of SiT-XL/2's 28) to the encoder's patch tokens:
the mean over tokens and batch of −cos(projector(h_n), y_n), with y the encoder's tokens of the *same* images
(in [0, 1], ImageNet normalisation, then a bicubic resize to the encoder's input: 224 for 256-pixel images,
as REPA's code does) resampled to the model's token grid when the two differ.

    >>> import torch
    >>> h, y = torch.randn(2, 4, 8), torch.randn(2, 4, 16)
    >>> float(repa_loss(h, y, Projector(8, 16, hidden=32))) <= 1.0
    True
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from runtime.cli import UsageError
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_encoder", "encoder_resolution", "preprocess",
           "resample_tokens", "encoder_tokens", "Projector", "repa_loss"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation (its image processor's defaults)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_TYPES = ("dinov2", "dinov2_with_registers")


def load_encoder(path: str) -> nn.Module:
    """A frozen, eval-mode transformers DINOv2 from the local folder ``path``; one clear UsageError otherwise.
    Nothing is downloaded.

    >>> load_encoder("/nowhere")
    Traceback (most recent call last):
    runtime.cli.UsageError: --repa-encoder /nowhere: no transformers model folder there (config.json missing); ...
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--repa-encoder {path}: no transformers model folder there (config.json missing); "
                         "save one with Dinov2Model.from_pretrained(...).save_pretrained(PATH) where a network is")
    from transformers import AutoConfig, AutoModel  # only REPA needs transformers

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"--repa-encoder {path}: its config.json does not load ({str(error).splitlines()[0]})"
                         ) from error
    if config.model_type not in ENCODER_TYPES:
        raise UsageError(f"--repa-encoder {path}: a {config.model_type!r} model, not DINOv2 "
                         f"({', '.join(ENCODER_TYPES)})")
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"--repa-encoder {path}: its weights do not load ({str(error).splitlines()[0]})") from error
    return encoder.eval().requires_grad_(False)


def encoder_resolution(image_pixels: int, patch_size: int) -> int:
    """The encoder's input size for images of ``image_pixels``: REPA's 224 per 256 pixels (224 at 256, 448 at
    512), rounded down to whole encoder patches, at least one patch.

    >>> encoder_resolution(256, 14), encoder_resolution(512, 14), encoder_resolution(32, 14)
    (224, 448, 28)
    """
    pixels = 224 * image_pixels // 256
    return max(patch_size, pixels // patch_size * patch_size)


def preprocess(images: Tensor, size: int) -> Tensor:
    """Images in [−1, 1] (N, C, H, W; one channel is repeated to three) as REPA's code feeds DINOv2: to [0, 1],
    ImageNet normalisation, then a bicubic resize (no antialiasing) to ``size`` × ``size``.

    >>> preprocess(torch.zeros(1, 1, 8, 8), 14).shape
    torch.Size([1, 3, 14, 14])
    """
    x = (images.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (x - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x


def resample_tokens(tokens: Tensor, grid: int) -> Tensor:
    """Patch tokens (N, side², D) on a ``grid`` × ``grid`` grid: area-averaged when the grid is coarser (16 → 8
    averages 2 × 2 tokens), bilinear when finer, unchanged when equal.

    >>> resample_tokens(torch.arange(16.0).view(1, 16, 1), 2).flatten().tolist()
    [2.5, 4.5, 10.5, 12.5]
    """
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} encoder tokens are no square grid")
    if side == grid:
        return tokens
    maps = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
    mode = dict(mode="area") if grid < side else dict(mode="bilinear", align_corners=False)
    return F.interpolate(maps, size=(grid, grid), **mode).flatten(2).transpose(1, 2)


@torch.no_grad()
def encoder_tokens(encoder: nn.Module, images: Tensor, grid: int, size: int | None = None) -> Tensor:
    """The encoder's patch tokens of ``images`` (N, grid², D) in fp32: the final layer norm's output (DINOv2's
    ``x_norm_patchtokens``, what REPA aligns to), class and register tokens dropped, on the model's grid.
    ``size`` is the encoder's input (default: :func:`encoder_resolution` of the images)."""
    config = encoder.config
    size = size or encoder_resolution(images.shape[-1], config.patch_size)
    tokens = encoder(pixel_values=preprocess(images, size)).last_hidden_state
    tokens = tokens[:, 1 + getattr(config, "num_register_tokens", 0):]
    return resample_tokens(tokens.float(), grid)


class Projector(nn.Sequential):
    """REPA's per-token projector: Linear → SiLU → Linear → SiLU → Linear, from the model's width to the
    encoder's (hidden 2048 as REPA's), Xavier-uniform weights and zero biases as REPA initialises them.

    >>> Projector(8, 16, hidden=32)(torch.randn(2, 4, 8)).shape
    torch.Size([2, 4, 16])
    """

    def __init__(self, width: int, encoder_width: int, hidden: int = 2048) -> None:
        super().__init__(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, encoder_width))
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


def repa_loss(hidden: Tensor, target: Tensor, projector: nn.Module) -> Tensor:
    """Mean over tokens and batch of −cos(projector(hidden), target), the cosine in fp32; hidden (N, T, D),
    target (N, T, D_enc). The projector runs in the caller's autocast, as REPA's does."""
    if hidden.shape[:2] != target.shape[:2]:
        raise ValueError(f"model tokens {tuple(hidden.shape[:2])} and encoder tokens {tuple(target.shape[:2])} "
                         "differ: resample the encoder's grid (encoder_tokens(..., grid=))")
    projected = projector(hidden)
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
