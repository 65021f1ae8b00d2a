"""IGDS: the variational estimator (training loop, checkpoint, estimates) and information guidance.

Tiny world: the conftest's random tiny DiT (8 sampling steps) and a VE trained for a handful of steps.
"""
import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from raydd.config import DataConfig
from raydd.context import Context, LocalRunner
from raydd.data import Split, load_real
from raydd.protocols import to_float
from raydd.methods import get_method
from raydd.methods.igds import Config, beta_for_ipc, ensure_ve, step_window
from raydd.objectives.information import (VEError, estimate, load_ve, make_guidance, per_sample_objective,
                                          ve_config, ve_train_loop)
from raydd.train_hooks import run_local

@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 shared cores: tiny ops run faster on one thread than contended on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_VE = dict(encoder="convnet_d2", width=16, embed_dim=32, steps=12, cls_steps=12, batch=32, queue_size=64)


@pytest.fixture(scope="module")
def ve_dir(tmp_path_factory):
    """A VE trained for a handful of steps on the digits train split (the real loop, run locally)."""
    from raydd.config import load_config

    torch.manual_seed(0)
    torch.set_num_threads(1)
    hooks = run_local(ve_train_loop, ve_config(load_config("digits", smoke=True).data, **TINY_VE))
    dst = tmp_path_factory.mktemp("ve") / "ve"
    shutil.copytree(hooks.checkpoint_dir, dst)
    return dst


class Recorder:
    def __init__(self):
        self.metrics, self.dicts = [], {}

    def log_metrics(self, m, step=None):
        self.metrics.append((dict(m), step))

    def log_images(self, name, grid):
        pass

    def log_dict(self, d, name):
        self.dicts[name] = d

    def keys(self):
        return {k for m, _ in self.metrics for k in m}


def make_ctx(cfg, spec, tracker=None):
    return Context(cfg, load_real(cfg.data), spec, runner=LocalRunner(cfg), tracker=tracker or Recorder())


def set_J(ve, ds, beta):
    """J = Î(X;Y) + β·Ĥ(X|Y) of a whole set (its per-sample form, averaged)."""
    with torch.no_grad():
        return float(per_sample_objective(ve, to_float(ds.images), ds.labels, beta).mean())


def guided(ctx, ve_dir, eta, beta, window=(0, 10**9)):
    return functools.partial(make_guidance, ve_path=str(ve_dir), beta=beta, scale=eta, window=window, mode="x0",
                             class_ids=ctx.data.backbone_class_ids())


# --------------------------------------------------------------------------------------------
def test_ve_checkpoint_round_trips_with_q_y(ve_dir):
    from safetensors.torch import load_file

    ve, meta = load_ve(ve_dir, num_classes=10, channels=1)
    q_saved = load_file(str(ve_dir / "ve.safetensors"))["q_y"]
    assert q_saved.shape == (10, 32) and torch.equal(ve.q_y, q_saved)
    assert torch.allclose(ve.q_y.sum(1), torch.ones(10), atol=1e-5)
    assert not torch.allclose(ve.q_y, torch.full_like(ve.q_y, 1 / 32))       # the class means, not the init
    assert not any(p.requires_grad for p in ve.parameters())
    by_file, _ = load_ve(ve_dir / "ve.safetensors")                          # the file itself works too
    assert torch.equal(by_file.q_y, ve.q_y)
    data = load_real(DataConfig(**meta["train_config"]["data"]))
    again = estimate(ve, data.val)                                           # restored VE = the trained one
    assert again["H_X_given_Y"] == pytest.approx(meta["estimates"]["val"]["H_X_given_Y"], rel=1e-4, abs=1e-6)
    assert again["I_XY"] == pytest.approx(meta["estimates"]["val"]["I_XY"], rel=1e-4, abs=1e-6)
    assert 0 <= again["H_X_given_Y"] <= math.log(32) and again["I_XY"] <= math.log(10) + 1e-6
    curve = json.loads((ve_dir / "curve.json").read_text())
    assert {r["phase"] for r in curve} == {1, 2} and curve[-1]["step"] == 24
    assert {"nce", "kl"} <= set(curve[0]) and "ce" in curve[-1]


