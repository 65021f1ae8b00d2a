"""rsm_cgs (seed 003): the RSM loss term, the CGS maths (DPP log-det, mean matching), the sampler's post_step
hook, the method end to end on the tiny world, and 1-vs-2-actor determinism with whole classes as units."""
import dataclasses
import math
from functools import partial

import numpy as np
import pytest
import torch

from raydd.config import ComputeConfig, ConfigError
from raydd.context import Context, LocalRunner
from raydd.data import load_real
from raydd.methods import get_method
from raydd.objectives.dpp import (CGS, cgs_direction, cgs_post_step, class_means, dm_loss, dpp_loss, mean_distance,
                                  mean_pairwise_cosine)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest (and immune to a busy shared CPU); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class RecordingTracker:
    def __init__(self):
        self.metrics: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_images(self, name, grid):
        pass

    def log_dict(self, d, name):
        pass

    def per_class(self, key):
        return {step: m[key] for m, step in self.metrics if key in m and step is not None}


def make_ctx(cfg, spec, tracker=None):
    return Context(cfg, load_real(cfg.data), spec, runner=LocalRunner(cfg), tracker=tracker or RecordingTracker())


def run_method(cfg, spec, **fields):
    method = get_method("rsm_cgs")
    tracker = RecordingTracker()
    out = method.run(make_ctx(cfg, spec, tracker), method.Config(**fields))
    return out, tracker


# ---------------------------------------------------------------------------------------------- maths
def test_logdet_is_finite_for_duplicates_and_zero_vectors():
    z = torch.randn(1, 1, 4, 4).repeat(5, 1, 1, 1)                     # 5 identical samples
    eps = 1e-3
    loss = dpp_loss(z, eps)
    assert torch.isfinite(loss)
    assert math.isclose(float(loss), -(4 * math.log(eps) + math.log(5 + eps)), rel_tol=1e-9)
    g = cgs_direction(z, torch.zeros(1, 4, 4), eta_dpp=1.0, eta_dm=1.0, eps=eps)
    assert torch.isfinite(g).all()
    near = z + 1e-7 * torch.randn_like(z)                               # near-duplicates: large but finite
    assert torch.isfinite(cgs_direction(near, torch.zeros(1, 4, 4), 1.0, 0.0, 1e-6)).all()
    assert torch.isfinite(dpp_loss(torch.zeros(3, 1, 4, 4), eps))       # zero latents: cos = 0, K = 0
    with pytest.raises(ValueError, match="eps"):
        dpp_loss(z, 0.0)


def test_dpp_step_decorrelates_and_dm_step_moves_the_mean():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 8, 8, generator=g)
    z = base + 0.3 * torch.randn(6, 1, 8, 8, generator=g)              # a collapsed set
    target = torch.randn(1, 8, 8, generator=g)
    stepped = z - cgs_direction(z, target, eta_dpp=0.005, eta_dm=0.0, eps=1e-3)
    assert dpp_loss(stepped) < dpp_loss(z) and mean_pairwise_cosine(stepped) < mean_pairwise_cosine(z)
    stepped = z - cgs_direction(z, target, eta_dpp=0.0, eta_dm=0.5, eps=1e-3)
    assert dm_loss(stepped, target) < dm_loss(z, target)
    assert mean_distance(stepped, target) < mean_distance(z, target)
    single = z[:1]                                                      # IPC 1: the DPP term is constant
    assert torch.equal(cgs_direction(single, target, 5.0, 0.0, 1e-3), torch.zeros_like(single))


