"""A fingerprint of a module's weights: what the same network has wherever its files are, and another one does
not (extract_latents.py's VAE encoder, REPA's image encoder).

    >>> import torch
    >>> weights_sha256(torch.nn.Linear(2, 2)) == weights_sha256(torch.nn.Linear(2, 2))
    False
"""
from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["weights_sha256"]


def weights_sha256(module: nn.Module, prefixes: tuple[str, ...] = ()) -> str:
    """SHA-256 of the names and float32 values of ``module``'s state dict, in name order; with ``prefixes``, of
    the entries whose names start with one of them only.

    >>> len(weights_sha256(nn.Linear(2, 2), prefixes=("weight",)))
    64
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not prefixes or name.startswith(prefixes):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
