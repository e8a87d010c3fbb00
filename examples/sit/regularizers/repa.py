"""REPA's pieces (Yu et al. 2024, "Representation Alignment for Generation"): a frozen DINOv2 encoder loaded from
a local folder, its preprocessing, an MLP projector, and the alignment loss. Not wired into train.py yet (see
docs/sit.md, "ANM beside REPA and Dispersive Loss").

The loss aligns the hidden state after block k (REPA: k = 8 of SiT-XL/2's 28) to the encoder's patch tokens:
the mean over tokens and batch of −cos(projector(h_n), y_n), with y the encoder's tokens of the *same* images
(resized to the encoder's input, its ImageNet normalisation) interpolated to the model's token grid.

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

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_encoder", "preprocess", "encoder_tokens", "Projector",
           "repa_loss"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation (its image processor's defaults)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_TYPES = ("dinov2", "dinov2_with_registers")


def load_encoder(path: str) -> nn.Module:
    """A frozen, eval-mode transformers DINOv2 from the local folder ``path``; one clear UsageError otherwise.
    Nothing is downloaded."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--repa-encoder {path}: no transformers model folder there (config.json missing); "
                         "save one with Dinov2Model.from_pretrained(...).save_pretrained(PATH) where a network is")
    from transformers import AutoConfig, AutoModel  # only REPA needs transformers

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in ENCODER_TYPES:
        raise UsageError(f"--repa-encoder {path}: a {config.model_type!r} model, not DINOv2 "
                         f"({', '.join(ENCODER_TYPES)})")
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except OSError as error:
        raise UsageError(f"--repa-encoder {path}: its weights do not load ({str(error).splitlines()[0]})") from error
    return encoder.eval().requires_grad_(False)


def preprocess(images: Tensor, size: int) -> Tensor:
    """Images in [−1, 1] (N, C, H, W; one channel is repeated to three) as the encoder expects them: bicubic
    resize to ``size``, then ImageNet normalisation."""
    x = (images.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


@torch.no_grad()
def encoder_tokens(encoder: nn.Module, images: Tensor, grid: int) -> Tensor:
    """The encoder's patch tokens of ``images`` (N, grid², D): class and register tokens dropped, and the token
    grid bilinearly interpolated to the model's ``grid`` × ``grid`` when the two differ."""
    config = encoder.config
    tokens = encoder(pixel_values=preprocess(images, config.image_size)).last_hidden_state
    tokens = tokens[:, 1 + getattr(config, "num_register_tokens", 0):]
    side = math.isqrt(tokens.shape[1])
    if side != grid:
        maps = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
        maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
        tokens = maps.flatten(2).transpose(1, 2)
    return tokens.float()


class Projector(nn.Sequential):
    """REPA's per-token projector: Linear → SiLU → Linear → SiLU → Linear, from the model's width to the
    encoder's (hidden 2048 as REPA's).

    >>> Projector(8, 16, hidden=32)(torch.randn(2, 4, 8)).shape
    torch.Size([2, 4, 16])
    """

    def __init__(self, width: int, encoder_width: int, hidden: int = 2048) -> None:
        super().__init__(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, encoder_width))


def repa_loss(hidden: Tensor, target: Tensor, projector: nn.Module) -> Tensor:
    """Mean over tokens and batch of −cos(projector(hidden), target), in fp32; hidden (N, T, D), target
    (N, T, D_enc)."""
    if hidden.shape[:2] != target.shape[:2]:
        raise ValueError(f"model tokens {tuple(hidden.shape[:2])} and encoder tokens {tuple(target.shape[:2])} "
                         "differ: interpolate the encoder's grid (encoder_tokens(..., grid=))")
    projected = projector(hidden.float())
    return -F.cosine_similarity(projected, target.float(), dim=-1).mean()
