"""The schedulers (diffusers', in DDPM's variance-preserving terms) against an independent float64 reference;
CFG; the guidance helper."""
import numpy as np
import pytest
import torch

from raydd.config import ConfigError, SamplerConfig, load_config
from raydd.diffusion import make_schedule
from raydd.sampling import (SCHEDULERS, Guidance, GuidanceError, NoiseStreams, Steps, predict_eps, sample,
                            sample_seed)


def reference_schedule(T=1000, S=50, b0=1e-4, b1=0.02):
    """Written from the DDPM / improved-DDPM papers, float64, no shared code."""
    betas = np.linspace(b0, b1, T, dtype=np.float64)
    abar_full = np.cumprod(1 - betas)
    ts = np.unique(np.round(np.arange(S) * (T - 1) / (S - 1)).astype(int))
    abar = abar_full[ts]
    prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1 - abar / prev
    var = beta * (1 - prev) / (1 - abar)
    return ts, abar, prev, beta, var


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_ddpm_and_ddim_take_dits_respaced_grid(name):
    ts, abar, prev, beta, var = reference_schedule()
    s = Steps(SamplerConfig(scheduler=name), learned_sigma=True)
    assert s.t.tolist() == ts.tolist() and ts[0] == 0 and ts[-1] == 999 and len(ts) == 50
    np.testing.assert_allclose(s.abar.numpy(), abar, rtol=1e-5)          # diffusers keeps abar in float32
    np.testing.assert_allclose(s.abar_prev.numpy(), prev, rtol=1e-5)
    np.testing.assert_allclose(s.beta.numpy(), beta, rtol=1e-3)         # a ratio of float32 abars


