"""A stand-in for the parts of ``torch.cuda`` the deferred non-finite check uses, for CPU-only machines.

It keeps CUDA's ordering rules, so that a wrong stream or device shows up as a wrong answer, as it would
on a GPU:

- each device has one current stream (its default stream); work queued on a stream runs in order, and
  only when something waits for it;
- ``host.copy_(cuda_tensor, non_blocking=True)`` is queued on the current stream of the *CUDA tensor's*
  device (what ATen's copy does) and writes the pinned host buffer only once it has run;
- ``Event.record()`` without a stream records on the current stream of the *current* device;
  ``Event.synchronize()`` runs what its stream had queued before the record, nothing else;
- a pinned host allocation creates a CUDA context on the current device (``contexts`` lists them).

A pinned buffer that nothing has written yet reads as ``True`` (the worst garbage: "all finite").
What this cannot show: real timing, real memory, the caching host allocator. Those need a GPU.
"""

from __future__ import annotations

import contextlib

import torch


class FakeCudaTensor:
    """A CPU tensor that says it lives on a CUDA device (the all-finite flag the regulariser copies)."""

    def __init__(self, value: torch.Tensor, device: torch.device) -> None:
        self.value, self.device = value, device

    def __bool__(self) -> bool:
        return bool(self.value)


class FakeStream:
    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.queue: list = []  # callables, run in order when waited for

    def run_until(self, position: int) -> None:
        for op in self.queue[:position]:
            op()
        del self.queue[:position]


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.recorded: tuple[FakeStream, int] | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream if stream is not None else self.cuda.current_stream()
        self.recorded = (stream, len(stream.queue))
        self.cuda.records.append(stream.device_index)

    def synchronize(self) -> None:
        if self.recorded is not None:
            stream, position = self.recorded
            stream.run_until(position)


class FakePinned:
    """A pinned host buffer: written by a queued copy only once that copy has run."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.value = cuda, True  # unwritten pinned memory: garbage that reads "all finite"

    def copy_(self, source: FakeCudaTensor, non_blocking: bool = False) -> FakePinned:
        stream = self.cuda.current_stream(source.device)

        def write() -> None:
            self.value = bool(source.value)

        stream.queue.append(write)
        self.cuda.copies.append(stream.device_index)
        if not non_blocking:
            stream.run_until(len(stream.queue))
        return self

    def __bool__(self) -> bool:
        return self.value


class FakeCuda:
    """Install with :meth:`install` (a pytest ``monkeypatch``); ``flags_on`` makes ``torch.isfinite`` of a
    0-dim tensor (the regulariser's all-finite flag) a tensor on that CUDA device."""

    def __init__(self, current_device: int = 0) -> None:
        self.current = current_device
        self.streams: dict[int, FakeStream] = {}
        self.contexts: set[int] = set()  # devices on which a CUDA context was created
        self.pinned: list[FakePinned] = []
        self.records: list[int] = []  # device of the stream of each Event.record
        self.copies: list[int] = []  # device of the stream of each copy

    def current_stream(self, device: torch.device | int | None = None) -> FakeStream:
        if device is None:
            index = self.current
        elif isinstance(device, int):
            index = device
        else:
            index = device.index if device.index is not None else self.current
        return self.streams.setdefault(index, FakeStream(index))

    @contextlib.contextmanager
    def device(self, device: torch.device | int):
        previous = self.current
        self.current = device if isinstance(device, int) else device.index
        try:
            yield
        finally:
            self.current = previous

    def install(self, monkeypatch, flags_on: torch.device) -> None:
        real_empty, real_isfinite = torch.empty, torch.isfinite

        def empty(*args, pin_memory: bool = False, **kwargs):
            if not pin_memory:
                return real_empty(*args, **kwargs)
            self.contexts.add(self.current)
            self.pinned.append(FakePinned(self))
            return self.pinned[-1]

        def isfinite(tensor):
            result = real_isfinite(tensor)
            return FakeCudaTensor(result, flags_on) if result.dim() == 0 else result

        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch, "isfinite", isfinite)
        monkeypatch.setattr(torch.cuda, "Event", lambda *args, **kwargs: FakeEvent(self))
        monkeypatch.setattr(torch.cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
