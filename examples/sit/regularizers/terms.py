"""The representation terms train.py adds beside the FM loss and ANM: Dispersive Loss and REPA, either, both or
none, read through the library's activation collectors.

    >>> terms = Terms()
    >>> terms.parameters(), terms.state_dict()
    ([], {})
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from regularizers.dispersive import DispersiveTerm
from regularizers.repa_term import RepaTerm

__all__ = ["Terms"]


@dataclass
class Terms:
    """Dispersive Loss and REPA of one run (each None when off).

    Example:
        >>> import torch
        >>> [float(t) for t in Terms().losses(torch.zeros(()), torch.zeros(1, 3, 8, 8))]   # both off
        [0.0, 0.0]
    """

    dispersive: DispersiveTerm | None = None
    repa: RepaTerm | None = None

    def losses(self, like: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """(Dispersive, REPA) of the training forward just run (zeros for terms that are off); ``images`` are
        the micro-batch's images, in [−1, 1], for REPA's encoder."""
        zero = like.new_zeros((), dtype=torch.float32)
        return (zero if self.dispersive is None else self.dispersive.loss(),
                zero if self.repa is None else self.repa.loss(images))

    def parameters(self) -> list[nn.Parameter]:
        """The trained parameters the terms add (REPA's projector): into the optimizer beside the model's."""
        return [] if self.repa is None else list(self.repa.projector.parameters())

    def sync_gradients(self, world_size: int) -> None:
        """Average the added parameters' gradients over the ranks (after the step's last backward)."""
        if self.repa is not None:
            self.repa.sync_gradients(world_size)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of them (REPA: projector and encoder fingerprint; Dispersive: nothing)."""
        return {} if self.repa is None else {"repa": self.repa.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        if self.repa is not None:
            self.repa.load_state_dict(state["repa"])

    def encoder_ms(self, micro_batches: int) -> float | None:
        """REPA's encoder time per step (of ``micro_batches`` encoder calls) since the last call, in ms: over the
        steps this process timed, so a row after a resume is not diluted (None without REPA)."""
        if self.repa is None:
            return None
        ms, calls = self.repa.timer.pop_ms()
        return ms * micro_batches / calls if calls else 0.0

    def describe(self) -> list[str]:
        """Log lines, one per term that is on."""
        return ([] if self.dispersive is None else [repr(self.dispersive)]) + (
            [] if self.repa is None else [self.repa.describe()])

    def close(self) -> None:
        """Remove every hook (the end of a run, however it ends)."""
        for term in (self.dispersive, self.repa):
            if term is not None:
                term.close()
