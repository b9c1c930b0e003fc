"""Bucket layout arithmetic: every element of every parameter owned by exactly one rank."""

import random

import pytest
import torch

from zero_ext.zero.partition import ALIGN, plan_buckets


def _random_model(seed):
    rng = random.Random(seed)
    numels = [rng.choice([1, 3, 16, 17, 100, 1000, 4099]) for _ in range(rng.randint(1, 40))]
    groups = [rng.randint(0, 2) for _ in numels]
    return numels, groups


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(20))
def test_every_element_is_owned_once_and_padding_is_aligned(world_size, seed):
    numels, groups = _random_model(seed)
    bucket_numel = random.Random(seed).choice([1, 64, 1000, 10**9])
    layouts = plan_buckets(numels, [torch.Size([n]) for n in numels], groups, world_size,
                           bucket_numel)
    seen = set()
    for position, layout in enumerate(layouts):
        assert layout.index == position
        assert layout.padded_numel % (world_size * ALIGN) == 0
        owner = torch.full((layout.padded_numel,), -1)
        for rank in range(world_size):
            start, end = layout.shard_range(rank)
            assert (owner[start:end] == -1).all()
            owner[start:end] = rank
        assert (owner >= 0).all()  # the shards tile the bucket exactly
        covered = torch.zeros(layout.padded_numel, dtype=torch.int32)
        for slot in layout.slots:
            assert slot.offset % ALIGN == 0
            assert groups[slot.param_index] == layout.group  # one group per bucket
            assert slot.numel == numels[slot.param_index]
            covered[slot.offset:slot.offset + slot.numel] += 1
            assert set(owner[slot.offset:slot.offset + slot.numel].tolist()) == \
                set(layout.owners(slot))
            seen.add(slot.param_index)
        assert covered.max() <= 1  # parameters never overlap
        assert layout.used_numel == int(covered.sum())
        # A bucket closes once it reaches the bucket size: all but its last parameter fit.
        before_last = layout.slots[-1].offset
        assert before_last <= bucket_numel + ALIGN or len(layout.slots) == 1
    assert seen == set(range(len(numels)))


def test_interleaved_groups_share_buckets_instead_of_splitting_them():
    # weight (decay), bias (no decay), weight, bias, ...: two buckets, not one per parameter.
    numels = [100, 10] * 6
    groups = [0, 1] * 6
    layouts = plan_buckets(numels, [torch.Size([n]) for n in numels], groups, 2, 10**6)
    assert [layout.group for layout in layouts] == [1, 0]
    assert [len(layout.slots) for layout in layouts] == [6, 6]


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        plan_buckets([1], [torch.Size([1])], [0], 0, 10)
    with pytest.raises(ValueError, match="bucket size must be >= 1 element"):
        plan_buckets([1], [torch.Size([1])], [0], 1, 0)
