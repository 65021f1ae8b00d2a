"""LGD (learnability-guided incremental distillation) and the redundancy diagnostic, on a tiny world:
random tiny DiT, random / briefly trained small classifiers, digits at 16 px, CPU, LocalRunner."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from raydd.config import make_method_config
from raydd.context import Context, LocalRunner
from raydd.data import load_real
from raydd.protocols import to_float
from raydd.methods import get_method
from raydd.objectives.learnability import (LearnabilityState, learnability_objective, max_memory_cosine, memory_term,
                                           score_images, top_kappa)
from raydd.redundancy import load_with_slots, off_diagonal_mean, redundancy_figure, redundancy_matrix, split_increments
from raydd.sampling import Guidance, sample, to_uint8
from raydd.students import create_student


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared CPU cores: one intra-op thread is faster than oversubscribing them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def classifier(seed: int):
    torch.manual_seed(seed)
    return create_student("convnet_d1", num_classes=10, in_chans=1, image_size=16).eval().requires_grad_(False)


def draw(backbone, sampler, y, seeds, guidance=None):
    """Sample and return what a classifier sees: the uint8 image through to_float, [-1, 1]."""
    out = sample(backbone, y, seeds, sampler, guidance)
    return to_float(to_uint8(backbone.vae.decode(out["z0"])))


@pytest.fixture()
def world(backbone, digits_cfg):
    y = torch.arange(10).repeat(2)                     # 2 samples per class
    return dict(backbone=backbone, sampler=digits_cfg.sampler, y=y, seeds=list(range(20)),
                theta=classifier(1), reference=classifier(2))


def state(w, diversity=0.0, memory=None, memory_labels=None):
    return LearnabilityState(w["theta"], w["reference"], omega=0.5, diversity=diversity,
                             memory=torch.zeros(0, 1, 16, 16) if memory is None else memory,
                             memory_labels=torch.zeros(0, dtype=torch.long) if memory_labels is None else memory_labels,
                             class_ids=torch.arange(10))


def test_learnability_guidance_raises_S_over_unguided_from_the_same_noise(world):
    w = world
    plain = draw(w["backbone"], w["sampler"], w["y"], w["seeds"])
    guided = draw(w["backbone"], w["sampler"], w["y"], w["seeds"],
                  Guidance(learnability_objective, scale=15.0, window=(2, 7), mode="full", on_images=True,
                           state=state(w)))
    s_plain = score_images(w["theta"], w["reference"], plain, w["y"], 0.5)
    s_guided = score_images(w["theta"], w["reference"], guided, w["y"], 0.5)
    assert s_guided.mean() > s_plain.mean() + 0.2
    assert (s_guided > s_plain).float().mean() >= 0.8


def test_candidates_are_scored_from_uint8_batch_by_batch_as_from_floats(world):
    """LGD scores its κ·IPC candidates per class (on the actors, LearnabilityScores): uint8 images are converted per
    batch, not all at once (a float copy of every candidate is ~22 GiB at ImageNet-1K)."""
    from raydd.protocols import to_float

    w = world
    images = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 10
    from_uint8 = score_images(w["theta"], w["reference"], images, labels, 0.5, batch_size=6)
    torch.testing.assert_close(from_uint8, score_images(w["theta"], w["reference"], to_float(images), labels, 0.5))


def test_candidates_are_scored_on_the_actors_from_their_unit_files_as_in_memory(world, tmp_path):
    """LearnabilityScores, the map UDF LGD scores its candidates with, reads a StagedSet's rows from the unit files
    the sampling actors wrote and gives score_images' S."""
    from safetensors.torch import save_file

    from raydd.generate import StagedSet, save_unit
    from raydd.objectives.learnability import LearnabilityScores

    w = world
    images = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for u in (0, 1):                                                     # two unit files of 10 rows
        rows = slice(10 * u, 10 * u + 10)
        save_unit(tmp_path, {"unit": np.full(10, u), "class_idx": np.arange(10), "slot": np.full(10, u),
                             "score": np.zeros(10, np.float32), "image": images[rows].numpy()})
    staged = StagedSet.read(tmp_path, np.array([0, 1]))
    for name in ("theta", "reference"):
        save_file(w[name].state_dict(), str(tmp_path / f"{name}.safetensors"))
    udf = LearnabilityScores(str(tmp_path / "theta.safetensors"), str(tmp_path / "reference.safetensors"), omega=0.5,
                             arch="convnet_d1", num_classes=10, channels=1, image_size=16)
    out = udf({"class_idx": staged.labels.numpy(), **staged.image_columns()})
    assert "image" not in out and sorted(out) == ["S", "class_idx", "pos", "unit_file"]
    want = score_images(w["theta"], w["reference"], staged.images, staged.labels, 0.5)
    torch.testing.assert_close(torch.from_numpy(out["S"]), want)


