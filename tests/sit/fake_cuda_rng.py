"""The CUDA default generators as seen by a CPU-only test: torch.cuda's seeding functions replaced by ones that
record, per device, the seed the generator was last given (torch.manual_seed reaches them through
torch.cuda.manual_seed_all, even without a GPU), so a test can tell which seed each rank's CUDA stream has.

    fake = install(monkeypatch)       # in a test
    fake = install()                  # in a child process that runs a script, for the rest of its life
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pytest


class FakeCudaGenerators:
    """Stand-ins for torch.cuda.{manual_seed, manual_seed_all, get_rng_state, set_rng_state} over ``devices``
    devices; a generator's state is its seed (None: never seeded), as a state tensor it is 8 bytes."""

    def __init__(self, devices: int = 2, current: int = 0) -> None:
        self.seeds: dict[int, int | None] = dict.fromkeys(range(devices))
        self.current = current
        self.calls: list[tuple[str, int | None, int]] = []  # (function, device or None for all, seed)

    def index(self, device: int | str | torch.device = "cuda") -> int:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return self.current if device.index is None else device.index

    def manual_seed(self, seed: int) -> None:
        self.seeds[self.current] = int(seed)
        self.calls.append(("manual_seed", self.current, int(seed)))

    def manual_seed_all(self, seed: int) -> None:
        for device in self.seeds:
            self.seeds[device] = int(seed)
        self.calls.append(("manual_seed_all", None, int(seed)))

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        seed = self.seeds[self.index(device)]
        return torch.tensor([-1 if seed is None else seed], dtype=torch.int64).view(torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        seed = int(state.view(torch.int64)[0])
        self.seeds[self.index(device)] = None if seed == -1 else seed
        self.calls.append(("set_rng_state", self.index(device), seed))


def install(monkeypatch: pytest.MonkeyPatch | None = None, devices: int = 2, current: int = 0) -> FakeCudaGenerators:
    """Route torch.cuda's seeding functions to a new FakeCudaGenerators (undone by monkeypatch, if given)."""
    fake = FakeCudaGenerators(devices, current)
    for name in ("manual_seed", "manual_seed_all", "get_rng_state", "set_rng_state"):
        if monkeypatch is not None:
            monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
        else:
            setattr(torch.cuda, name, getattr(fake, name))
    return fake
