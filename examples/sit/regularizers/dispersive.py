"""Dispersive Loss (Wang & He, 2025, "Diffuse and Disperse: Image Generation with Representation
Regularization"): a repulsive, InfoNCE-style term on one block's hidden states across the batch, with no
positive pairs and no extra network.

For the batch's hidden states z_1 … z_N (one block's output, flattened per sample),

    L_disp = log( (1/N²) · Σ_{i,j} exp(−D(z_i, z_j) / τ) )

over all ordered pairs, the diagonal included. ``distance="l2"`` (InfoNCE-L2, the paper's default) takes
D = ‖z_i − z_j‖² / d, the squared L2 distance divided by the d features of a flattened sample: the paper's
pseudo-code scales it so, and without that scale a SiT block's distances (d = tokens × width) would put every
off-diagonal exp(−D/τ) at 0 in floating point, leaving no gradient. ``distance="cosine"`` (InfoNCE-cosine)
takes D = −cos(z_i, z_j). The term is computed in fp32 from the hidden states an
:class:`anm.ActivationCollector` keeps (``site="output"``, ``keep_activations=True``).

    >>> import torch
    >>> round(dispersive_loss(torch.zeros(4, 3)).item(), 6)   # all points equal: log(1) = 0, the maximum
    0.0
"""
from __future__ import annotations

import argparse
import math

import torch
from runtime.cli import UsageError
from torch import Tensor, nn

import anm

__all__ = ["DISTANCES", "dispersive_loss", "DispersiveTerm", "build_dispersive"]

DISTANCES = ("l2", "cosine")


def dispersive_loss(z: Tensor, tau: float = 0.5, distance: str = "l2") -> Tensor:
    """L_disp of the batch ``z`` (N, ...) in fp32: log of the mean of exp(−D/τ) over all N² ordered pairs.

    Lower means more dispersed; its minimum is −log N (all points infinitely far apart but for the diagonal),
    its maximum 0 (all points equal).

    Example:
        >>> z = torch.tensor([[0.0], [1.0]])
        >>> abs(dispersive_loss(z, tau=1.0).item() - math.log((2 + 2 * math.exp(-1)) / 4)) < 1e-6   # D_01 = 1
        True
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}: use one of {DISTANCES}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    flat = z.reshape(len(z), -1).float()
    if distance == "l2":
        sq = flat.pow(2).sum(1)
        # ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b: an (N, N) Gram instead of an (N, N, d) difference tensor.
        dist = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp_min(0) / flat.shape[1]
    else:
        unit = nn.functional.normalize(flat, dim=1)
        dist = -(unit @ unit.T)
    n = len(flat)
    return torch.logsumexp((-dist / tau).reshape(-1), dim=0) - 2 * math.log(n)


class DispersiveTerm:
    """λ · L_disp of the hidden states of ``layers`` of ``model``, read through an ActivationCollector.

    Every training forward (a micro-batch) records each hooked block's output; :meth:`loss` turns those
    records into the mean of their L_disp times λ, and forgets them. Eval and ``torch.no_grad()`` forwards
    record nothing. Attach it before DDP / torch.compile wrap the model, as ANM's hooks.

    Example:
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        >>> term = DispersiveTerm(net, layers="1", lam=0.5, tau=0.5)
        >>> _ = net(torch.randn(4, 5, 8))
        >>> term.loss().shape
        torch.Size([])
        >>> term.close()
    """

    def __init__(self, model: nn.Module, layers: anm.layers.LayerSpec, lam: float = 0.5, tau: float = 0.5,
                 distance: str = "l2") -> None:
        self.lam, self.tau, self.distance = lam, tau, distance
        self.collector = anm.ActivationCollector(model, layers=layers, site="output", keep_activations=True,
                                                 training_only=True)
        self.names = self.collector.names

    def loss(self) -> Tensor:
        """λ times the mean L_disp of the block outputs recorded since the last call (fp32 scalar)."""
        states = self.collector.hidden_states()
        self.collector.clear()
        if not states:
            raise RuntimeError(f"Dispersive Loss: blocks {self.names} recorded no training forward since the "
                               "last loss() (hooks added after torch.compile traced the model?)")
        terms = [dispersive_loss(state, self.tau, self.distance) for state in states]
        return self.lam * torch.stack(terms).mean()

    def close(self) -> None:
        """Remove the hooks. Safe to call twice."""
        self.collector.remove()

    def __repr__(self) -> str:
        return f"DispersiveTerm(layers={self.names}, lam={self.lam:g}, tau={self.tau:g}, distance={self.distance!r})"


def dispersive_layers(model: nn.Module, block: str | None) -> str:
    """The glob of --dispersive-block: None is the middle block (index depth // 2 of the model's block list),
    an integer an index into that list (negative from the end), anything else a glob of module names.

    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])
    >>> dispersive_layers(net, None), dispersive_layers(net, "-1"), dispersive_layers(net, "1")
    ('2', '3', '1')
    """
    if block is not None and not block.lstrip("-").isdigit():
        return block
    names = [name for name, _ in anm.find_blocks(model)]
    index = len(names) // 2 if block is None else int(block)
    if not -len(names) <= index < len(names):
        raise UsageError(f"--dispersive-block {block}: the model has {len(names)} blocks (index 0 to "
                         f"{len(names) - 1}, or negative from the end)")
    return names[index]


def build_dispersive(args: argparse.Namespace, model: nn.Module) -> DispersiveTerm | None:
    """The Dispersive Loss term of train.py's flags on the bare model, or None without --dispersive."""
    if not args.dispersive:
        return None
    if not args.dispersive_tau > 0 or not math.isfinite(args.dispersive_tau):
        raise UsageError(f"--dispersive-tau must be a finite number > 0, got {args.dispersive_tau}")
    if not args.dispersive_lambda >= 0 or not math.isfinite(args.dispersive_lambda):
        raise UsageError(f"--dispersive-lambda must be a finite number >= 0, got {args.dispersive_lambda}")
    layers = dispersive_layers(model, args.dispersive_block)
    try:
        return DispersiveTerm(model, layers, lam=args.dispersive_lambda, tau=args.dispersive_tau,
                              distance=args.dispersive_distance)
    except anm.ANMError as error:
        raise UsageError(f"--dispersive-block {args.dispersive_block}: {str(error).rstrip('.')}") from error
