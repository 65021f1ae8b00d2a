"""Sharded sampling on a real local Ray: the same seed gives bit-identical output with 1 and 2 actors,
and every (class, slot) appears exactly once."""
import dataclasses

import pytest
import torch

from raydd.config import ComputeConfig


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raydd.distributed.cluster import init_ray

    init_ray(ComputeConfig(num_cpus=2))
    yield
    ray.shutdown()


def test_one_and_two_actors_bit_identical(ray_local, digits_cfg, spec):
    from raydd.distributed.data import generate_ray
    from raydd.generate import make_rows

    sampler = dataclasses.replace(digits_cfg.sampler, steps=6)
    rows = make_rows(num_classes=10, per_class=3, run_seed=7, unit_size=8)   # 30 rows, 4 units mixing classes
    one = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=1, batch_size=8))
    two = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=2, batch_size=8))
    assert len(one) == 30 and torch.equal(one.labels, torch.arange(10).repeat_interleave(3))
    assert torch.equal(one.slots, torch.arange(3).repeat(10))
    assert torch.equal(one.images, two.images) and torch.equal(one.latents, two.latents)
    other = generate_ray(spec, sampler, make_rows(10, 3, run_seed=8, unit_size=8), ComputeConfig(num_actors=2))
    assert not torch.equal(one.latents, other.latents)                        # the seed matters