@pytest.mark.parametrize("i,v", [(49, None), (30, "rand"), (7, -1.0), (1, 1.0), (0, "rand")])
def test_ddpm_step_matches_float64_reference(i, v):
    """diffusers' DDPMScheduler (learned-range variance, DiT's grid) = the improved-DDPM step, incl. the noise
    drawn from each sample's own stream."""
    ts, abar, prev, beta, var = reference_schedule()
    g = torch.Generator().manual_seed(i)
    x, eps, vv = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    vv = None if v is None else vv.clamp(-1, 1) if v == "rand" else torch.full_like(vv, v)
    seeds = [10 + i, 20 + i]
    x_prev = Steps(SamplerConfig(), learned_sigma=vv is not None).step(
        eps, i, x, vv, [torch.Generator().manual_seed(k) for k in seeds])
    z = NoiseStreams(seeds, (3, 4, 4), "cpu").next().double().numpy()
    X, E = x.double().numpy(), eps.double().numpy()
    X0 = (X - np.sqrt(1 - abar[i]) * E) / np.sqrt(abar[i])
    mean = (beta[i] * np.sqrt(prev[i]) / (1 - abar[i])) * X0 + ((1 - prev[i]) * np.sqrt(1 - beta[i]) / (1 - abar[i])) * X
    min_log = np.log(var[1]) if i == 0 else np.log(var[i])
    log_var = min_log if vv is None else (vv.double().numpy() + 1) / 2 * np.log(beta[i]) + (1 - (vv.double().numpy() + 1) / 2) * min_log
    expect = mean if i == 0 else mean + np.exp(0.5 * log_var) * z
    np.testing.assert_allclose(x_prev.double().numpy(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("i", [49, 20, 0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_matches_float64_reference(i, clip):
    ts, abar, prev, beta, var = reference_schedule()
    g = torch.Generator().manual_seed(100 + i)
    x, eps = torch.randn(2, 1, 4, 4, generator=g) * 2, torch.randn(2, 1, 4, 4, generator=g)
    x_prev = Steps(SamplerConfig(scheduler="ddim", clip_x0=clip), learned_sigma=False).step(eps, i, x, None, [])
    X, E = x.double().numpy(), eps.double().numpy()
    X0 = (X - np.sqrt(1 - abar[i]) * E) / np.sqrt(abar[i])
    if clip:   # x0_hat clipped, eps re-derived from it
        X0 = X0.clip(-1, 1)
        E = (X - np.sqrt(abar[i]) * X0) / np.sqrt(1 - abar[i])
    np.testing.assert_allclose(x_prev.double().numpy(), np.sqrt(prev[i]) * X0 + np.sqrt(1 - prev[i]) * E,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_lands_on_x0_for_the_exact_eps(name):
    """x_T built from a known x0 and eps; a model that returns that eps at every step must bring every
    scheduler (DiT's 50 ddpm steps, 10 of a solver) back to x0 -- also through Euler's sigma-scaled space."""
    steps = 50 if name == "ddpm" else 10
    s = Steps(SamplerConfig(scheduler=name, steps=steps), learned_sigma=False)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 4, 8, 8, generator=gen) * 2 - 1, torch.randn(2, 4, 8, 8, generator=gen)
    top = len(s) - 1
    x = s.abar[top].sqrt().float() * x0 + (1 - s.abar[top]).sqrt().float() * eps
    for i in reversed(range(len(s))):
        # the exact eps of x under the (deterministic) path x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        e = (x - s.abar[i].sqrt().float() * x0) / (1 - s.abar[i]).sqrt().float()
        x = s.step(e, i, x, None, [torch.Generator().manual_seed(k) for k in (1, 2)])
    tol = 0.5 if name == "ddpm" else 1e-3      # ddpm adds fresh noise on the way; the others are deterministic
    assert (x - x0).abs().mean() < tol, (name, (x - x0).abs().mean())


@pytest.mark.parametrize("name", ["ddpm", "dpm++sde"])
def test_stochastic_schedulers_draw_each_samples_noise_from_its_own_stream(backbone, name):
    """A sample is a function of its seed alone, not of its batch-mates (determinism across actor counts)."""
    cfg = SamplerConfig(scheduler=name, steps=6, cfg_scale=2.0, clip_x0=True)
    y, seeds = torch.tensor([1, 2, 3]), [sample_seed(0, k, 0) for k in range(3)]
    batch = sample(backbone, y, seeds, cfg)["z0"]
    alone = sample(backbone, y[1:2], seeds[1:2], cfg)["z0"]
    other = sample(backbone, y[1:2], [sample_seed(1, 1, 0)], cfg)["z0"]
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other[0], batch[1], atol=1e-3)              # the noise matters: it is stochastic


def test_euler_with_clip_x0_is_rejected_before_anything_runs():
    with pytest.raises(ConfigError, match="clip_x0.*allowed with it: ddpm, ddim, dpm\\+\\+, dpm\\+\\+sde, unipc"):
        load_config("digits", ["sampler.scheduler=euler"])
    assert load_config("digits-latent", ["sampler.scheduler=euler"]).sampler.scheduler == "euler"


class FakeBackbone(torch.nn.Module):
    """eps = y-dependent constant; null class 10 -> zeros. 4 channels so the CFG quirk is visible."""
    num_classes = 10
    latent_shape = (4, 2, 2)

    def forward(self, x, t, y):
        eps = (y.float() + 1).view(-1, 1, 1, 1).expand(-1, 4, 2, 2).clone()
        eps[y == 10] = 0.0
        return eps, torch.zeros_like(eps)


def test_cfg_in_one_forward_and_quirk():
    x, t, y = torch.zeros(2, 4, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([1, 3])
    eps, var = predict_eps(FakeBackbone(), x, t, y, cfg_scale=4.0)
    assert torch.allclose(eps[:, 0, 0, 0], torch.tensor([8.0, 16.0]))  # 0 + 4 * (c - 0)
    eps_q, _ = predict_eps(FakeBackbone(), x, t, y, cfg_scale=4.0, first3_quirk=True)
    assert torch.allclose(eps_q[:, :3], eps[:, :3]) and torch.allclose(eps_q[:, 3, 0, 0], torch.tensor([2.0, 4.0]))
    assert var.shape == (2, 4, 2, 2)


def test_noise_is_a_function_of_the_sample_only():
    a = NoiseStreams([sample_seed(0, 3, 1), sample_seed(0, 5, 2)], (1, 4, 4), "cpu")
    b = NoiseStreams([sample_seed(0, 5, 2)], (1, 4, 4), "cpu")
    assert torch.equal(a.next()[1], b.next()[0]) and torch.equal(a.next()[1], b.next()[0])
    assert sample_seed(0, 3, 1) != sample_seed(0, 3, 2) != sample_seed(1, 3, 1)


def _target_objective(x0, t, y, state):
    return -((x0 - state) ** 2).flatten(1).mean(1)   # J = -||x0 - target||^2, maximised at target


@pytest.mark.parametrize("mode", ["full", "x0"])
def test_guidance_raises_the_objective(backbone, mode):
    """Same noise, same labels: guided samples end closer to the target (higher J) than unguided."""
    cfg = SamplerConfig(steps=10, cfg_scale=2.0, clip_x0=True)
    y, seeds = torch.arange(6) % 10, [sample_seed(0, k, 0) for k in range(6)]
    target = torch.full((1, 1, 16, 16), 0.7)
    plain = sample(backbone, y, seeds, cfg)["z0"]
    guide = Guidance(objective=_target_objective, scale=1.0, mode=mode, state=target)
    out = sample(backbone, y, seeds, cfg, guidance=guide)
    j_plain, j_guided = _target_objective(plain, None, y, target), _target_objective(out["z0"], None, y, target)
    assert (j_guided > j_plain).all(), (j_guided, j_plain)
    assert torch.isfinite(out["J"]).all()


@pytest.mark.parametrize("norm", ["variance", "eps"])
def test_guidance_step_size_follows_the_norm(backbone, norm):
    """||eps_tilde - eps_hat|| = scale * size_t * ||eps_hat|| per sample, whatever the objective's scale:
    size_t = beta_t ("variance", IGD's code) or sqrt(1 - abar_t) ("eps", the LGD summary)."""
    from raydd.sampling import guided_eps

    cfg = SamplerConfig(steps=10, cfg_scale=2.0, guidance_norm=norm)
    s = Steps(cfg, learned_sigma=True)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y, i = torch.tensor([1, 4, 7]), 6
    t = torch.full((3,), int(s.t[i]))
    huge = Guidance(objective=lambda x0, t, y, st: 1e6 * _target_objective(x0, t, y, st), scale=15.0,
                    state=torch.zeros(1))
    eps_tilde, _, _ = guided_eps(backbone, huge, x, t, y, float(s.abar[i]), float(s.beta[i]), cfg)
    eps_hat, _ = predict_eps(backbone, x, t, y, cfg.cfg_scale)
    size = float(s.beta[i]) if norm == "variance" else np.sqrt(1 - float(s.abar[i]))
    step = (eps_tilde - eps_hat).flatten(1).norm(dim=1) / eps_hat.flatten(1).norm(dim=1)
    np.testing.assert_allclose(step.numpy(), 15.0 * size, rtol=1e-4)


def test_guidance_beta_is_the_50_step_grids_beta_at_any_step_count():
    """At 50 ddpm/ddim steps it is the step's own beta (the calibration grid, so DDPM-50 results do not change);
    at other step counts it is that grid's beta at the step's t, not the larger beta of a coarser step."""
    ts, abar, prev, beta, var = reference_schedule()
    for name in ("ddpm", "ddim"):
        np.testing.assert_allclose(Steps(SamplerConfig(scheduler=name), True).guidance_beta.numpy(), beta, rtol=1e-3)
    s = Steps(SamplerConfig(scheduler="dpm++", steps=15), True)
    np.testing.assert_allclose(s.guidance_beta.numpy(), np.interp(s.t.numpy(), ts, beta), rtol=1e-3)
    assert (s.guidance_beta[1:] < 0.6 * s.beta[1:]).all()               # a 15-step grid's own beta is 2-2.7x larger


def test_guidance_pushes_as_far_with_any_solver_and_step_count(backbone):
    """The guided eps field depends on t alone (Steps.guidance_beta), so deterministic solvers at 10-50 steps
    integrate the same guided trajectory: J = mean(x0) pushes the samples equally far (the step's own beta
    pushed 10 dpm++ steps 2.6x as far as 50 ddim steps, which broke IGDS's sets at dpm++ 15)."""
    y, seeds = torch.arange(8) % 10, [sample_seed(0, k, 0) for k in range(8)]
    guide = Guidance(objective=lambda x0, t, y, st: x0.flatten(1).mean(1), scale=1.0)

    def push(name, steps):
        cfg = SamplerConfig(scheduler=name, steps=steps, cfg_scale=1.0)
        return float((sample(backbone, y, seeds, cfg, guidance=guide)["z0"] - sample(backbone, y, seeds, cfg)["z0"]).mean())

    ref = push("ddim", 50)
    assert ref > 1.0
    for name, steps in (("ddim", 15), ("dpm++", 10), ("dpm++", 25), ("unipc", 15), ("euler", 15)):
        assert push(name, steps) == pytest.approx(ref, rel=0.1), (name, steps)


@pytest.mark.parametrize("mode", ["full", "x0"])
def test_guidance_micro_batch_changes_memory_not_results(backbone, mode):
    y, seeds = torch.arange(5) % 10, [sample_seed(3, k, 0) for k in range(5)]
    guide = Guidance(objective=_target_objective, scale=1.0, mode=mode, state=torch.full((1, 1, 16, 16), 0.7))
    whole = sample(backbone, y, seeds, SamplerConfig(steps=6, cfg_scale=2.0), guidance=guide)
    split = sample(backbone, y, seeds, SamplerConfig(steps=6, cfg_scale=2.0, guidance_micro_batch=2), guidance=guide)
    torch.testing.assert_close(split["z0"], whole["z0"], rtol=1e-3, atol=1e-4)   # matmuls of other batch sizes
    torch.testing.assert_close(split["J"], whole["J"], rtol=1e-3, atol=1e-4)


def test_guidance_outside_window_is_exactly_unguided(backbone):
    cfg = SamplerConfig(steps=6, cfg_scale=2.0)
    y, seeds = torch.tensor([1, 2]), [11, 12]
    guide = Guidance(objective=_target_objective, scale=5.0, window=(100, 200), state=torch.zeros(1))
    assert torch.equal(sample(backbone, y, seeds, cfg)["z0"], sample(backbone, y, seeds, cfg, guidance=guide)["z0"])


def test_nan_guidance_stops_the_run(backbone):
    def bad(x0, t, y, state):
        return (x0 * float("nan")).flatten(1).sum(1)
    with pytest.raises(GuidanceError, match="NaN/Inf"):
        sample(backbone, torch.tensor([1, 2]), [1, 2], SamplerConfig(steps=4), guidance=Guidance(bad, scale=1.0))


def test_bf16_precision_samples_close_to_fp32_where_the_cpu_has_bf16(spec):
    """compute.precision=bf16 runs the backbone under bf16 autocast on CPUs with native bf16 (and on CUDA):
    the samples move a little, repeat exactly, and stay uint8 images of the same shape."""
    from raydd.generate import SampleBatches, cpu_has_bf16, make_rows

    sampler = SamplerConfig(steps=6, cfg_scale=2.0, clip_x0=True)
    rows = make_rows(10, 1, run_seed=0, unit_size=10)
    fp32 = SampleBatches(spec, sampler)(rows)
    bf16 = SampleBatches(spec, sampler, precision="bf16")
    assert bf16.autocast == (torch.bfloat16 if cpu_has_bf16() else None)
    a, b = bf16(rows), bf16(rows)
    assert np.array_equal(a["latent"], b["latent"])                       # deterministic
    assert a["image"].dtype == np.uint8 and a["image"].shape == fp32["image"].shape
    diff = np.abs(a["latent"].astype(np.float32) - fp32["latent"].astype(np.float32))
    if cpu_has_bf16():
        assert 0 < diff.mean() < 0.05, diff.mean()
    else:
        assert diff.max() == 0


def test_bf16_on_a_cpu_without_bf16_stays_fp32_and_says_so(monkeypatch):
    import raydd.generate as generate

    monkeypatch.setattr(generate, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert generate.autocast_for("bf16", torch.device("cpu")) is None
    assert generate.autocast_for("fp32", torch.device("cpu")) is None
    assert generate.autocast_for("bf16", torch.device("cuda")) is torch.bfloat16


def test_pinned_output_slices_of_sampling_and_the_training_loss(backbone):
    """diffusers' habit: a few output values of the seed-0 tiny DiT pinned (to 1e-3), so a change to the shared
    diffusion maths (raydd.diffusion), the schedulers, guidance or the training loss cannot drift unnoticed."""
    from raydd.finetune import diffusion_losses, transformer_predict

    y, seeds = torch.tensor([1, 7]), [3, 4]
    want = {"ddpm": [0.1213, 0.6582, -0.8799, -1.0, 0.9944, -0.4478, -0.591, 0.0399],
            "ddim": [1.0, -1.0, -1.0, 1.0, -0.4738, 1.0, -1.0, 1.0]}
    for sched, values in want.items():
        z = sample(backbone, y, seeds, SamplerConfig(steps=6, cfg_scale=2.0, clip_x0=True, scheduler=sched))["z0"]
        np.testing.assert_allclose(z[:, 0, 5, 5:9].flatten().numpy(), values, atol=1e-3)
    # 50 unclipped steps, learned sigma (the latent worlds' setting). These values and the ones above are the
    # hand-written DDPM/DDIM's at 8eb18a9, before sampling moved onto diffusers' schedulers: the random-weight
    # model drifts to |x| ~ 800, so they are pinned relative to their size.
    want50 = {"ddpm": [301.7309, -834.2311, -328.5424, -108.1532, 293.7676, -136.3177, -31.0817, 489.8963],
              "ddim": [138.9539, -565.2366, -138.6474, 97.2908, -5.3199, 192.5041, 59.5154, 196.5837]}
    for sched, values in want50.items():
        z = sample(backbone, y, seeds, SamplerConfig(steps=50, cfg_scale=4.0, scheduler=sched))["z0"]
        np.testing.assert_allclose(z[:, 0, 5, 5:9].flatten().numpy(), values, rtol=1e-4, atol=1e-3)
    # guided, 6 steps: repinned when guidance's beta became the 50-step grid's at t (Steps.guidance_beta) instead of
    # the 6-step grid's own, 3-5x larger one (before: 0.1696, 0.6798, -0.8596, -1.0, 0.9914, 0.1071, -0.3137, 0.2426)
    g = Guidance(lambda x0, t, y, s: -((x0 - 0.5) ** 2).flatten(1).mean(1), scale=1.0)
    z = sample(backbone, y, seeds, SamplerConfig(steps=6, cfg_scale=2.0, clip_x0=True), guidance=g)["z0"]
    np.testing.assert_allclose(z[:, 0, 5, 5:9].flatten().numpy(),
                               [0.0906, 0.6471, -0.8810, -1.0, 0.9933, -0.3256, -0.5292, 0.1885], atol=1e-3)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(3, 1, 16, 16, generator=gen)
    with torch.no_grad():
        out = diffusion_losses(transformer_predict(backbone.transformer, 1), x0, torch.tensor([1, 2, 10]),
                               torch.tensor([0, 400, 999]), noise, make_schedule(SamplerConfig()))
    np.testing.assert_allclose(out["mse"].numpy(), [1.0265, 1.2735, 1.658], atol=1e-3)
    np.testing.assert_allclose(out["vb"].numpy(), [2.4584, 0.0093, 0.0244], atol=1e-3)


@pytest.mark.parametrize("mode", ["full", "x0"])
def test_guidance_checkpoint_recomputes_the_blocks_and_changes_no_result(mode):
    """sampler.guidance_checkpoint on the latent world's model pair (DiT + AutoencoderKL): the DiT's blocks (mode
    full) and the VAE decoder's blocks run again in the backward pass instead of keeping their activations;
    eps_tilde and J are unchanged, and no-grad steps are not recomputed."""
    from raydd.autoencoder import tiny_vae
    from raydd.backbone import SDVAE, Backbone, tiny_dit
    from raydd.sampling import guided_eps

    torch.manual_seed(0)
    backbone = Backbone(tiny_dit(10, 4, 4, hidden_size=32, depth=2, heads=2), SDVAE(tiny_vae(1, 16, 8), 1.0)).eval()
    calls = {"dit": 0, "vae": 0}
    # pre-hooks: a recomputation stops as soon as it has what the backward needs, before a block's forward returns
    count = lambda key: lambda *a: calls.__setitem__(key, calls[key] + 1)   # noqa: E731
    backbone.transformer.transformer_blocks[0].register_forward_pre_hook(count("dit"))
    backbone.vae.vae.decoder.up_blocks[0].register_forward_pre_hook(count("vae"))
    x, t, y = torch.randn(3, 4, 4, 4), torch.full((3,), 400), torch.tensor([1, 4, 7])
    guide = Guidance(objective=lambda img, t, y, st: -(img - 0.5).pow(2).flatten(1).mean(1), scale=2.0, mode=mode,
                     on_images=True)
    results = {}
    for checkpoint in (False, True):
        calls.update(dit=0, vae=0)
        cfg = SamplerConfig(cfg_scale=2.0, guidance_checkpoint=checkpoint)
        eps, _, J = guided_eps(backbone, guide, x, t, y, 0.5, 0.02, cfg)
        results[checkpoint] = (eps, J, dict(calls))
    (eps0, J0, calls0), (eps1, J1, calls1) = results[False], results[True]
    torch.testing.assert_close(eps1, eps0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(J1, J0, rtol=1e-5, atol=1e-6)
    assert calls1["vae"] == 2 * calls0["vae"] == 2                          # decoded once, recomputed once
    assert calls1["dit"] == (2 if mode == "full" else 1) * calls0["dit"] == (2 if mode == "full" else 1)
    calls.update(dit=0, vae=0)
    with torch.no_grad():                                                   # unguided steps: no recomputation
        predict_eps(backbone, x, t, y, 2.0)
    assert calls["dit"] == 1
