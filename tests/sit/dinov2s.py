"""Tiny random transformers DINOv2s (no download), REPA's encoder in the tests: 1 layer, 2 heads."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def tiny_dinov2(seed: int = 0, registers: int = 0, hidden_size: int = 8, intermediate_size: int = 16,
                patch_size: int = 4, image_size: int = 224) -> nn.Module:
    """A frozen, eval-mode DINOv2 (with ``registers`` register tokens: DINOv2-with-registers) drawn from ``seed``."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=intermediate_size, patch_size=patch_size, image_size=image_size)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**kwargs, num_register_tokens=registers))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    return model.eval().requires_grad_(False)


def save_tiny_dinov2(path: Path, **kwargs) -> str:
    """:func:`tiny_dinov2` saved as a transformers folder at path (what --repa-encoder loads); returns path."""
    tiny_dinov2(**kwargs).save_pretrained(path)
    return str(path)