def test_memory_term_lowers_the_max_cosine_to_earlier_samples(world):
    w = world
    earlier = draw(w["backbone"], w["sampler"], w["y"], list(range(100, 120)))       # the memory buffer
    guidance = lambda st: Guidance(learnability_objective, 15.0, (2, 7), "full", True, st,  # noqa: E731
                                   latent_term=memory_term)   # on latents: the pixel backbone's are its images
    without = draw(w["backbone"], w["sampler"], w["y"], w["seeds"], guidance(state(w)))
    with_mem = draw(w["backbone"], w["sampler"], w["y"], w["seeds"],
                    guidance(state(w, diversity=50.0 / 15.0, memory=earlier, memory_labels=w["y"])))
    cos_without = max_memory_cosine(without, w["y"], earlier, w["y"])
    cos_with = max_memory_cosine(with_mem, w["y"], earlier, w["y"])
    assert cos_with.mean() < cos_without.mean() - 0.1
    assert (cos_with < cos_without).float().mean() >= 0.8


def test_max_memory_cosine_only_looks_at_the_own_class():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mem = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = max_memory_cosine(x, torch.tensor([0, 1, 2]), mem, torch.tensor([1, 0]))
    assert got.tolist() == pytest.approx([0.0, 1.0, 0.0])   # class 2 has no memory -> 0


def test_top_kappa_keeps_the_argmax_of_each_slot():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 3)                    # 12 slots x kappa = 3 candidates
    perm = rng.permutation(len(groups))
    scores, groups = rng.normal(size=len(groups)), groups[perm]
    keep = top_kappa(scores, groups)
    assert len(keep) == 12 and np.array_equal(groups[keep], np.arange(12))
    for g, k in zip(range(12), keep):
        assert scores[k] == scores[groups == g].max()
    assert top_kappa([1.0, np.nan, 2.0, 2.0], [0, 0, 1, 1]).tolist() == [0, 2]   # NaN loses; ties: first


def test_redundancy_is_about_100_percent_for_copies_of_one_increment(digits_cfg):
    data = load_real(digits_cfg.data)
    idx = torch.cat([torch.nonzero(data.train.y == c).flatten()[:3] for c in range(10)])  # 3 real images per class
    k = 3
    images = data.train.x[idx].repeat(k, 1, 1, 1)
    labels = data.train.y[idx].repeat(k)
    slots = torch.cat([torch.arange(3).repeat(10) + 3 * j for j in range(k)])
    parts = split_increments(labels, slots, k)
    for p in parts[1:]:                                    # every increment holds the same images
        assert torch.equal(images[p], images[parts[0]])
    ecfg = dataclasses.replace(digits_cfg.eval, cutmix_beta=0.0, rrc_scale_min=1.0)   # plain fitting
    r = redundancy_matrix(images, labels, slots, k, student="convnet_d1", num_classes=10, cfg=ecfg, epochs=10)
    assert r.shape == (k, k)
    assert off_diagonal_mean(r) >= 0.95
    assert np.allclose(r, r[0, 0])                          # train accuracy == accuracy on each copy
    redundancy_figure(r)                                    # renders without pyplot state


def test_folder_slots_follow_natural_file_order(tmp_path, digits_cfg):
    from raydd.outputs import to_pil

    class_names = [str(c) for c in range(10)]
    for c in range(2):
        (tmp_path / str(c)).mkdir()
        for s in (0, 1, 2, 10, 11):
            to_pil(np.full((1, 16, 16), s, np.uint8)).save(tmp_path / str(c) / f"{s}.png")
    x, y, slots = load_with_slots(tmp_path, class_names, 16, 1)
    assert sorted(zip(y.tolist(), slots.tolist(), x[:, 0, 0, 0].tolist())) == \
        [(c, r, v) for c in range(2) for r, v in enumerate((0, 1, 2, 10, 11))]


