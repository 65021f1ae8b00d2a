"""CaO2: confidence selection, condition-aware latent optimisation (true timesteps, L_inf bound),
the method end to end on a tiny world (LocalRunner, random tiny DiT), selector checkpoints."""
import dataclasses

import numpy as np
import pytest
import torch

from raydd.config import ConfigError, SamplerConfig, make_method_config
from raydd.context import Context, LocalRunner
from raydd.data import load_real
from raydd.methods import get_method
from raydd.methods.cao2 import resolve, sample_pool, selector_path
from raydd.objectives.latent_opt import fixed_noise, latent_objective, optimize_latents
from raydd.diffusion import make_schedule
from raydd.selection import confidence_selection, load_selector, predict_probs


class RecordingTracker:
    def __init__(self):
        self.metrics, self.images = [], {}

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_images(self, name, grid):
        self.images[name] = grid

    def log_dict(self, d, name):
        pass

    def get(self, key):
        return [(float(m[key]), s) for m, s in self.metrics if key in m]


class RecordingBackbone(torch.nn.Module):
    """Wraps a Backbone and records the timesteps and conditions the DiT receives."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.vae = inner, inner.vae
        self.num_classes, self.latent_shape = inner.num_classes, inner.latent_shape
        self.ts, self.ys = [], []

    def forward(self, x_t, t, y):
        self.ts.append(torch.as_tensor(t).flatten().cpu().clone())
        self.ys.append(torch.as_tensor(y).flatten().cpu().clone())
        return self.inner(x_t, t, y)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU is shared: one intra-op thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module: the selector is trained once."""
    return str(tmp_path_factory.mktemp("cao2_cache"))


