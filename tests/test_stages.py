"""Generation stages are kept by content: two runs that ask for the same samples share them (a sweep whose
trials differ only after sampling samples once), and the key tells apart inputs a repr would not."""
import dataclasses
import functools
import os
import time

import numpy as np
import pytest
import torch

from raydd.config import ComputeConfig
from raydd.distributed.data import stage_key


def _factory(backbone, device, *, mu):
    return None


def test_stage_key_counts_arrays_by_content_not_by_their_repr():
    a = np.zeros((10, 4, 32, 32), np.float32)
    b = a.copy()
    b[5, 2, 16, 16] = 1.0                                    # hidden in the "..." of numpy's repr
    fa, fb = functools.partial(_factory, mu=a), functools.partial(_factory, mu=b)
    assert repr(fa) == repr(fb)
    assert stage_key(fa) != stage_key(fb) and stage_key(fa) == stage_key(functools.partial(_factory, mu=a.copy()))


@pytest.mark.ray
def test_a_second_run_reuses_the_first_runs_samples(digits_cfg, spec, tmp_path, capsys, monkeypatch):
    import ray

    from raydd.distributed.cluster import init_ray
    from raydd.distributed.data import generate_ray
    from raydd.generate import StagedSet, make_rows

    init_ray(ComputeConfig(num_cpus=2))
    try:
        sampler = dataclasses.replace(digits_cfg.sampler, steps=4)
        rows = make_rows(num_classes=10, per_class=2, run_seed=3, unit_size=10)
        stages = tmp_path / "cache" / "stages"
        first = generate_ray(spec, sampler, rows, ComputeConfig(batch_size=10), scratch=tmp_path / "run1", stages=stages)
        capsys.readouterr()
        # what writers killed mid-write left: an old temp file is removed, a fresh one (maybe a live write) is not
        (stage_dir,) = stages.glob("generate-*")
        old, fresh = stage_dir / ".unit-0.123.tmp.npz", stage_dir / ".unit-1.456.tmp.npz"
        old.write_bytes(b"partial")
        fresh.write_bytes(b"partial")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        read, getitem = [], np.lib.npyio.NpzFile.__getitem__
        monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda z, k: read.append(k) or getitem(z, k))
        second = generate_ray(spec, sampler, rows, ComputeConfig(batch_size=10), scratch=tmp_path / "run2",
                              stages=stages)
        monkeypatch.undo()
        out = capsys.readouterr().out
        assert "2 unit(s) already done, 0 to go" in out and "removed 1 unfinished unit write(s)" in out
        assert not old.exists() and fresh.exists()
        assert read and not {"image", "latent"} & set(read)      # a reused stage: the driver reads no image
        assert isinstance(first, StagedSet) and len(first.files()) == 20   # the images stay in the unit files
        assert torch.equal(first.images, second.images) and torch.equal(first.latents, second.latents)
        other = generate_ray(spec, dataclasses.replace(sampler, cfg_scale=1.5), rows, ComputeConfig(batch_size=10),
                             scratch=tmp_path / "run3", stages=stages)
        assert not torch.equal(other.images, first.images)              # another sampler: its own stage
        assert len([d for d in stages.glob("generate-*") if d.is_dir()]) == 2
    finally:
        ray.shutdown()