def test_guidance_factory_pickles_and_window_maps_to_the_respaced_steps():
    import pickle
    from functools import partial

    from raydd.methods.lgd import Config, learnability_guidance, respaced_window

    assert respaced_window(Config(), 50) == (10, 45)
    assert respaced_window(Config(), 8) == (2, 7)
    assert respaced_window(Config(), 250) == (50, 225)
    factory = partial(learnability_guidance, theta="a.safetensors", reference="b.safetensors", memory="stage",
                      arch="convnet_d3", num_classes=10, channels=1, image_size=16, class_ids=list(range(10)),
                      lam=15.0, omega=0.5, gamma=50.0, window=(2, 7), mode="full")
    assert pickle.loads(pickle.dumps(factory)).keywords == factory.keywords


def test_seed_from_an_imagefolder_keeps_the_first_slots_in_file_name_order(digits_cfg, spec, tmp_path):
    from raydd.methods.lgd import Config, seed_set
    from raydd.outputs import to_pil

    for c in range(10):
        (tmp_path / "seed" / str(c)).mkdir(parents=True)
        for v in (0, 1, 2, 10):                               # file order 0, 1, 10, 2; slot order 0, 1, 2, 10
            to_pil(np.full((1, 16, 16), v, np.uint8)).save(tmp_path / "seed" / str(c) / f"{v}.png")
    ctx = Context(digits_cfg, load_real(digits_cfg.data), spec, runner=LocalRunner(digits_cfg), scratch=tmp_path)
    ds = seed_set(ctx, Config(seed_path=str(tmp_path / "seed")), seed_ipc=3)
    assert len(ds) == 30 and ds.slots.tolist() == [0, 1, 2] * 10
    assert ds.images[:, 0, 0, 0].tolist() == [0, 1, 2] * 10   # 0.png, 1.png, 2.png (not 10.png)
    assert ds.latents is None and torch.isnan(ds.scores).all()


def lgd_ctx(cfg, spec, scratch, calls):
    class Counting(LocalRunner):
        def generate(self, *a, **kw):
            calls.append("generate")
            if calls.count("generate") == calls_limit.get("generate", 10**9):
                raise KeyboardInterrupt("simulated interruption")
            return super().generate(*a, **kw)

        def train(self, loop, config, name, *a, **kw):
            calls.append("theta" if "theta" in name else "other")
            return super().train(loop, config, name, *a, **kw)

    calls_limit = {}
    ctx = Context(cfg, load_real(cfg.data), spec, runner=Counting(cfg), scratch=scratch)
    return ctx, calls_limit


def test_resume_after_interruption_does_not_redo_finished_increments(digits_cfg, spec, tmp_path):
    cfg = dataclasses.replace(digits_cfg, ipc=3, data=dataclasses.replace(digits_cfg.data, max_train_per_class=10),
                              eval=dataclasses.replace(digits_cfg.eval, epochs=2, teacher_epochs=1))
    method = get_method("lgd")
    mcfg = make_method_config(method.Config, {"increment": 1, "kappa": 2}, "lgd")
    scratch = tmp_path / "scratch"

    calls: list[str] = []
    ctx, limit = lgd_ctx(cfg, spec, scratch, calls)
    limit["generate"] = 3                                   # seed (dit), increment 1, then stop in increment 2
    with pytest.raises(KeyboardInterrupt):
        method.run(ctx, mcfg)
    stage1 = scratch / "lgd" / "stage-001"
    manifest = json.loads((stage1 / "manifest.json").read_text())
    assert manifest["increment"] == 1 and manifest["counts"] == [2] * 10
    first_two = load_with_slots(stage1, [str(c) for c in range(10)], 16, 1)

    calls2: list[str] = []
    ctx2, _ = lgd_ctx(cfg, spec, scratch, calls2)
    ds = method.run(ctx2, mcfg)
    assert calls2.count("generate") == 1                    # only increment 2: no seed, no increment 1
    assert "theta" not in calls2                           # θ_1 was kept from the first run
    assert len(ds) == 30 and ds.slots.tolist() == [0, 1, 2] * 10
    old = ds.take(torch.nonzero(ds.slots < 2).flatten())
    assert torch.equal(old.images, first_two[0]) and torch.equal(old.slots, first_two[2])
    assert torch.isfinite(ds.scores[ds.slots == 2]).all()   # the new increment carries its S
    done = json.loads((scratch / "lgd" / "stage-002" / "manifest.json").read_text())
    assert done["increment"] == 2 and not stage1.exists()