def run_cao2(cfg, spec, tracker=None, **fields):
    method = get_method("cao2")
    ctx = Context(cfg, load_real(cfg.data), spec, runner=LocalRunner(cfg), tracker=tracker or RecordingTracker())
    mcfg = make_method_config(method.Config, fields, "cao2")
    return method.run(ctx, mcfg), ctx, mcfg


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def synthetic_pool(C=4, n=8, seed=0, correct_frac=0.6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(n)
    logits = torch.randn(C * n, C, generator=g)
    right = torch.rand(C * n, generator=g) < correct_frac
    logits[right, labels[right]] += 3.0 * torch.rand(int(right.sum()), generator=g) + 0.5
    return torch.softmax(logits, 1), labels


@pytest.mark.parametrize("order", ["most", "least"])
def test_confidence_selection_keeps_correct_by_confidence(order):
    probs, labels = synthetic_pool()
    ipc = 3
    idx, scores = confidence_selection(probs, labels, ipc, order)
    correct = probs.argmax(1) == labels
    assert len(idx) == 4 * ipc and torch.equal(labels[idx], torch.arange(4).repeat_interleave(ipc))
    torch.testing.assert_close(scores, probs[torch.arange(len(labels)), labels])
    for c in range(4):
        cand = torch.nonzero(labels == c).flatten()
        kept = idx[labels[idx] == c]
        dropped = cand[~torch.isin(cand, kept)]
        ok = cand[correct[cand]]
        if len(ok) >= ipc:
            assert correct[kept].all()                            # all kept are correct
            dropped_ok = dropped[correct[dropped]]
            if len(dropped_ok):
                if order == "most":                               # the most confident correct ones
                    assert scores[kept].min() >= scores[dropped_ok].max()
                else:                                             # the least confident correct ones
                    assert scores[kept].max() <= scores[dropped_ok].min()
        else:                                                     # padding: every correct one, then the best wrong
            assert torch.isin(ok, kept).all()
            pad = kept[~correct[kept]]
            rest = dropped[~correct[dropped]]
            if len(rest):
                assert scores[pad].min() >= scores[rest].max()
    if order == "most":
        dropped_all = torch.ones(len(labels), dtype=torch.bool)
        dropped_all[idx] = False
        assert scores[idx].mean() > scores[dropped_all].mean()


def test_confidence_selection_pads_with_incorrect_only_when_needed():
    # class 0: 3 correct of 4; class 1: only 1 correct of 4 -> padded with the wrong ones closest to class 1
    probs = torch.tensor([[.9, .1], [.8, .2], [.6, .4], [.3, .7],
                          [.2, .8], [.55, .45], [.7, .3], [.9, .1]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    idx, scores = confidence_selection(probs, labels, 2, "most")
    assert idx.tolist() == [0, 1, 4, 5]
    idx, _ = confidence_selection(probs, labels, 2, "least")
    assert idx.tolist() == [2, 1, 4, 5]
    with pytest.raises(ValueError, match="allowed: most, least"):
        confidence_selection(probs, labels, 2, "biggest")
    with pytest.raises(ValueError, match="fewer than ipc"):
        confidence_selection(probs, labels, 5, "most")


def test_selection_through_the_method(digits_cfg, spec, shared_cache):
    """generator=random: the pool is real images, so the selector is right on most of them."""
    cfg = dataclasses.replace(digits_cfg, cache_dir=shared_cache)
    tracker = RecordingTracker()
    ds, ctx, mcfg = run_cao2(cfg, spec, tracker, generator="random", m=3, optimize=False)
    ipc = cfg.ipc
    assert len(ds) == 10 * ipc and ds.slots.tolist() == list(range(ipc)) * 10

    from raydd.generate import random_subset

    pool = random_subset(ctx.data.train, 3 * ipc, cfg.seed).sorted()
    model = load_selector(selector_path(ctx, resolve(ctx, mcfg)), "convnet_d3", 10, 1, 16)
    probs = predict_probs(model, pool.images)
    conf = probs[torch.arange(len(pool)), pool.labels]
    correct = probs.argmax(1) == pool.labels
    flat = pool.images.flatten(1)
    kept = torch.tensor([int(torch.nonzero((flat == img.flatten()).all(1))[0]) for img in ds.images])
    torch.testing.assert_close(ds.scores, conf[kept])
    dropped = torch.ones(len(pool), dtype=torch.bool)
    dropped[kept] = False
    assert correct.float().mean() > 0.5
    for c in range(10):
        k, cand = kept[ds.labels == c], torch.nonzero(pool.labels == c).flatten()
        if int(correct[cand].sum()) >= ipc:
            assert correct[k].all()
            d = cand[dropped[cand] & correct[cand]]
            if len(d):
                assert conf[k].min() >= conf[d].max()
    assert conf[kept].mean() > conf[dropped].mean()
    (frac, _), = tracker.get("cao2/pool_correct_frac")
    assert frac == pytest.approx(float(correct.float().mean()))
    ((ck, _),), ((cd, _),) = tracker.get("cao2/conf_kept_mean"), tracker.get("cao2/conf_dropped_mean")
    assert ck > cd


# --------------------------------------------------------------------------------------------
# Latent optimisation
# --------------------------------------------------------------------------------------------
def test_latent_optimisation_lowers_its_objective_within_the_linf_ball(backbone):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    y, seeds, eta = torch.arange(4), [11, 12, 13, 14], 0.1
    schedule = make_schedule(SamplerConfig())
    x_bar, curve = optimize_latents(backbone, x, y, seeds, schedule, iterations=30, lr=1e-2, lam=10.0,
                                    t_hat=500, eta=eta)
    assert curve.shape == (4, 30)
    assert (x_bar - x).abs().max() <= eta + 1e-6                  # projection: ||x_bar - x||_inf <= eta
    assert (x_bar - x).abs().max() > 0.5 * eta                    # ... and it did move

    eps = fixed_noise(seeds, (1, 16, 16))                          # the objective it optimises, over t in [1, T_hat]

    @torch.no_grad()
    def J(z):
        return torch.stack([latent_objective(backbone, z, y, torch.full((4,), t), eps, schedule, 10.0)
                            for t in range(1, 501, 10)]).mean(0)
    before, after = J(x), J(x_bar)
    assert (after < before).all(), (before, after)
    assert curve[:, -5:].mean() < curve[:, :5].mean()


def test_the_dit_receives_true_timesteps_in_1_to_T_hat(digits_cfg, spec, monkeypatch):
    """The reference code feeds a respaced index (<= 50) as the timestep; ours must be true t in [1, T_hat]."""
    rec = RecordingBackbone(spec.load("cpu"))
    monkeypatch.setattr(spec, "load", lambda device="cpu": rec)
    tracker = RecordingTracker()
    # no sampling (real pool, no selection): every DiT call is a latent-optimisation call
    ds, _, _ = run_cao2(digits_cfg, spec, tracker, generator="random", select=False, t_hat=0.25,
                        iterations=10, condition="null")
    t = torch.cat(rec.ts)
    assert len(t) >= 10 * len(ds)                                 # 10 iterations per image (+ the before/after grid)
    assert t.min() >= 1 and t.max() <= 250                       # T_hat = 0.25 * 1000 true timesteps
    assert t.max() > digits_cfg.sampler.train_timesteps // 20    # respaced indices (<= 50) would fail here
    assert len(t.unique()) > 50
    assert (torch.cat(rec.ys) == 10).all()                        # the null class
    curve = tracker.get("cao2/latent_loss")
    assert [s for _, s in curve] == list(range(10))


def test_the_null_condition_is_the_dits_own_null_class_not_the_number_of_data_classes(digits_cfg, spec, tmp_path,
                                                                                        monkeypatch):
    """DiT-XL/2 on a 10-class subset: its null class is 1000, not 10 (which is an ImageNet class). Here a DiT with
    12 classes on the 10 digit classes: c_hat = null must reach it as 12."""
    from raydd.backbone import save_transformer, tiny_dit

    torch.manual_seed(0)
    save_transformer(tiny_dit(num_classes=12, channels=1, image_size=16, hidden_size=32, depth=2, heads=2,
                              patch_size=4), str(tmp_path / "dit12"))
    spec12 = dataclasses.replace(spec, cfg=dataclasses.replace(spec.cfg, source=str(tmp_path / "dit12")))
    rec = RecordingBackbone(spec12.load("cpu"))
    assert rec.num_classes == 12
    monkeypatch.setattr(spec12, "load", lambda device="cpu": rec)
    run_cao2(digits_cfg, spec12, generator="random", select=False, iterations=2, condition="null")
    assert (torch.cat(rec.ys) == 12).all()


def test_cao2_end_to_end_on_a_dit_pool(digits_cfg, spec, shared_cache):
    cfg = dataclasses.replace(digits_cfg, cache_dir=shared_cache)
    tracker = RecordingTracker()
    ds, ctx, mcfg = run_cao2(cfg, spec, tracker, iterations=4, lr=1e-2)
    r = resolve(ctx, mcfg)
    assert (r.m, r.t_hat, r.condition, r.order, r.eta) == (2, 0.5, "true", "most", pytest.approx(0.04))
    assert len(ds) == 10 * cfg.ipc and ds.latents.dtype == torch.float16 and ds.images.dtype == torch.uint8
    assert torch.isfinite(ds.scores).all()
    assert [s for _, s in tracker.get("cao2/latent_loss")] == [0, 1, 2, 3]
    (((before, _),), ((after, _),)) = tracker.get("cao2/objective_before"), tracker.get("cao2/objective_after")
    assert np.isfinite(before) and np.isfinite(after)
    grid = tracker.images["cao2_before_after"]
    assert grid.ndim == 3 and grid.shape[2] == 3
    # the optimised latents stay within eta of the kept pool latents
    pool = sample_pool(ctx, mcfg, 2 * cfg.ipc)
    moved = [(ds.latents[i].float() - pool.latents.float()).flatten(1).abs().amax(1).min() for i in range(len(ds))]
    assert max(moved) <= 0.04 + 2e-3                              # fp16 storage rounding


# --------------------------------------------------------------------------------------------
# Configuration, selector checkpoints, search space
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale, want", [(2.7, 2.7), (0.0, 4.0)])
def test_pool_is_sampled_at_the_papers_cfg_scale(digits_cfg, spec, monkeypatch, scale, want):
    """The pool's CFG is cao2.cfg_scale (paper: 2.7), not the dit baseline's sampler.cfg_scale (0 = use it), as the
    sampler receives it: the runner used to sample with the run's sampler, whatever the method's context said."""
    import raydd.context

    seen = []
    generate_local = raydd.context.generate_local
    monkeypatch.setattr(raydd.context, "generate_local", lambda spec, sampler, *a, **k: seen.append(sampler.cfg_scale)
                        or generate_local(spec, sampler, *a, **k))
    cfg = dataclasses.replace(digits_cfg, ipc=1, sampler=dataclasses.replace(digits_cfg.sampler, steps=3))
    assert cfg.sampler.cfg_scale == 4.0
    run_cao2(cfg, spec, select=False, optimize=False, cfg_scale=scale)
    assert seen == [want]


def test_task_dependent_defaults_and_bad_values(digits_cfg, spec):
    method = get_method("cao2")
    from types import SimpleNamespace

    from raydd.data import subset_classes

    ctx = Context(digits_cfg, SimpleNamespace(class_names=[str(i) for i in range(10)]), spec,
                  runner=LocalRunner(digits_cfg))
    fifty = dataclasses.replace(digits_cfg, ipc=50)
    # hard from the classes, whatever the class set is called: two Woof wnids given as a comma list
    woof = dataclasses.replace(ctx, cfg=fifty, data=SimpleNamespace(class_names=subset_classes("imagewoof")[:2]))
    r = resolve(woof, method.Config())
    assert (r.task, r.m, r.t_hat, r.condition, r.order) == ("hard", 4, 0.125, "null", "least")
    nette = dataclasses.replace(woof, data=SimpleNamespace(class_names=subset_classes("imagenette")))
    assert resolve(nette, method.Config()).task == "easy"
    r = resolve(ctx, make_method_config(method.Config, {"order": "least", "condition": "null", "m": 3}, "cao2"))
    assert (r.task, r.m, r.t_hat, r.condition, r.order) == ("easy", 3, 0.5, "null", "least")
    with pytest.raises(ConfigError, match="allowed: auto, true, null"):
        resolve(ctx, make_method_config(method.Config, {"condition": "maybe"}, "cao2"))
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        resolve(ctx, make_method_config(method.Config, {"generator": "nosuch"}, "cao2"))


def test_selector_checkpoint_missing_or_wrong_shape_fails_before_sampling(digits_cfg, spec, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from raydd.students import create_student

    monkeypatch.setattr(spec, "load", lambda device="cpu": pytest.fail("sampled before checking the selector"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_cao2(digits_cfg, spec, selector=str(tmp_path / "nope.safetensors"))
    wrong = tmp_path / "five_classes.safetensors"
    save_file(create_student("convnet_d3", num_classes=5, in_chans=1, image_size=16).state_dict(), str(wrong))
    with pytest.raises(ValueError, match="does not fit a convnet_d3 with 10 classes"):
        run_cao2(digits_cfg, spec, selector=str(wrong))
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        run_cao2(digits_cfg, spec, selector=str(junk))


def test_search_space_loads_with_paper_defaults_first():
    from raydd.tune_space import load_space

    d = load_space("cao2").defaults()
    assert d == {"cao2.m": 2, "cao2.lam": 10.0, "cao2.lr": 6e-4, "cao2.iterations": 100, "cao2.t_hat": 0.5,
                 "cao2.condition": "true", "cao2.order": "auto", "cao2.cfg_scale": 2.7}


def test_subset_probs_keeps_the_1000_way_argmax_and_confidence():
    from raydd.selection import subset_probs

    logits = torch.full((3, 1000), -5.0)
    logits[0, 217], logits[1, 5], logits[2, 482] = 4.0, 6.0, 3.0      # run classes [0, 217, 482]
    logits[2, 7] = 2.0
    p = subset_probs(logits, [0, 217, 482])
    full = torch.softmax(logits, 1)
    assert p.shape == (3, 4)
    assert p.argmax(1).tolist() == [1, 3, 2]                          # row 1's argmax is class 5: "other"
    torch.testing.assert_close(p[:, :3], full[:, [0, 217, 482]])
    idx, conf = confidence_selection(p, torch.tensor([1, 1, 2]), 1)
    assert conf.tolist() == pytest.approx(full[[0, 1, 2], [217, 217, 482]].tolist())


def test_timm_imagenet_selector_loads_from_the_local_hf_cache(tmp_path):
    """cao2.selector=timm:resnet18.tv_in1k: timm's own loader reads weights saved where the Hugging Face cache
    keeps them (random here: no network), and the scores equal the 1000-way model's on timm's eval transform."""
    import json
    import os
    import subprocess
    import sys

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000).eval()
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--timm--resnet18.tv_in1k"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    code = ("import json, sys, numpy as np; from raydd.selection import SelectorScores; "
            "s = SelectorScores('timm:resnet18.tv_in1k', '', 3, 3, 64, class_ids=[0, 217, 482]); "
            f"print(json.dumps(s({{'image': np.load(r'{tmp_path / 'images.npy'}')}})['probs'].tolist()))")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    x = torch.nn.functional.interpolate(torch.from_numpy(images).float() / 255, size=(256, 256), mode="bilinear",
                                        antialias=True, align_corners=False)[..., 16:240, 16:240]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        from raydd.selection import subset_probs
        want = subset_probs(model((x - mean) / std), [0, 217, 482])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    miss = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert miss.returncode != 0 and "local Hugging Face cache" in miss.stderr


def test_timm_selector_on_non_imagenet_classes_is_a_clear_error(digits_cfg, spec):
    with pytest.raises(ConfigError, match="needs ImageNet classes"):
        run_cao2(digits_cfg, spec, selector="timm:resnet18.tv_in1k", optimize=False)


@pytest.mark.slow
@pytest.mark.ray
def test_on_ray_the_optimised_set_stays_in_the_actors_unit_files_and_equals_the_local_run(digits_cfg, spec,
                                                                                         shared_cache, tmp_path,
                                                                                         monkeypatch):
    """#20 item 3/5: on the actor pool the latent optimisation reads the kept rows from their unit files and writes
    the optimised set to its own stage; the driver sends and receives no image or latent and reads only the
    before/after grid's rows: the same set as in process."""
    import ray

    import raydd.distributed.runner as runner_mod
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.generate import HEAVY, StagedSet

    cfg = dataclasses.replace(digits_cfg, cache_dir=shared_cache, ipc=1)
    cfg.sampler = dataclasses.replace(cfg.sampler, steps=2)
    fields = dict(iterations=3, lr=1e-2)
    local, _, _ = run_cao2(cfg, spec, **fields)
    sent, received, taken = [], [], []
    map_ray, take = runner_mod.map_ray, StagedSet.take

    def recording_map_ray(udf, kwargs, columns, *args, **kw):
        out = map_ray(udf, kwargs, columns, *args, **kw)
        if udf.__name__ == "LatentOptBatches":
            sent.append(set(columns)), received.append(set(out))
        return out

    monkeypatch.setattr(runner_mod, "map_ray", recording_map_ray)
    monkeypatch.setattr(StagedSet, "take", lambda self, idx: taken.append(len(idx)) or take(self, idx))
    init_ray(cfg.compute)
    try:
        ctx = Context(cfg, load_real(cfg.data), spec, runner=RayRunner(cfg, tmp_path), tracker=RecordingTracker(),
                      scratch=tmp_path)
        out = get_method("cao2").run(ctx, make_method_config(get_method("cao2").Config, fields, "cao2"))
    finally:
        ray.shutdown()
    assert isinstance(out, StagedSet) and len(sent) == 1
    assert not sent[0] & set(HEAVY) and not received[0] & set(HEAVY)       # pointers in, light columns out
    assert taken == [10, 10]                                               # the grid's rows: kept, then optimised
    assert torch.equal(out.labels, local.labels) and torch.equal(out.slots, local.slots)
    assert torch.equal(out.images, local.images) and torch.equal(out.latents, local.latents)
    assert torch.equal(out.scores, local.scores)
