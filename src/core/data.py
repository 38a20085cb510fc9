"""The order in which data is read, made a pure function of (seed, epoch, rank).

A mid-epoch resume needs to know which batches an epoch has left. Here the
epoch's permutation is computed from `derive_seed(seed, "train", epoch)`, and
each DataLoader gets its own generator for its workers' seeds, so neither
depends on anything else that happened before. Resuming at batch k then means:
without workers, start the sampler at k*batch_size; with workers, read and
discard the first k batches, so every worker's random stream (augmentations)
replays exactly.
"""

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from src.core.seeding import derive_seed


class EpochSampler(Sampler[int]):
    """The indices one rank reads in one epoch.

    Shuffled training data is padded (repeating the first indices) so that every
    rank gets the same number of batches, as DDP needs. Evaluation data is not
    padded, so no sample is counted twice in a metric; ranks may then get
    different numbers of batches, which is fine without per-batch collectives.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
        start: int = 0,
    ):
        self.size = min(size, limit) if limit else size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.per_rank = math.ceil(self.size / world_size) if shuffle else len(range(rank, self.size, world_size))

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
            padding = self.per_rank * self.world_size - self.size
            order += (order * (padding // max(1, self.size) + 1))[:padding]
        else:
            order = list(range(self.size))
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def make_loader(
    dataset_class: type,
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    phase: str,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    limit: int | None = None,
    skip_batches: int = 0,
) -> tuple[DataLoader, Iterator]:
    """A DataLoader for one epoch of one phase, and an iterator positioned `skip_batches` in."""
    start = skip_batches * batch_size if num_workers == 0 else 0
    sampler = EpochSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        limit=limit,
        start=start,
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, phase, "workers", epoch, rank))
    loader = dataset_class.get_dataloader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
    )
    batches = iter(loader)
    if num_workers > 0 and skip_batches:
        batches = itertools.islice(batches, skip_batches, None)
    return loader, batches
