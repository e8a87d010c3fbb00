"""Holding items out of a training set: a fixed selection spread over the classes, and the set without them.

ImageNet-style folders list their images class by class, so "the last N items" is one or two classes. The
selection here takes the classes in turn (one item of every class before a second of any), in an order and
with items drawn from a fixed seed: a pure function of the labels, hence the same on every rank, in every
run over the same data, and after a resume.

    >>> labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    >>> sorted(labels[i] for i in spread_indices(labels, 3))
    [0, 1, 2]
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["HELDOUT_SEED", "spread_indices", "without"]

HELDOUT_SEED = 12345  # one selection for every run and seed: runs are compared on the same items


def spread_indices(labels: Sequence[int] | np.ndarray, n: int, seed: int = HELDOUT_SEED) -> list[int]:
    """n distinct indices into labels, spread over the classes: round k takes the k-th item (in a seeded
    shuffle) of every class that still has one, classes in a seeded order. The order of the result is the
    order of selection, so consecutive items are of different classes."""
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot pick {n} of {len(labels)} items")
    rng = np.random.default_rng(seed)
    by_class = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[by_class], return_index=True)
    groups = [rng.permutation(group) for group in np.split(by_class, starts[1:])]
    class_order = rng.permutation(len(groups))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for c in class_order:
            if depth < len(groups[c]):
                picked.append(int(groups[c][depth]))
                if len(picked) == n:
                    break
        depth += 1
    return picked


class _Without(Dataset):
    """The items of dataset except some, renumbered 0..len-1 in their original order."""

    def __init__(self, dataset: Dataset, excluded: Sequence[int]) -> None:
        self.dataset = dataset
        keep = np.ones(len(dataset), dtype=bool)
        keep[np.asarray(excluded, dtype=np.int64)] = False
        self.indices = np.flatnonzero(keep)
        self.excluded = sorted(int(i) for i in excluded)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]


class _WithoutSeeded(_Without):
    """_Without for datasets that draw from a generator argument (data/streams.py passes one per item)."""

    def __getitem__(self, index: int, generator: torch.Generator | None = None):
        return self.dataset.__getitem__(int(self.indices[index]), generator=generator)


def without(dataset: Dataset, excluded: Sequence[int]) -> Dataset:
    """dataset minus the items at excluded; keeps the `generator=` keyword where dataset takes one, so the
    per-item seeding of data/streams.py works as on the full set."""
    takes_generator = "generator" in inspect.signature(type(dataset).__getitem__).parameters
    return (_WithoutSeeded if takes_generator else _Without)(dataset, excluded)
