"""How a distilled set reaches the evaluation workers, and the guard that no sample is lost or repeated."""
import numpy as np
import pytest
import torch

import raydd.jobs as jobs
import raydd.outputs as outputs
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
    assert outputs.image_nbytes(path) == ds.images.numel()
    monkeypatch.setattr(jobs, "INLINE_LIMIT", 10)               # this set is now "large"
    read = outputs.read_distilled
    monkeypatch.setattr(outputs, "read_distilled", lambda *a, **k: pytest.fail("a large set was read to size it"))
    by_path = jobs.set_source(str(path))
    assert by_path == {"kind": "parquet", "path": str(path)}
    monkeypatch.setattr(outputs, "read_distilled", read)
    for source in (inline, by_path):
        x, y = jobs.load_set(source)
        order = torch.argsort(y * 10 + torch.arange(len(y)))
        assert torch.equal(y[order], ds.labels) and torch.equal(x[order], ds.images)


def test_check_complete_rejects_lost_and_repeated_samples():
    rows = {"class_idx": np.array([0, 0, 1]), "slot": np.array([0, 1, 0])}
    check_complete(rows, {"class_idx": np.array([1, 0, 0]), "slot": np.array([0, 1, 0])})   # any order
    with pytest.raises(RuntimeError, match="returned 2 rows"):
        check_complete(rows, {"class_idx": np.array([0, 1]), "slot": np.array([0, 0])})
    with pytest.raises(RuntimeError, match=r"returned 3 rows \(2 distinct\)"):
        check_complete(rows, {"class_idx": np.array([0, 0, 1]), "slot": np.array([0, 0, 0])})


@pytest.fixture()
def staged(spec, digits_cfg, tmp_path):
    """Two units sampled in process by a SampleBatches that writes them (as a sampling actor on the driver's
    machine does), and the same rows sampled in memory."""
    import dataclasses
    import socket

    from raydd.generate import SampleBatches, generate_local, make_rows

    sampler = dataclasses.replace(digits_cfg.sampler, steps=2)
    rows = make_rows(num_classes=10, per_class=1, run_seed=4, unit_size=5)          # units 0 and 1, 5 classes each
    stage = tmp_path / "stage"
    stage.mkdir()
    light = SampleBatches(spec, sampler, stage_dir=str(stage), stage_host=socket.gethostname())(rows)
    return light, stage, rows, generate_local(spec, sampler, rows)


def test_a_sampling_actor_writes_its_units_and_returns_only_light_columns(staged, spec, digits_cfg, tmp_path):
    import dataclasses

    from raydd.generate import SampleBatches

    light, stage, rows, _ = staged
    assert sorted(light) == ["class_idx", "score", "seed", "slot", "unit"]        # no image, no latent
    assert sorted(p.name for p in stage.iterdir()) == ["unit-0.npz", "unit-1.npz"]
    elsewhere = tmp_path / "elsewhere"                            # an actor on another machine: a plain path there
    elsewhere.mkdir()                                             # is not the driver's, so the unit goes back whole
    whole = SampleBatches(spec, dataclasses.replace(digits_cfg.sampler, steps=2), stage_dir=str(elsewhere),
                          stage_host="another-machine")(rows)
    assert {"image", "latent"} <= set(whole) and not any(elsewhere.iterdir())


