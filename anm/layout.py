"""Is the feature axis where the norms are taken? A guard against norms over the width of an image.

Transformer activations are ``(batch, tokens, features)``; convolutional blocks (timm ConvNeXt, U-Net
stages) produce channel-first maps ``(N, C, H, W)``, where a norm over the last axis would silently be a
norm over image columns. The block's own layers say its width (``Linear.in_features``, a norm's
``normalized_shape``, ``Conv.out_channels``, ...): when the chosen axis does not have that size but the
other candidate does, the layout is wrong and the error says which ``feature_dim`` to pass.
"""

from __future__ import annotations

from torch import Tensor, nn

from .errors import ANMError

__all__ = ["check_feature_layout", "block_widths"]


def block_widths(module: nn.Module) -> set[int]:
    """Feature widths the layers inside ``module`` work on (empty when it has no such layer).

    Example:
        >>> from torch import nn
        >>> from anm.layout import block_widths
        >>> sorted(block_widths(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32))))
        [8, 32]
    """
    widths: set[int] = set()
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            widths.update((layer.in_features, layer.out_features))
        elif isinstance(layer, nn.modules.conv._ConvNd):
            widths.update((layer.in_channels, layer.out_channels))
        elif isinstance(getattr(layer, "normalized_shape", None), (tuple, list)) and layer.normalized_shape:
            widths.add(int(layer.normalized_shape[-1]))
        elif isinstance(getattr(layer, "num_channels", None), int):
            widths.add(layer.num_channels)
        elif isinstance(getattr(layer, "num_features", None), int):  # BatchNorm
            widths.add(layer.num_features)
        else:  # norms without a normalized_shape attribute (HF RMSNorm): a 1-D weight of the width
            weight = getattr(layer, "weight", None)
            if isinstance(weight, Tensor) and weight.dim() == 1:
                widths.add(weight.shape[0])
    return widths


def check_feature_layout(name: str, widths: frozenset[int], activation: Tensor, feature_dim: int) -> None:
    """Raise ``ANMError`` when ``activation`` of layer ``name`` (whose layers have ``widths``, see
    :func:`block_widths`) has its features on another axis, or ``feature_dim`` does not exist."""
    if not -activation.dim() <= feature_dim < activation.dim():
        raise ANMError(
            f"feature_dim={feature_dim} is out of range for layer {name!r}'s activation of shape "
            f"{tuple(activation.shape)}: use -1 for (..., features) tensors or 1 for channel-first maps."
        )
    if activation.dim() < 3 or not widths:
        return
    chosen = feature_dim % activation.dim()
    other = 1 if chosen == activation.dim() - 1 else activation.dim() - 1
    size, other_size = activation.shape[chosen], activation.shape[other]
    if size in widths or other_size not in widths or size == other_size:
        return
    fix = "feature_dim=1 (channel-first maps)" if other == 1 else "feature_dim=-1 (features last)"
    raise ANMError(
        f"layer {name!r} produced an activation of shape {tuple(activation.shape)} whose axis {chosen} "
        f"(size {size}) is none of the block's feature widths {sorted(widths)[:6]}, while axis {other} "
        f"(size {other_size}) is one: the norms would be taken over the wrong axis. Pass {fix}."
    )