@pytest.mark.parametrize("c", [0.1, 8.0])
def test_cgs_steps_are_scale_free(c):
    """Scaling the latents (and the target) by c scales the update by c: the same eta_dpp / eta_dm do the
    same relative thing on [-1, 1] pixels and on latents of any norm (an absolute DPP step scales as 1/c)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 4, 8, 8, generator=g)
    target = torch.randn(4, 8, 8, generator=g)
    for eta_dpp, eta_dm in ((0.01, 0.0), (0.0, 0.05), (0.01, 0.05)):
        torch.testing.assert_close(cgs_direction(c * z, c * target, eta_dpp, eta_dm, 1e-3),
                                   c * cgs_direction(z, target, eta_dpp, eta_dm, 1e-3), rtol=1e-4, atol=1e-6)


def test_cgs_post_step_updates_each_class_separately():
    mu = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    cgs = CGS(mu, class_ids=[7, 3], eta_dpp=0.0, eta_dm=0.5)
    x = torch.zeros(4, 1, 2, 2)
    y = torch.tensor([7, 7, 3, 3])
    out = cgs(0, x, x, y, 1.0)                                          # last step: abar_prev = 1, target = mu
    assert (out[:2] < 0).all() and (out[2:] > 0).all()                  # pulled toward their own class mean
    np.testing.assert_allclose(out[2:] / cgs(0, x, x, y, 0.25)[2:], 2.0)  # target sqrt(abar_prev) mu
    x0_mode = CGS(mu, class_ids=[7, 3], eta_dpp=0.0, eta_dm=0.5, on="x0")(2, x, x, y, 0.5)
    assert (x0_mode[:2] < 0).all() and (x0_mode[2:] > 0).all()          # gradient on x0_hat, applied to x_prev
    with pytest.raises(ValueError, match="allowed"):
        CGS(mu, [7, 3], 0.0, 0.5, on="bogus")


def test_class_means_add_up_a_class_split_over_batches():
    parts = {"class_idx": np.array([1, 0, 1]), "sum": np.array([[2.0], [3.0], [4.0]]), "count": np.array([1, 3, 2])}
    np.testing.assert_allclose(class_means(parts, 2), [[1.0], [2.0]])
    with pytest.raises(ValueError, match="class"):
        class_means(parts, 3)


# ---------------------------------------------------------------------------------------------- RSM
def test_rsm_term_registered_changes_loss_and_checkpoint_loads(digits_cfg, spec):
    from raydd.backbone import load_transformer
    from raydd.finetune import LOSS_TERMS, finetune_config, finetune_loop
    from raydd.methods.rsm_cgs import rsm_finetune
    from raydd.generate import BackboneSpec, generate_local, make_rows
    from raydd.train_hooks import run_local

    assert "rsm" in LOSS_TERMS
    cfg = digits_cfg
    conf = partial(finetune_config, cfg.backbone.source, cfg.data, cfg.sampler, steps=2, batch=8, lr=1e-2,
                   peft="difffit")
    with_l1, without = conf(terms={"rsm": 1.0}), conf(terms={"rsm": 0.0})
    assert with_l1["term_modules"] == ["raydd.objectives.sparsity"]    # a Ray Train worker imports it itself
    a, b = run_local(finetune_loop, with_l1), run_local(finetune_loop, without)
    assert a.reports[0]["rsm"] > 0 and a.reports[0]["rsm"] == pytest.approx(b.reports[0]["rsm"])  # same batch
    assert a.reports[0]["loss"] > b.reports[0]["loss"]                  # lambda * ||x0_hat||_1 is added
    pa = dict(load_transformer(f"{a.checkpoint_dir}/transformer").named_parameters())
    pb = dict(load_transformer(f"{b.checkpoint_dir}/transformer").named_parameters())
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)               # the L1 term changed the update

    # through the method's own path: ctx.train_cached -> <dir>/transformer, a backbone for any method
    ctx = make_ctx(cfg, spec)
    ft_spec = rsm_finetune(ctx, get_method("rsm_cgs").Config(ft_steps=2, ft_batch=8))
    assert ft_spec.cfg.source.endswith("/transformer") and ft_spec.cfg.source.startswith(str(cfg.resolved_cache_dir()))
    other = BackboneSpec(dataclasses.replace(cfg.backbone, source=ft_spec.cfg.source), 10, 1, 16, list(range(10)))
    s = generate_local(other, dataclasses.replace(cfg.sampler, steps=2), make_rows(10, 1, 0, 10))
    assert len(s) == 10 and s.images.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- method
@pytest.fixture()
def world(digits_cfg):
    """3 digit classes x IPC 4, 5 sampling steps on the random tiny DiT."""
    cfg = dataclasses.replace(digits_cfg, ipc=4)
    cfg.data = dataclasses.replace(cfg.data, classes="0,1,2")
    cfg.sampler = dataclasses.replace(cfg.sampler, steps=5, cfg_scale=2.0)
    return cfg


def test_dpp_guidance_lowers_pairwise_cosine(world, spec):
    out, tr = run_method(world, spec, rsm=False, eta_dpp=0.01, eta_dm=0.0)
    before, after = tr.per_class("cgs/cos_before"), tr.per_class("cgs/cos_after")
    assert len(out) == 12 and sorted(after) == [0, 1, 2]
    assert all(after[c] < before[c] for c in after), (before, after)
    means = {k: v for m, s in tr.metrics if s is None for k, v in m.items()}
    assert means["cgs/mean_cos_after"] < means["cgs/mean_cos_before"]


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm++", "unipc"])
def test_mean_matching_lowers_distance_to_real_class_mean(world, spec, scheduler):
    """Also on the multistep solvers (UniPC's corrector, which would rebuild x from before the move, is off)."""
    world.sampler = dataclasses.replace(world.sampler, scheduler=scheduler)
    out, tr = run_method(world, spec, rsm=False, eta_dpp=0.0, eta_dm=0.5)
    before, after = tr.per_class("cgs/dist_before"), tr.per_class("cgs/dist_after")
    assert all(after[c] < before[c] for c in after), (before, after)


def test_full_method_and_switches(world, spec):
    both, _ = run_method(world, spec, ft_steps=2, ft_batch=8, compare_unguided=False)
    assert len(both) == 12 and torch.equal(both.labels, torch.arange(3).repeat_interleave(4))
    rsm_only, tr = run_method(world, spec, cgs=False, ft_steps=2, ft_batch=8)
    assert not torch.equal(both.latents, rsm_only.latents) and tr.metrics == []
    from raydd.methods.rsm_cgs import check

    with pytest.raises(ConfigError, match="allowed: difffit, full"):
        check(get_method("rsm_cgs").Config(peft="lora"))


# ---------------------------------------------------------------------------------------------- sharding
@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raydd.distributed.cluster import init_ray

    init_ray(ComputeConfig(num_cpus=2))
    yield
    ray.shutdown()


def test_cgs_one_and_two_actors_bit_identical(ray_local, digits_cfg, spec, tmp_path):
    from raydd.distributed.data import generate_ray
    from raydd.distributed.runner import RayRunner
    from raydd.generate import generate_local, make_rows
    from raydd.methods.rsm_cgs import Config, real_class_means

    # mu_c on the actor pool (ctx.map) equals the in-process one: the mean of each class's real images
    cfg = dataclasses.replace(digits_cfg, compute=ComputeConfig(num_actors=2))
    data = load_real(cfg.data)
    mu = real_class_means(Context(cfg, data, spec, runner=RayRunner(cfg, tmp_path)), Config())  # [10, 1, 16, 16]
    assert mu.shape == (10, 1, 16, 16)
    np.testing.assert_allclose(mu, real_class_means(make_ctx(cfg, spec), Config()), atol=1e-6)

    sampler = dataclasses.replace(digits_cfg.sampler, steps=3)
    rows = make_rows(10, 3, run_seed=5, unit_size=3, by_class=True, classes=[4, 9])  # 2 classes = 2 units
    factory = partial(cgs_post_step, mu=mu, class_ids=list(range(10)), eta_dpp=1.0, eta_dm=0.2,
                      eps=1e-3, on="z_t")
    one = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=1), post_step_factory=factory)
    two = generate_ray(spec, sampler, rows, ComputeConfig(num_actors=2), post_step_factory=factory)
    assert torch.equal(one.labels, torch.tensor([4, 9]).repeat_interleave(3))
    assert torch.equal(one.latents, two.latents) and torch.equal(one.images, two.images)
    assert not torch.equal(one.latents, generate_local(spec, sampler, rows).latents)   # the update did act
