"""DDPM / DDIM step maths against an independent float64 reference; CFG; the guidance helper."""
import numpy as np
import pytest
import torch

from raydd.config import SamplerConfig
from raydd.diffusion import make_schedule, respaced_timesteps
from raydd.sampling import DDIMScheduler, DDPMScheduler, Guidance, GuidanceError, NoiseStreams, predict_eps, sample, sample_seed


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


def test_respacing_matches_reference():
    ts, abar, prev, beta, var = reference_schedule()
    s = make_schedule(SamplerConfig())
    assert list(s.timesteps) == list(ts) and ts[0] == 0 and ts[-1] == 999 and len(ts) == 50
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=0, atol=0)
    np.testing.assert_allclose(s.betas, beta, rtol=1e-12)
    np.testing.assert_allclose(s.posterior_variance, var, rtol=1e-12)
    assert list(respaced_timesteps(1000, 1000)) == list(range(1000))


@pytest.mark.parametrize("i", [49, 30, 7, 1, 0])
def test_ddpm_step_matches_float64_reference(i):
    ts, abar, prev, beta, var = reference_schedule()
    g = torch.Generator().manual_seed(i)
    x, eps, v, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    v = v.clamp(-1, 1)
    x_prev, x0 = DDPMScheduler(make_schedule(SamplerConfig())).step(eps, i, x, v, z)
    X, E, V, Z = (t.double().numpy() for t in (x, eps, v, z))
    X0 = (X - np.sqrt(1 - abar[i]) * E) / np.sqrt(abar[i])
    mean = (beta[i] * np.sqrt(prev[i]) / (1 - abar[i])) * X0 + ((1 - prev[i]) * np.sqrt(1 - beta[i]) / (1 - abar[i])) * X
    min_log = np.log(var[1]) if i == 0 else np.log(var[i])
    log_var = (V + 1) / 2 * np.log(beta[i]) + (1 - (V + 1) / 2) * min_log
    expect = mean if i == 0 else mean + np.exp(0.5 * log_var) * Z
    np.testing.assert_allclose(x0.double().numpy(), X0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_prev.double().numpy(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("i", [49, 20, 0])
def test_ddim_step_matches_float64_reference(i):
    ts, abar, prev, beta, var = reference_schedule()
    g = torch.Generator().manual_seed(100 + i)
    x, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    x_prev, _ = DDIMScheduler(make_schedule(SamplerConfig())).step(eps, i, x)
    X, E = x.double().numpy(), eps.double().numpy()
    X0 = (X - np.sqrt(1 - abar[i]) * E) / np.sqrt(abar[i])
    np.testing.assert_allclose(x_prev.double().numpy(), np.sqrt(prev[i]) * X0 + np.sqrt(1 - prev[i]) * E,
                               rtol=1e-4, atol=1e-4)


def test_learned_range_endpoints():
    sch = DDPMScheduler(make_schedule(SamplerConfig()))
    ref = torch.zeros(1, 1, 1, 1)
    lo = sch.log_variance(10, torch.full_like(ref, -1.0), ref)
    hi = sch.log_variance(10, torch.full_like(ref, 1.0), ref)
    assert torch.allclose(lo.double(), torch.tensor(np.log(sch.s.posterior_variance[10])).double(), atol=1e-5)
    assert torch.allclose(hi.double(), torch.tensor(np.log(sch.s.betas[10])).double(), atol=1e-5)


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
    s = make_schedule(cfg)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y, i = torch.tensor([1, 4, 7]), 6
    t = torch.full((3,), int(s.timesteps[i]))
    huge = Guidance(objective=lambda x0, t, y, st: 1e6 * _target_objective(x0, t, y, st), scale=15.0,
                    state=torch.zeros(1))
    eps_tilde, _, _ = guided_eps(backbone, huge, x, t, y, float(s.alphas_cumprod[i]), float(s.betas[i]), cfg)
    eps_hat, _ = predict_eps(backbone, x, t, y, cfg.cfg_scale)
    size = s.betas[i] if norm == "variance" else np.sqrt(1 - s.alphas_cumprod[i])
    step = (eps_tilde - eps_hat).flatten(1).norm(dim=1) / eps_hat.flatten(1).norm(dim=1)
    np.testing.assert_allclose(step.numpy(), 15.0 * size, rtol=1e-4)


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
    g = Guidance(lambda x0, t, y, s: -((x0 - 0.5) ** 2).flatten(1).mean(1), scale=1.0)
    z = sample(backbone, y, seeds, SamplerConfig(steps=6, cfg_scale=2.0, clip_x0=True), guidance=g)["z0"]
    np.testing.assert_allclose(z[:, 0, 5, 5:9].flatten().numpy(),
                               [0.1696, 0.6798, -0.8596, -1.0, 0.9914, 0.1071, -0.3137, 0.2426], atol=1e-3)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(3, 1, 16, 16, generator=gen)
    with torch.no_grad():
        out = diffusion_losses(transformer_predict(backbone.transformer, 1), x0, torch.tensor([1, 2, 10]),
                               torch.tensor([0, 400, 999]), noise, make_schedule(SamplerConfig(), steps=1000))
    np.testing.assert_allclose(out["mse"].numpy(), [1.0265, 1.2735, 1.658], atol=1e-3)
    np.testing.assert_allclose(out["vb"].numpy(), [2.4584, 0.0093, 0.0244], atol=1e-3)
