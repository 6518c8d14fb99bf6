"""Deterministic sample order and augmentation: an epoch's order is a function of (seed, epoch) and each
sample's augmentation of (seed, epoch, index) alone, so a resumed run (on any number of processes) sees the
same images with the same augmentation as one that never stopped."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochSampler", "SeededDataset", "micro_batches", "sample_seed", "rank_seed", "seed_everything"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919_111 + int(index) * 2_654_435_761) % (2**62)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of ``rank`` from ``step`` on (dropout, drop path: each process draws its own)."""
    return (int(seed) * 998_244_353 + (int(rank) + 1) * 1_000_000_007 + int(step) * 19_260_817) % (2**62)


class EpochSampler(Sampler):
    """Indices of an epoch in an order fixed by (seed, epoch), each with its augmentation seed.

    Yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`. ``start`` skips the first items
    of this rank's share (resuming mid-epoch without loading them). With several processes each ``rank``
    takes every ``world_size``-th item of the same permutation, so consecutive per-rank batches of ``b``
    make up consecutive global batches of ``b x world_size`` items whatever the number of processes.
    ``num_samples`` uses only the permutation's first items (a whole number of global batches: every rank
    then gets the same number of batches).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 num_samples: int | None = None):
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        self.num_samples = self.n if num_samples is None else min(int(num_samples), self.n)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[:self.num_samples][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._order()[self.start:]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start)


class SeededDataset(Dataset):
    """Loads ``dataset[index]`` with torch's CPU generator seeded by the sample's seed (the global
    generator is restored afterwards), so random augmentation does not depend on what ran before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also seeds every CUDA device, and a CUDA build without one
            # records a traceback for the lazy seeding on every call (0.6 ms a sample)
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def micro_batches(loader: Iterable, k: int) -> Iterator[Any]:
    """The loader's batches grouped by ``k`` (gradient accumulation); each batch as it is for ``k == 1``."""
    if k == 1:
        yield from loader
        return
    group: list[Any] = []
    for b in loader:
        group.append(b)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group
