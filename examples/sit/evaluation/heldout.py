"""A fixed held-out set, and what the example scripts measure on it: flow-matching loss and block norms.

The set fixes everything a flow-matching loss would otherwise draw at random (data, labels, the noise
and the time of each item), so the loss measured on it has no sampling noise and two runs, or two
checkpoints of one run, are compared on exactly the same inputs. t is the uniform midpoint grid
``(i + 0.5) / n``, so every part of the path counts equally.

    heldout = make_heldout(images, seed=12345)                 # labels default to class 0
    loss = fm_loss(model, transport, heldout)                  # mean FM loss, a float
    per_block = update_norms(model, transport, heldout)        # mean ||block(h) - h|| per block
    result = measure(model, transport, heldout, sites=("update", "output"))   # both in one pass

The norms are what ``anm.ANM`` sees during training, read here on the held-out inputs with the model in
eval mode: the per-token l2 norm of each transformer block's residual update (``site="update"``) or of
its output (``site="output"``), blocks found with ``layers="auto"`` as ``anm.ANM`` finds them.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from runtime.distributed import all_reduce_
from torch import Tensor, nn

import anm

__all__ = ["HeldoutSet", "Measurement", "make_heldout", "measure", "fm_loss", "update_norms"]


@dataclass(frozen=True)
class HeldoutSet:
    """Fixed inputs of a flow-matching loss: data ``x`` (N, C, H, W), labels ``y`` (N,), ``noise``, ``t`` (N,)."""

    x: Tensor
    y: Tensor
    noise: Tensor
    t: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> HeldoutSet:
        """The same set on ``device``."""
        return HeldoutSet(*(tensor.to(device) for tensor in (self.x, self.y, self.noise, self.t)))

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[HeldoutSet]:
        """This rank's share (items rank, rank + world_size, ...) in batches of at most ``batch_size``."""
        indices = torch.arange(rank, len(self), world_size, device=self.x.device)
        for chunk in indices.split(batch_size):
            yield HeldoutSet(self.x[chunk], self.y[chunk], self.noise[chunk], self.t[chunk])


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns: the mean FM loss and, per site, per-token norms (blocks, items, tokens)."""

    fm_loss: float
    norms: dict[str, Tensor]

    def mean_per_block(self, site: str = "update") -> list[float]:
        """Mean norm of each block at ``site`` over all items and tokens."""
        return self.norms[site].mean(dim=(1, 2)).tolist()


def make_heldout(x: Tensor, y: Tensor | None = None, seed: int = 12345,
                 generator: torch.Generator | None = None) -> HeldoutSet:
    """A held-out set of the images (or latents) ``x``: noise drawn once from ``seed``, t on a uniform grid.

    Pass a CPU ``generator`` instead of a seed to draw the noise from a stream already in use (e.g. the
    one that drew ``x``); labels default to class 0.

    >>> heldout = make_heldout(torch.zeros(4, 3, 8, 8))
    >>> heldout.t.tolist(), heldout.y.tolist()
    ([0.125, 0.375, 0.625, 0.875], [0, 0, 0, 0])
    """
    n = x.shape[0]
    if y is None:
        y = torch.zeros(n, dtype=torch.long)
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    t = ((torch.arange(n, dtype=torch.float32) + 0.5) / n).to(x.device)
    return HeldoutSet(x=x, y=y.to(x.device), noise=noise, t=t)


@torch.no_grad()
def measure(model: nn.Module, transport, heldout: HeldoutSet, sites: Sequence[str] = (), batch_size: int = 256,
            rank: int = 0, world_size: int = 1) -> Measurement:
    """Mean FM loss of ``model`` on ``heldout`` and per-token block norms at each of ``sites``, in one pass.

    The model runs in eval mode (its mode is restored after). Under ``torch.distributed`` each rank
    evaluates its share and the loss is averaged over all ranks; the norms are this rank's share only.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=heldout.x.device)
    norms: dict[str, list[Tensor]] = {site: [] for site in sites}
    collectors = {site: anm.ActivationCollector(model, layers="auto", site=site) for site in sites}
    try:
        for batch in heldout.batches(batch_size, rank, world_size):
            out = transport.training_losses(model, batch.x, dict(y=batch.y), t=batch.t, noise=batch.noise)
            total += torch.stack([out["loss"].double().sum(), total.new_tensor(float(len(batch)))])
            for site, collector in collectors.items():
                norms[site].append(torch.stack(collector.norms()))  # (blocks, batch, tokens)
                collector.clear()
    finally:
        for collector in collectors.values():
            collector.remove()
        model.train(was_training)
    if world_size > 1:
        all_reduce_(total)
    return Measurement(fm_loss=(total[0] / total[1]).item(),
                       norms={site: torch.cat(parts, dim=1) for site, parts in norms.items()})


def fm_loss(model: nn.Module, transport, heldout: HeldoutSet, batch_size: int = 256, rank: int = 0,
            world_size: int = 1) -> float:
    """Mean flow-matching loss of ``model`` on ``heldout`` (no randomness: noise and t are fixed)."""
    return measure(model, transport, heldout, (), batch_size, rank, world_size).fm_loss


def update_norms(model: nn.Module, transport, heldout: HeldoutSet, batch_size: int = 256) -> list[float]:
    """Mean per-token l2 norm of each block's residual update on ``heldout``, one value per block."""
    return measure(model, transport, heldout, ("update",), batch_size).mean_per_block("update")
