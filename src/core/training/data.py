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

from src.core.config.validation import Config
from src.core.distributed import DistContext
from src.core.phases import BY_NAME
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


class Loaders:
    """The DataLoaders of a run's phases, each for one epoch: the batch size (`eval_batch_size` for
    evaluation), workers, pinned memory on CUDA, and this rank's share of the data."""

    def __init__(self, config: Config, datasets: dict[str, tuple[type, Dataset]], context: DistContext):
        self.config, self.datasets, self.context = config, datasets, context

    def batch_size(self, phase: str) -> int:
        if phase != "train" and self.config.eval_batch_size:
            return self.config.eval_batch_size
        return self.config.batch_size

    def sampler(self, phase: str, epoch: int = 0, limit: int | None = None, start: int = 0) -> EpochSampler:
        return EpochSampler(
            len(self.datasets[phase][1]),
            shuffle=phase == "train",
            seed=self.config.seed,
            epoch=epoch,
            rank=self.context.rank,
            world_size=self.context.world_size,
            limit=limit,
            start=start,
        )

    def batches_per_epoch(self) -> int:
        """Training batches of one epoch on this rank (every rank the same: see EpochSampler)."""
        return math.ceil(self.sampler("train").per_rank / self.config.batch_size)

    def loader(
        self, phase: str, epoch: int = 0, skip_batches: int = 0, limit: int | None = None
    ) -> tuple[DataLoader, Iterator]:
        """A DataLoader for one epoch of one phase, and an iterator positioned `skip_batches` in."""
        dataset_class, dataset = self.datasets[phase]
        batch_size, workers = self.batch_size(phase), self.config.num_workers
        sampler = self.sampler(phase, epoch, limit, start=skip_batches * batch_size if workers == 0 else 0)
        # The workers' seeds, named by the config's split names (as before the phases had one name).
        seed = derive_seed(self.config.seed, BY_NAME[phase].split, "workers", epoch, self.context.rank)
        loader = dataset_class.get_dataloader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=self.context.device.type == "cuda",
        )
        batches = iter(loader)
        if workers > 0 and skip_batches:
            batches = itertools.islice(batches, skip_batches, None)
        return loader, batches
