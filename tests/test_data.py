"""The data order: a pure function of (seed, epoch, rank), sharded for DDP."""

import collections

import pytest

from src.core.training.data import EpochSampler


@pytest.mark.parametrize("size", [3, 7, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_training_shards_are_padded_to_equal_length_and_cover_every_sample(size, world_size):
    shards = [
        EpochSampler(size, shuffle=True, seed=1, epoch=2, rank=r, world_size=world_size) for r in range(world_size)
    ]
    assert len({len(shard) for shard in shards}) == 1  # the same number of steps on every rank: DDP cannot hang
    seen = collections.Counter(index for shard in shards for index in shard)
    assert set(seen) == set(range(size))
    assert sum(seen.values()) - size == len(shards[0]) * world_size - size  # only the padding repeats


@pytest.mark.parametrize("size", [3, 7, 101])
@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_shards_hold_every_sample_exactly_once(size, world_size):
    shards = [EpochSampler(size, shuffle=False, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(index for shard in shards for index in shard) == list(range(size))  # no padding: unbiased means


def test_the_order_depends_on_seed_and_epoch_only_and_a_start_skips_into_it():
    order = list(EpochSampler(50, shuffle=True, seed=3, epoch=1))
    assert order == list(EpochSampler(50, shuffle=True, seed=3, epoch=1))
    assert order != list(EpochSampler(50, shuffle=True, seed=3, epoch=2))
    assert order != list(EpochSampler(50, shuffle=True, seed=4, epoch=1))
    assert list(EpochSampler(50, shuffle=True, seed=3, epoch=1, start=16)) == order[16:]
    assert list(EpochSampler(50, shuffle=False, seed=3, limit=10)) == list(range(10))