def test_memory_grows_as_samples_are_accepted_within_an_increment(digits_cfg, spec, tmp_path):
    """IGD's sequential memory: an increment of 2 slots is sampled in 2 rounds, and the second round is guided
    away from a memory that already holds the first round's kept samples (latents, one per class more)."""
    from raydd.outputs import read_distilled

    cfg = dataclasses.replace(digits_cfg, ipc=3, data=dataclasses.replace(digits_cfg.data, max_train_per_class=10),
                              eval=dataclasses.replace(digits_cfg.eval, epochs=2, teacher_epochs=1))
    cfg.sampler = dataclasses.replace(cfg.sampler, steps=4)
    seen = []

    class Recording(LocalRunner):
        def generate(self, spec, rows, guidance_factory=None, **kw):
            if guidance_factory is not None:
                mem = read_distilled(guidance_factory.keywords["memory"])
                seen.append((sorted(set(rows["slot"] % 2)), torch.bincount(mem.labels).tolist(), mem.latents.shape))
            return super().generate(spec, rows, guidance_factory, **kw)

    method = get_method("lgd")
    ctx = Context(cfg, load_real(cfg.data), spec, runner=Recording(cfg), scratch=tmp_path)
    ds = method.run(ctx, make_method_config(method.Config, {"seed_ipc": 1, "increment": 2, "kappa": 2}, "lgd"))
    assert len(ds) == 30 and ds.slots.tolist() == [0, 1, 2] * 10
    assert [(slots, counts) for slots, counts, _ in seen] == [([0], [1] * 10), ([1], [2] * 10)]
    assert seen[0][2][1:] == (1, 16, 16)                    # latents [M, c, h, w]


def test_bad_increment_or_seed_ipc_fails_before_heavy_work(digits_cfg):
    from raydd.config import ConfigError
    from raydd.distill import check_method

    for lgd, match in [({"increment": 0}, "lgd.increment and lgd.kappa must be >= 1"),
                       ({"seed_ipc": 3}, r"lgd.seed_ipc=3 is larger than ipc=2; allowed: 1 .. 2")]:   # IPC 2
        with pytest.raises(ConfigError, match=match):
            check_method(dataclasses.replace(digits_cfg, method="lgd", methods={"lgd": lgd}))


def test_any_increment_fits_any_ipc_the_last_increment_takes_the_rest():
    """lgd.increment is searchable: an increment that does not divide IPC − seed IPC ends with a smaller one."""
    from raydd.methods.lgd import Config, increments

    assert increments(Config(seed_ipc=3, increment=4), 10) == (3, [4, 3])
    assert increments(Config(increment=5), 10) == (5, [5])
    assert increments(Config(increment=10), 10) == (10, [])
    assert increments(Config(increment=10), 1) == (1, [])              # the seed set is at most the run's IPC
    assert increments(Config(increment=3), 10) == (3, [3, 3, 1])


def test_an_increment_that_does_not_divide_the_ipc_runs_with_a_smaller_last_increment(digits_cfg, spec, tmp_path):
    cfg = dataclasses.replace(digits_cfg, ipc=4, data=dataclasses.replace(digits_cfg.data, max_train_per_class=10),
                              eval=dataclasses.replace(digits_cfg.eval, epochs=2, teacher_epochs=1))
    cfg.sampler = dataclasses.replace(cfg.sampler, steps=4)
    method = get_method("lgd")
    calls: list[str] = []
    ctx, _ = lgd_ctx(cfg, spec, tmp_path, calls)
    ds = method.run(ctx, make_method_config(method.Config, {"seed_ipc": 1, "increment": 2, "kappa": 1,
                                                            "memory_rounds": 1}, "lgd"))
    assert len(ds) == 40 and ds.slots.tolist() == [0, 1, 2, 3] * 10
    assert calls.count("theta") == 2                       # θ_0 on D_0 (IPC 1), θ_1 on D_1 (IPC 3)
    assert torch.isfinite(ds.scores[ds.slots >= 1]).all()  # slots 1, 2 (increment 1) and 3 (increment 2) are guided