def test_the_estimates_on_a_staged_set_come_from_the_actors_as_from_the_set_in_memory(ve_dir, tmp_path):
    """IGDS's estimates on its set: InformationTerms (the map UDF) reads the rows from the unit files the sampling
    actors wrote, and set_estimates on its terms equals estimate() on the images held in memory."""
    from raydd.generate import StagedSet, save_unit
    from raydd.objectives.information import InformationTerms, set_estimates

    images = torch.randint(0, 256, (30, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for u in range(3):                                                       # three unit files of 10 rows
        save_unit(tmp_path, {"unit": np.full(10, u), "class_idx": np.arange(10), "slot": np.full(10, u),
                             "score": np.zeros(10, np.float32), "image": images[10 * u:10 * u + 10].numpy()})
    staged = StagedSet.read(tmp_path, np.arange(3))
    udf = InformationTerms(str(ve_dir), num_classes=10, batch=4)
    terms = udf({"class_idx": staged.labels.numpy(), **staged.image_columns()})
    assert "image" not in terms and terms["p"].shape == (30, 10)
    got = set_estimates(*(torch.from_numpy(terms[k]) for k in ("p", "log_p_y", "kl")), staged.labels)
    want = estimate(load_ve(ve_dir, num_classes=10)[0], Split(staged.images, staged.labels))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6) and got["n"] == 30


def test_missing_or_wrong_ve_checkpoint_is_a_clear_error(digits_cfg, spec, ve_dir, tmp_path):
    run = get_method("igds").run
    ctx = make_ctx(digits_cfg, spec)
    with pytest.raises(FileNotFoundError, match="igds.ve_checkpoint=.*no variational estimator"):
        run(ctx, Config(ve_checkpoint=str(tmp_path / "nope")))
    bad = tmp_path / "bad"
    shutil.copytree(ve_dir, bad)
    meta = json.loads((bad / "ve.json").read_text())
    meta["arch"]["embed_dim"] = 48                                            # weights are 32-d
    (bad / "ve.json").write_text(json.dumps(meta))
    with pytest.raises(VEError, match="wrong shapes.*q_y"):
        run(ctx, Config(ve_checkpoint=str(bad)))
    with pytest.raises(VEError, match="num_classes=10, but this run has num_classes=3"):
        load_ve(ve_dir, num_classes=3)
    assert not (tmp_path / "cache" / "igds_ve").exists()                     # nothing was trained instead


def test_guided_samples_score_higher_on_J_than_unguided(digits_cfg, spec, ve_dir):
    ctx = make_ctx(digits_cfg, spec)
    ve, _ = load_ve(ve_dir)
    rows = ctx.rows(per_class=2)                                              # same noise for both runs
    plain = ctx.generate(rows)
    guide = ctx.generate(rows, guided(ctx, ve_dir, eta=1.5, beta=0.0))
    assert torch.equal(plain.labels, guide.labels) and torch.equal(plain.slots, guide.slots)
    assert set_J(ve, guide, 0.0) > set_J(ve, plain, 0.0) + 0.05
    assert torch.isfinite(guide.scores).all() and torch.isnan(plain.scores).all()


def test_larger_beta_gives_larger_contextual_information(digits_cfg, spec, ve_dir):
    ctx = make_ctx(digits_cfg, spec)
    ve, _ = load_ve(ve_dir)
    rows = ctx.rows(per_class=2)
    h = {b: estimate(ve, Split(ctx.generate(rows, guided(ctx, ve_dir, eta=0.3, beta=b)).images, torch.from_numpy(
        rows["class_idx"])))["H_X_given_Y"] for b in (0.0, 4.0)}
    assert h[4.0] > h[0.0]


def test_a_samples_objective_does_not_depend_on_its_batch_mates(digits_cfg, spec, ve_dir):
    """H(Ŷ) at the fixed uniform marginal: J of a sample alone equals its J next to other classes' samples
    (with the batch's p̄, a batch of one class pushed every sample toward the classes absent from it)."""
    ve, _ = load_ve(ve_dir)
    ds = make_ctx(digits_cfg, spec).data
    x, y = to_float(ds.train.x[:12]), ds.train.y[:12]
    same = y == y[0]
    with torch.no_grad():
        in_mixed = per_sample_objective(ve, x, y, 0.3)[same]
        alone = per_sample_objective(ve, x[same], y[same], 0.3)
        one = per_sample_objective(ve, x[:1], y[:1], 0.3)
    assert torch.allclose(in_mixed, alone, atol=1e-5) and torch.allclose(one, alone[:1], atol=1e-5)
    x_in = x[same][:1].clone().requires_grad_(True)                       # its gradient has no batch term either
    (g_alone,) = torch.autograd.grad(per_sample_objective(ve, x_in, y[same][:1], 0.3).sum(), x_in)
    x_mix = x.clone().requires_grad_(True)
    (g_mix,) = torch.autograd.grad(per_sample_objective(ve, x_mix, y, 0.3).sum(), x_mix)
    assert torch.allclose(g_mix[same][:1], g_alone, atol=1e-6)


def test_beta_rule_and_window():
    assert beta_for_ipc(1, 0.5) == 0.0
    assert 0.0 < beta_for_ipc(10, 0.5) < beta_for_ipc(20, 0.5) < 0.5
    assert beta_for_ipc(50, 0.5) == pytest.approx(0.5) and beta_for_ipc(200, 0.5) == 0.5
    assert step_window(0.0, 1.0, 50) == (0, 49) and step_window(0.2, 0.8, 11) == (2, 8)
    with pytest.raises(ValueError, match="window_lo"):
        step_window(0.8, 0.2, 50)


def test_method_trains_a_cached_ve_logs_and_distills(digits_cfg, spec, capsys):
    from raydd.tune_space import load_space

    tracker = Recorder()
    ctx = make_ctx(digits_cfg, spec, tracker)
    cfg = Config(ve_encoder="convnet_d2", ve_width=16, ve_embed_dim=32, ve_steps=6, ve_cls_steps=4, ve_batch=16)
    out = get_method("igds").run(ctx, cfg)
    assert "[raydd] training igds_ve (cached as " in capsys.readouterr().out   # the CLIs' log prefix
    assert len(out) == 10 * digits_cfg.ipc and out.images.dtype == torch.uint8
    assert torch.isfinite(out.scores).all()
    keys = tracker.keys()
    assert {"guidance_s_per_image", "ve/I_XY_distilled", "ve/H_X_given_Y_distilled", "ve/I_XY_real_train",
            "ve/H_X_given_Y_real_val", "ve/nce", "ve/kl", "ve/ce", "igds/beta"} <= keys
    assert "igds_ve.json" in tracker.dicts and tracker.dicts["igds.json"]["beta"] == beta_for_ipc(digits_cfg.ipc, 0.5)
    cached = list((digits_cfg.resolved_cache_dir() / "igds_ve").iterdir())
    assert len(cached) == 1 and ensure_ve(make_ctx(digits_cfg, spec), cfg) == cached[0]   # reused, not retrained
    space = load_space("igds")
    assert list(space.params)[:2] == ["igds.beta_max", "igds.eta"] and space.defaults()["igds.beta_max"] == 0.5


def test_sweep_prepare_trains_the_ve_that_trials_then_reuse(digits_cfg, spec):
    """A sweep calls the method's `prepare` once before its trials (raydd.distill.prepare_method): for
    IGDS it trains the VE into the cache, and a trial's run then finds it instead of training it."""
    import dataclasses

    from raydd.distill import prepare_method

    small = {"ve_encoder": "convnet_d2", "ve_width": 16, "ve_embed_dim": 32, "ve_steps": 6, "ve_cls_steps": 4,
             "ve_batch": 16}
    cfg = dataclasses.replace(digits_cfg, method="igds", methods={"igds": small})
    assert get_method("dit").prepare is None and get_method("igds").prepare is ensure_ve
    prepare_method(cfg, load_real(cfg.data), LocalRunner(cfg))
    (entry,) = (cfg.resolved_cache_dir() / "igds_ve").iterdir()
    assert (entry / ".complete").exists()

    class NoTraining(LocalRunner):
        def train(self, *a, **k):
            raise AssertionError("a trial trained the VE again")

    trial = Context(cfg, load_real(cfg.data), spec, runner=NoTraining(cfg), tracker=Recorder())
    assert ensure_ve(trial, Config(**small)) == entry


def test_guided_methods_warn_on_schedulers_their_scale_was_not_calibrated_for():
    """IGDS at dpm++ 15 steps on digits-latent over-guided (latent_std 3.4) with the ddpm-calibrated eta."""
    from raydd.config import load_config
    from raydd.distill import check_method

    for method in ("igds", "lgd"):
        with pytest.warns(UserWarning, match="calibrated with sampler.scheduler=ddpm"):
            check_method(load_config("digits-latent", ["sampler.scheduler=dpm++", "sampler.steps=15"], method=method))
