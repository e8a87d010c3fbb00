"""A one-element flag of a CUDA tensor, brought to the host without stalling the training step.

``loss()`` must not wait for the GPU to learn whether the norms were finite: the flag is copied into
pinned host memory with ``non_blocking=True`` and read one call later, after waiting for an event recorded
right behind the copy. The copy runs on the current stream of the *flag's* device (what ``copy_`` uses),
which is not the current device's whenever the model lives on another GPU than ``torch.cuda.current_device()``
(a rank that never called ``set_device``, a model on ``cuda:1`` in a notebook). The event therefore belongs
to that device and is recorded on that stream; one recorded on the current device's stream would complete
without waiting for the copy, and the host would read a flag not yet written. The pinned buffer and the
event are made once per device, under that device, so that no CUDA context is created on ``cuda:0`` for a
process that works on another GPU, and reused every step. CPUs cannot run any of this: the tests replace
``torch.cuda`` with fakes that record which device and stream each call used.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HostFlag"]


class HostFlag:
    """Copies a one-element ``bool`` CUDA tensor to the host in the background; :meth:`read` waits for it only.

    Example (needs a GPU, so not run here)::

        flag = HostFlag(torch.device("cuda", 1))
        flag.copy_from(torch.isfinite(loss))   # queued behind the work that computes it; no sync
        ...                                    # more GPU work is queued
        ok = flag.read()                       # waits for the copy only, not for the work queued since

    Example:
        >>> from anm.host_flag import HostFlag
        >>> HostFlag.__name__
        'HostFlag'
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):  # the pinned block and the event belong to the flag's device
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._copied = torch.cuda.Event()
        self.pending = False

    def copy_from(self, flag: Tensor) -> None:
        """Queue the copy of ``flag`` (on this flag's device) to the host, and an event right behind it."""
        if self.pending:  # never overwrite the buffer while the previous copy may still be in flight
            self._copied.synchronize()
        stream = torch.cuda.current_stream(flag.device)  # the stream copy_ enqueues on: the flag's device's
        self._host.copy_(flag, non_blocking=True)
        self._copied.record(stream)
        self.pending = True

    def read(self) -> bool:
        """The copied value, after waiting for the copy (and what was queued before it) to finish."""
        self._copied.synchronize()
        self.pending = False
        return bool(self._host)