def test_lgd_at_its_seed_ipc_warns_that_nothing_is_guided():
    """python -m raydd.compare showed lgd = dit exactly at the digits preset's IPC 10 (seed IPC 10, increment 10)."""
    import warnings

    from raydd.config import load_config
    from raydd.distill import check_method

    with pytest.warns(UserWarning, match=r"no guided increment, the set is dit's \(e.g. lgd.seed_ipc=5 lgd.increment=5"):
        check_method(load_config("digits", ["ipc=10"], method="lgd"))
    with pytest.warns(UserWarning, match=r"\(IPC 1 is a seed alone\)"):           # not "lgd.increment=0"
        check_method(load_config("digits", ["ipc=1"], method="lgd"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_method(load_config("digits", ["ipc=10", "lgd.seed_ipc=5", "lgd.increment=5"], method="lgd"))


@pytest.mark.slow
def test_on_ray_the_driver_holds_no_whole_set_only_a_class_at_a_time(digits_cfg, spec, tmp_path, monkeypatch):
    """#20 items 3 and 5: through RayRunner the sampling actors write LGD's κ candidates per slot, LearnabilityScores
    scores them on the actors, and the driver keeps the winners as rows of the candidates' unit files: it takes no
    row, reads no whole set, and reads images only a class at a time, to write D_i and to measure θ_{i−1}'s loss on
    it. θ_{i−1}'s accuracy on the eval split is measured in its own training job."""
    import ray

    import raydd.methods.lgd
    from raydd.context import NullTracker
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.generate import StagedSet

    taken, metrics, take, per_class, classes = [], {}, StagedSet.take, [], StagedSet.classes

    def counted_take(self, idx):
        taken.append(len(idx))
        return take(self, idx)

    def counted_classes(self):
        for c, part in classes(self):
            per_class.append(len(part))
            yield c, part

    def read_every_row(*a, **kw):
        raise AssertionError("the driver read every row of a set")

    monkeypatch.setattr(StagedSet, "classes", counted_classes)
    monkeypatch.setattr(raydd.methods.lgd, "read_distilled", read_every_row)
    monkeypatch.setattr(StagedSet, "take", counted_take)             # the driver only: actors import their own
    monkeypatch.setattr(StagedSet, "images", property(read_every_row))
    monkeypatch.setattr(StagedSet, "latents", property(read_every_row))

    class Tracker(NullTracker):
        def log_metrics(self, m: dict, step: int | None = None) -> None:
            metrics.update(m)

    cfg = dataclasses.replace(digits_cfg, ipc=2, data=dataclasses.replace(digits_cfg.data, max_train_per_class=10),
                              eval=dataclasses.replace(digits_cfg.eval, epochs=2, teacher_epochs=1))
    cfg.sampler = dataclasses.replace(cfg.sampler, steps=4)
    method = get_method("lgd")
    init_ray(cfg.compute)
    try:
        ctx = Context(cfg, load_real(cfg.data), spec, runner=RayRunner(cfg, tmp_path / "scratch"), tracker=Tracker(),
                      scratch=tmp_path / "scratch")
        ds = method.run(ctx, make_method_config(method.Config, {"seed_ipc": 1, "increment": 1, "kappa": 3}, "lgd"))
    finally:
        ray.shutdown()
    assert taken == []                          # the seed set's rows and the kept candidates stay in their files
    assert per_class and max(per_class) <= 2    # a class of D_1 (IPC 2) at most: written, then θ_0's loss on it
    assert isinstance(ds, StagedSet) and len(ds) == 20 and ds.slots.tolist() == [0, 1] * 10 and torch.isfinite(ds.scores[ds.slots == 1]).all()
    assert 0.0 <= metrics["lgd/theta_acc"] <= 1.0