def test_a_staged_set_reads_writes_and_scores_like_the_set_in_memory(staged, tmp_path):
    from raydd.generate import StagedSet, images_of, save_unit
    from raydd.outputs import read_distilled

    _, stage, _, memory = staged
    s = StagedSet.read(stage, np.array([0, 1]))
    assert torch.equal(s.labels, memory.labels) and torch.equal(s.slots, memory.slots)
    assert torch.equal(s.images, memory.images) and torch.equal(s.latents, memory.latents)
    idx = torch.tensor([7, 2, 5])                                  # rows from both files, out of order
    taken, want = s.take(idx), memory.take(idx)
    assert torch.equal(taken.images, want.images) and torch.equal(taken.latents, want.latents)
    none = s.take(torch.tensor([], dtype=torch.long))                 # no rows: empty, shaped like the set's
    assert none.images.shape == (0, *memory.images.shape[1:]) and none.latents.shape == (0, *memory.latents.shape[1:])
    cols = {k: v[idx.numpy()] for k, v in s.image_columns().items()}
    assert sorted(cols) == ["pos", "unit_file"] and np.array_equal(images_of(cols), want.images.numpy())
    # a map stage (CaO2's selector, S3's encoder) keeps its rows with these columns in them
    (tmp_path / "map").mkdir()
    save_unit(tmp_path / "map", {"unit": np.zeros(3, np.int64), **cols})
    with np.load(tmp_path / "map" / "unit-0.npz") as z:
        assert np.array_equal(z["unit_file"], cols["unit_file"]) and np.array_equal(z["pos"], cols["pos"])
    assert s.latent_std() == pytest.approx(memory.latent_std(), rel=1e-6)
    import raydd.generate

    opened, open_unit = [], raydd.generate.open_unit

    def counted_open(f):
        opened.append(str(f))
        return open_unit(f)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(raydd.generate, "open_unit", counted_open)
        a = write_distilled(s, tmp_path / "from_stage", [str(c) for c in range(10)])
    assert sorted(opened) == sorted(s.files(np.array([0, 5])))       # a class at a time, each unit file read once
    b = write_distilled(memory, tmp_path / "from_memory", [str(c) for c in range(10)])
    ra, rb = read_distilled(a), read_distilled(b)
    assert torch.equal(ra.images, rb.images) and torch.equal(ra.latents, rb.latents)
    assert torch.equal(ra.labels, rb.labels) and torch.equal(ra.slots, rb.slots)
    pngs = sorted(p.relative_to(a) for p in (a / "images").rglob("*.png"))
    assert len(pngs) == 10 and all((a / p).read_bytes() == (b / p).read_bytes() for p in pngs)


def test_a_figure_reads_only_the_classes_and_slots_it_shows(tmp_path):
    """compare's grid shows 4 images of 10 classes: read_distilled(classes=, per_class=) returns the lowest slots of
    those classes only, in canonical order, and opens no other class's file."""
    from raydd.outputs import read_distilled

    g = torch.Generator().manual_seed(0)
    labels, slots = torch.arange(3).repeat_interleave(3), torch.tensor([2, 0, 1] * 3)   # slots out of order
    ds = DistilledSet(torch.randint(0, 256, (9, 1, 4, 4), dtype=torch.uint8, generator=g), labels, slots,
                      torch.randn(9, 2, 2, 2, generator=g).half(), torch.arange(9).float())
    out = write_distilled(ds, tmp_path / "set", ["a", "b", "c"])
    (out / "parquet" / "class_idx=0" / "part-0.parquet").write_bytes(b"not parquet")   # never opened
    part = read_distilled(out, classes=[1, 2], per_class=2)
    want = ds.sorted().take(torch.tensor([3, 4, 6, 7]))                              # slots 0, 1 of classes 1, 2
    assert part.labels.tolist() == [1, 1, 2, 2] and part.slots.tolist() == [0, 1, 0, 1]
    assert torch.equal(part.images, want.images) and torch.equal(part.latents, want.latents)
    assert torch.equal(part.scores, want.scores)


def test_a_stage_on_a_uri_is_written_by_actors_on_any_machine_and_reads_as_on_a_path(spec, digits_cfg, tmp_path):
    """compute.stages as a pyarrow URI (file:// here; s3://, gs:// on clusters): every node reaches it, so an actor
    on another machine than the driver's writes its units there too, and the staged set reads, writes and resumes
    from it as from a local path."""
    import dataclasses

    from raydd.generate import SampleBatches, StagedSet, generate_local, make_rows, stage_units
    from raydd.outputs import read_distilled

    sampler = dataclasses.replace(digits_cfg.sampler, steps=2)
    rows = make_rows(num_classes=10, per_class=1, run_seed=4, unit_size=5)
    uri = f"file://{tmp_path}/stages/generate-x"
    light = SampleBatches(spec, sampler, stage_dir=uri, stage_host="another-machine")(rows)
    assert "image" not in light and stage_units(uri) == [0, 1]
    assert sorted(p.name for p in (tmp_path / "stages" / "generate-x").iterdir()) == ["unit-0.npz", "unit-1.npz"]
    s, memory = StagedSet.read(uri, np.array([0, 1])), generate_local(spec, sampler, rows)
    assert s.files()[0].startswith("file://") and torch.equal(s.images, memory.images)
    assert torch.equal(s.take(torch.tensor([3, 8])).latents, memory.latents[[3, 8]])
    back = read_distilled(write_distilled(s, tmp_path / "out", [str(c) for c in range(10)]))
    assert torch.equal(back.images, memory.images) and s.latent_std() == pytest.approx(memory.latent_std(), rel=1e-6)


