"""The random streams of a training run, and the data stream that replays exactly after a resume.

:func:`rng_state` / :func:`set_rng_state` save and restore every stream a step draws from.
:class:`StreamSampler` and :class:`SeededItems` give each item of a step its own seed, so the data, noise
and time of a step depend on the step and the global batch alone: not on the number of processes, the
micro-batches, or where the run was interrupted.
"""
from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Iterator

import numpy as np
import torch
from runtime.cli import UsageError
from runtime.determinism import deterministic_kernels
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

__all__ = ["rng_state", "set_rng_state", "seed_everything", "cpu_seeded", "StreamSampler", "SeededItems"]


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Every random stream a training step draws from, for bit-exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_torch(np.random.get_state()),
        "torch": torch.get_rng_state(),  # label dropout
        "generator": generator.get_state(),  # VAE posterior samples (--data imagenet)
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _numpy_state_to_torch(state: tuple) -> tuple:
    # numpy's key array as a tensor, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Inverse of rng_state."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int, device: torch.device, deterministic: bool = False) -> torch.Generator:
    """Seed python, numpy and torch (the CPU generator and every CUDA device's) with this rank's seed; returns
    the generator of the VAE posterior samples. Nothing later in the setup reseeds the CUDA generators (see
    :func:`cpu_seeded`), so label dropout, drawn on the model's device, differs between ranks on GPUs as on
    the CPU. ``deterministic``: kernels that sum in a fixed order too (runtime/determinism.py), set here,
    before the first kernel runs."""
    if deterministic:
        deterministic_kernels()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference trains in fp32 with TF32
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator(device).manual_seed(seed)


@contextlib.contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator seeded with ``seed``; afterwards: as it was before. The CUDA generators
    are left alone: ``torch.manual_seed`` would reseed those of every device too, and ``fork_rng(devices=[])``
    would not undo it, leaving every rank's CUDA stream where the same seed put it."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class StreamSampler(Sampler):
    """DistributedSampler's shuffled per-rank order (drop_last), startable mid-epoch; yields
    (index, item seed) so that per-item draws replay identically after a resume.

    Step s of an epoch holds the items at positions [s*B, (s+1)*B) of the shuffled order for any number of
    processes (rank r takes every world_size-th of them), so the data stream depends on the global batch B
    alone."""

    def __init__(self, num_items: int, local_batch: int, rank: int, world_size: int, seed: int) -> None:
        self.order = DistributedSampler(range(num_items), world_size, rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.local_batch, self.seed = local_batch, seed
        self.steps_per_epoch = len(self.order) // local_batch
        if self.steps_per_epoch == 0:
            raise UsageError(f"the data set of {num_items} items is too small for a global batch of "
                             f"{local_batch * world_size}: lower --global-batch-size")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        """Next iteration yields epoch `epoch` from its `start_step`-th batch on."""
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"batch {start_step} of an epoch of {self.steps_per_epoch} batches")
        self.epoch, self.start_step = epoch, start_step
        self.order.set_epoch(epoch)

    def __iter__(self):
        begin, end = self.start_step * self.local_batch, self.steps_per_epoch * self.local_batch
        for index in list(self.order)[begin:end]:
            yield index, ((self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + index) % 2**63

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch


class SeededItems(Dataset):
    """Wraps a dataset so each item is drawn with its own RNG seeded by the sampler (see StreamSampler), and
    adds the item's flow-matching noise (of noise_shape) and uniform time draw from a second per-item stream.

    Because noise and t belong to the item, not to a process, a step trains on the same numbers however
    its batch is split over processes (DDP) or micro-batches (--grad-accum-steps)."""

    def __init__(self, dataset: Dataset, noise_shape: tuple[int, ...]) -> None:
        self.dataset, self.noise_shape = dataset, noise_shape
        self.takes_generator = "generator" in inspect.signature(type(dataset).__getitem__).parameters

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        """(x, y, noise, u, *rest) for the dataset's item (x, y, *rest): e.g. the source image of a latent
        (data/latent_images.py) comes after the draws."""
        index, seed = key
        draws = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
        noise = torch.randn(self.noise_shape, generator=draws)
        u = torch.rand((), generator=draws)
        x, y, *rest = self._item(index, seed)
        return x, y, noise, u, *rest

    def _item(self, index: int, seed: int) -> tuple:
        if self.takes_generator:
            return self.dataset.__getitem__(index, generator=torch.Generator().manual_seed(seed))
        # Datasets that draw from the global RNGs (e.g. a random flip): seed them per item, then restore
        # the training process's own streams (with num_workers=0 this runs in the main process).
        py_state, np_state = random.getstate(), np.random.get_state()
        with cpu_seeded(seed):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
