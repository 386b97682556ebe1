"""The training data order: a DistributedSampler per epoch, resumable mid-epoch.

The order of an epoch is a pure function of ``(seed, epoch, rank, world size)`` (the
sampler's seeded shuffle) and every item is a pure function of ``(seed, epoch, index)`` (the
dataset's augmentation), so resuming at batch k of epoch e means skipping the first k batches'
indices - no image is loaded for them.

The sampler hands out ``(epoch, index)`` pairs and the dataset wrapper sets the epoch per item:
with persistent worker processes each worker holds its own copy of the dataset, which a
``set_epoch`` call in the main process would never reach.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cyclegan.data.dataset import UnpairedDataset
from cyclegan.errors import DataError
from cyclegan.train.distributed import DistInfo


class _EpochItems(Dataset):
    """``dataset[(epoch, i)]`` = ``dataset[i]`` as augmented in ``epoch``."""

    def __init__(self, dataset: UnpairedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of an epoch in shuffled order, starting ``skip`` items in."""

    def __init__(self, dataset: UnpairedDataset, dist: DistInfo, seed: int) -> None:
        self.inner: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
        )
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch to iterate and how many of its items are already done."""
        self.epoch, self.skip = epoch, skip
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)[self.skip :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def make_loader(
    dataset: UnpairedDataset, dist: DistInfo, *, batch_size: int, num_workers: int, seed: int
) -> tuple[DataLoader, EpochSampler, int]:
    """The DataLoader, its sampler, and the number of steps per epoch.

    The last incomplete batch of an epoch is dropped so every step has the same shape (no
    recompilation, no CUDA-graph re-capture); at the paper's batch size 1 nothing is dropped.
    """
    sampler = EpochSampler(dataset, dist, seed)
    per_rank = len(sampler.inner)
    steps = per_rank // batch_size
    if steps == 0:
        raise DataError(
            f"{len(dataset)} training items over {dist.world_size} rank(s) give no full batch "
            f"of train.batch_size={batch_size}",
            "lower train.batch_size or use fewer ranks",
        )
    loader = DataLoader(
        _EpochItems(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=num_workers > 0,
        # Items are deterministic functions of (seed, epoch, index): workers need no seeding.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler, steps