@pytest.mark.parametrize("where", ["path", "uri"])
def test_a_written_set_reads_as_a_staged_set_and_a_union_writes_class_by_class(tmp_path, where):
    """LGD goes on from a written D_{i−1} without reading it (raydd.outputs.written_set: its class files read as unit
    files), and writes D_i = D_{i−1} ∪ I_i a class at a time (SetUnion): the same set as merging them in memory."""
    from raydd.generate import SetUnion, StagedSet, images_of
    from raydd.outputs import read_distilled, written_set

    g = torch.Generator().manual_seed(1)
    old = DistilledSet(images=torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8),
                       labels=torch.tensor([2, 0, 1, 0, 1, 2]), slots=torch.tensor([0, 0, 0, 1, 1, 1]),
                       latents=torch.randn(6, 4, 2, 2, generator=g).half(), scores=torch.arange(6).float())
    out = write_distilled(old, f"file://{tmp_path}/set" if where == "uri" else tmp_path / "set", ["a", "b", "c"])
    w, want = written_set(out), read_distilled(out)
    assert isinstance(w, StagedSet) and torch.equal(w.labels, want.labels) and torch.equal(w.slots, want.slots)
    assert torch.equal(w.scores, want.scores) and str(w.files()[0]).startswith("file://" if where == "uri" else "/")
    assert torch.equal(w.take(torch.tensor([4, 1])).latents, want.latents[[4, 1]])
    assert np.array_equal(images_of(w.image_columns()), want.images.numpy())          # as an actor reads them
    assert w.latent_std() == pytest.approx(want.latent_std(), rel=1e-6)
    new = DistilledSet(images=torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8),
                       labels=torch.tensor([2, 1]), slots=torch.tensor([2, 2]),
                       latents=torch.randn(2, 4, 2, 2, generator=g).half(), scores=torch.tensor([7.0, 8.0]))
    u = read_distilled(write_distilled(SetUnion(w.subset(np.array([1, 2, 3, 4, 5])), new), tmp_path / "u",
                                       ["a", "b", "c"]))
    merged = DistilledSet(torch.cat([want.images[1:], new.images]), torch.cat([want.labels[1:], new.labels]),
                          torch.cat([want.slots[1:], new.slots]), torch.cat([want.latents[1:], new.latents]),
                          torch.cat([want.scores[1:], new.scores])).sorted()
    assert u.labels.tolist() == [0, 1, 1, 1, 2, 2, 2] and torch.equal(u.slots, merged.slots)
    assert torch.equal(u.images, merged.images) and torch.equal(u.latents, merged.latents)
    assert torch.equal(u.scores, merged.scores)
    no_latents = DistilledSet(new.images, new.labels, new.slots)                      # a real-image side: no latents
    assert read_distilled(write_distilled(SetUnion(w, no_latents), tmp_path / "v", ["a", "b", "c"])).latents is None


@pytest.mark.slow
@pytest.mark.ray
def test_a_set_too_large_to_travel_inline_streams_to_the_students(digits_cfg, tmp_path, monkeypatch):
    """#20 item 5: a set over INLINE_LIMIT is neither read by the driver nor held by the students: every evaluation
    worker streams it (a Ray Dataset of its class files, through the worker's shuffle buffer), labels and all, and
    so does the job that trains a classifier on a set (LGD's θ_{i−1})."""
    import dataclasses

    import ray

    from raydd.context import Context
    from raydd.data import load_real
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner

    cfg = dataclasses.replace(digits_cfg, ipc=20)
    cfg.eval = dataclasses.replace(cfg.eval, ranking=False)
    train = load_real(cfg.data).train
    keep = torch.cat([torch.nonzero(train.y == c).flatten()[:20] for c in range(10)])       # 20 real digits a class
    ds = DistilledSet(train.x[keep], train.y[keep], torch.arange(20).repeat(10))
    path = write_distilled(ds, tmp_path / "set", [str(c) for c in range(10)])
    monkeypatch.setattr(jobs, "INLINE_LIMIT", 10)                                          # "large"
    source = jobs.set_source(str(path))
    assert source == {"kind": "parquet", "path": str(path)}
    init_ray(cfg.compute)
    try:
        runner = RayRunner(cfg, tmp_path / "scratch")
        summary = jobs.evaluate_set(cfg, source, runner)
        ctx = Context(cfg, load_real(cfg.data), None, runner=runner, scratch=tmp_path / "scratch")
        _, theta = ctx.set_classifier(path, "convnet_d1", 2, tmp_path / "theta.safetensors", evaluate=True)  # LGD's θ
    finally:
        ray.shutdown()
    (job,) = summary["jobs"]
    assert job["kind"] == "syn" and job["train_streamed"] is True
    assert job["best_acc"] > 0.3                                      # 10 classes: wrong labels would give ~0.1
    assert theta["streamed"] is True and theta["eval_acc"] > 0.3
