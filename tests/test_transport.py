"""How a distilled set reaches the evaluation workers, and the guard that no sample is lost or repeated."""
import numpy as np
import pytest
import torch

import raydd.jobs as jobs
from raydd.distributed.data import check_complete
from raydd.generate import DistilledSet
from raydd.outputs import write_distilled


@pytest.fixture()
def written(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = DistilledSet(images=torch.randint(0, 256, (6, 1, 16, 16), generator=g, dtype=torch.uint8),
                      labels=torch.tensor([0, 0, 1, 1, 2, 2]), slots=torch.tensor([0, 1] * 3))
    return write_distilled(ds, tmp_path / "set", ["a", "b", "c"]), ds


def test_small_sets_travel_inline_and_large_ones_by_path_with_the_same_content(written, monkeypatch):
    path, ds = written
    inline = jobs.set_source(str(path))
    assert inline["kind"] == "arrays"
    monkeypatch.setattr(jobs, "INLINE_LIMIT", 10)               # this set is now "large"
    by_path = jobs.set_source(str(path))
    assert by_path == {"kind": "parquet", "path": str(path)}
    for source in (inline, by_path):
        x, y = jobs.load_set(source, None, None)
        order = torch.argsort(y * 10 + torch.arange(len(y)))
        assert torch.equal(y[order], ds.labels) and torch.equal(x[order], ds.images)


def test_check_complete_rejects_lost_and_repeated_samples():
    rows = {"class_idx": np.array([0, 0, 1]), "slot": np.array([0, 1, 0])}
    check_complete(rows, {"class_idx": np.array([1, 0, 0]), "slot": np.array([0, 1, 0])})   # any order
    with pytest.raises(RuntimeError, match="returned 2 rows"):
        check_complete(rows, {"class_idx": np.array([0, 1]), "slot": np.array([0, 0])})
    with pytest.raises(RuntimeError, match=r"returned 3 rows \(2 distinct\)"):
        check_complete(rows, {"class_idx": np.array([0, 0, 1]), "slot": np.array([0, 0, 0])})
