"""The two schedulers, classifier-free guidance, the one guidance helper and the visible denoising loop
(the schedule maths they share with training lives in raydd.diffusion).

Conventions (as in DiT / improved DDPM):
  * a linear beta schedule of `train_timesteps` (1000) steps, respaced to `steps` (50) evenly
    spaced TRUE timesteps; the DiT always receives true timesteps in [0, 1000);
  * eps_hat = eps_phi(x_t, t, y);  x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t);
  * the scheduler only steps: step(eps, i, x_t) -> (x_prev, x0_hat); the loop in `sample`
    joins backbone, guidance and scheduler and stays readable top to bottom.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from raydd.config import SamplerConfig
from raydd.diffusion import Schedule, coef, learned_range_log_variance, make_schedule, predict_x0
from raydd.errors import RayddError


class GuidanceError(RayddError, RuntimeError):
    """A guidance objective produced NaN/Inf: the run stops (no sample is silently re-drawn)."""


# --------------------------------------------------------------------------------------------
# Schedulers: step(eps, i, x_t) -> (x_prev, x0_hat)
# --------------------------------------------------------------------------------------------
class DDPMScheduler:
    """Ancestral DDPM with learned-range variance (improved DDPM / DiT)."""

    def __init__(self, schedule: Schedule, clip_x0: bool = False):
        self.s = schedule
        self.clip_x0 = clip_x0

    def log_variance(self, i: int, var_values: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
        """Learned range: log var = f * log beta_i + (1 - f) * log beta_tilde_i, f = (v + 1) / 2.
        Without a learned variance: the fixed posterior variance (log beta_tilde_i)."""
        min_log = coef(self.s.posterior_log_variance_clipped, i, ref)
        if var_values is None:
            return min_log.expand_as(ref)
        return learned_range_log_variance(var_values, min_log, coef(np.log(self.s.betas), i, ref))

    def step(self, eps: torch.Tensor, i: int, x_t: torch.Tensor, var_values: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = predict_x0(x_t, eps, float(self.s.alphas_cumprod[i]))
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        # posterior mean of q(x_{i-1} | x_i, x0)
        mean = coef(self.s.posterior_mean_coef1, i, x_t) * x0 + coef(self.s.posterior_mean_coef2, i, x_t) * x_t
        if i == 0:
            return mean, x0  # no noise at the last step
        log_var = self.log_variance(i, var_values, x_t)
        return mean + torch.exp(0.5 * log_var) * noise, x0


class DDIMScheduler:
    """Deterministic DDIM (eta = 0) on the same respaced schedule."""

    def __init__(self, schedule: Schedule, clip_x0: bool = False):
        self.s = schedule
        self.clip_x0 = clip_x0

    def step(self, eps: torch.Tensor, i: int, x_t: torch.Tensor, var_values: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = predict_x0(x_t, eps, float(self.s.alphas_cumprod[i]))
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - math.sqrt(self.s.alphas_cumprod[i]) * x0) / math.sqrt(1 - self.s.alphas_cumprod[i])
        abar_prev = float(self.s.alphas_cumprod_prev[i])
        return math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev) * eps, x0


def make_scheduler(cfg: SamplerConfig, schedule: Schedule):
    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[cfg.scheduler](schedule, clip_x0=cfg.clip_x0)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance: cond and uncond in one forward
# --------------------------------------------------------------------------------------------
def predict_eps(backbone, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                first3_quirk: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps_cfg = eps_u + s (eps_c - eps_u); variance values from the conditional half.
    x_t [B,C,H,W], t [B] true timesteps, y [B] labels -> eps [B,C,H,W], var [B,C,H,W] | None."""
    if cfg_scale == 1.0:
        return backbone(x_t, t, y)
    null = torch.full_like(y, backbone.num_classes)
    eps2, var2 = backbone(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))  # [2B,...]
    eps_c, eps_u = eps2.chunk(2)
    eps = eps_u + cfg_scale * (eps_c - eps_u)
    if first3_quirk:  # original DiT code guides only channels 0..2; the rest stay conditional
        eps = torch.cat([eps[:, :3], eps_c[:, 3:]], dim=1)
    return eps, (var2.chunk(2)[0] if var2 is not None else None)


# --------------------------------------------------------------------------------------------
# The one guidance helper
# --------------------------------------------------------------------------------------------
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class Guidance:
    """Steer sampling toward higher J(x0_hat, t, y, state) -> [B] (maximised).

    eps_tilde = eps_hat - scale * rho_t * g,  g = grad_{x_t} J, per sample, with rho_t by sampler.guidance_norm:
      "variance" (IGD's reference code): rho_t = beta_t * ||eps_hat|| / ||g||, beta_t the respaced step's
          beta (the top of DiT's learned variance range), so ||eps_tilde - eps_hat|| = scale * beta_t *
          ||eps_hat|| and x_{t-1}'s mean moves by scale * beta_t^2 / sqrt(alpha_t (1 - abar_t)) * ||eps_hat||:
          bounded, on pixels and on unclipped latents alike;
      "eps" (the LGD summary's formula): rho_t = sqrt(1 - abar_t) * ||eps_hat|| / ||g||, a step of
          scale * sqrt(1 - abar_t) * ||eps_hat|| in eps: at scale 15 it moves x_{t-1} by 1.25-5.5 x
          ||eps_hat|| on the 50-step schedule, which only clip_x0 survives.
    Applied only at respaced steps i with window[0] <= i <= window[1] (i = 0 cleanest, S-1 noisiest).
    mode "full": g through the DiT; "x0": eps_hat treated as constant (cheaper, g = grad_x0 J / sqrt(abar)).
    on_images: decode x0_hat through the VAE before J (objectives on pixels, e.g. classifiers).
    latent_term(x0_hat, t, y, state) -> [B]: added to J, on x0_hat itself even when on_images (e.g. LGD's
    repulsion from the memory, a cosine in the DiT's latent space).
    sampler.guidance_micro_batch: rows per backward pass (0 = the whole batch); the activations of one
    guided step through the DiT and the VAE decoder grow with it, the result does not (rows are independent).
    """
    objective: Objective
    scale: float
    window: tuple[int, int] = (0, 10**9)
    mode: str = "full"
    on_images: bool = False
    state: Any = None
    latent_term: Objective | None = None

    def active(self, i: int) -> bool:
        return self.scale != 0 and self.window[0] <= i <= self.window[1]


def guided_eps(backbone, guidance: Guidance, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               abar: float, beta: float, cfg: SamplerConfig
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One guided prediction -> (eps_tilde, var_values, J [B]). abar, beta: the step's abar_t and beta_t.
    Rows go through in micro-batches of cfg.guidance_micro_batch. Raises GuidanceError on NaN/Inf."""
    if guidance.mode not in ("full", "x0"):
        raise ValueError(f"guidance mode {guidance.mode!r}; allowed: full, x0")
    step = cfg.guidance_micro_batch if cfg.guidance_micro_batch > 0 else len(x_t)
    parts = [_guided_rows(backbone, guidance, x_t[r:r + step], t[r:r + step], y[r:r + step], abar, cfg)
             for r in range(0, len(x_t), step)]
    eps, g, var, J = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
    if not (torch.isfinite(g).all() and torch.isfinite(J).all()):
        bad = (~torch.isfinite(g).flatten(1).all(1) | ~torch.isfinite(J)).nonzero().flatten().tolist()
        raise GuidanceError(f"guidance objective gave NaN/Inf at timestep {int(t[0])} for batch rows {bad} "
                            f"(labels {y[bad].tolist()}); the run stops rather than write corrupt samples")
    size = beta if cfg.guidance_norm == "variance" else math.sqrt(1.0 - abar)   # see Guidance
    rho = size * eps.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1).clamp_min(1e-12)  # [B]
    rho = rho.view((-1,) + (1,) * (eps.dim() - 1))
    return eps - guidance.scale * rho * g, var, J



def _guided_rows(backbone, guidance: Guidance, x_t, t, y, abar: float, cfg: SamplerConfig):
    """eps_hat, g = grad_{x_t} J, var values and J for some rows (one backward pass)."""
    x_in = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        if guidance.mode == "full":
            eps, var = predict_eps(backbone, x_in, t, y, cfg.cfg_scale, cfg.cfg_first3_quirk)
        else:
            with torch.no_grad():
                eps, var = predict_eps(backbone, x_t, t, y, cfg.cfg_scale, cfg.cfg_first3_quirk)
        x0_hat = predict_x0(x_in, eps, abar)
        target = backbone.vae.decode(x0_hat) if guidance.on_images else x0_hat
        J = guidance.objective(target, t, y, guidance.state)  # [b]
        if guidance.latent_term is not None:
            J = J + guidance.latent_term(x0_hat, t, y, guidance.state)
        (g,) = torch.autograd.grad(J.sum(), x_in)
    return eps.detach(), g, (var.detach() if var is not None else None), J.detach()


# --------------------------------------------------------------------------------------------
# Per-sample randomness: a function of (run seed, class, slot) only
# --------------------------------------------------------------------------------------------
def sample_seed(run_seed: int, class_idx: int, slot: int, stream: str = "") -> int:
    blob = f"{run_seed}:{class_idx}:{slot}:{stream}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


class NoiseStreams:
    """One CPU generator per sample, so a sample's noise never depends on its batch-mates."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def next(self) -> torch.Tensor:  # [B, *shape]
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


# --------------------------------------------------------------------------------------------
# The denoising loop
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(backbone, y: torch.Tensor, seeds: list[int], cfg: SamplerConfig, guidance: Guidance | None = None,
           device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
           post_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           ) -> dict[str, torch.Tensor]:
    """Denoise one batch. y [B] labels, seeds [B] per-sample seeds.
    post_step(i, x_prev, x0_hat, y) -> x_prev': an update of the whole batch right after each scheduler
    step (batch-level guidance such as CGS, which couples the samples of a class); None = no change.
    Returns {"z0": final latents [B,C,H,W] float32, "J": last guidance objective [B] (NaN if none)}."""
    schedule = make_schedule(cfg)
    scheduler = make_scheduler(cfg, schedule)
    y = y.to(device)
    noise = NoiseStreams(seeds, backbone.latent_shape, device)
    x = noise.next()                                        # x_T ~ N(0, I)   [B,C,H,W]
    J = torch.full((len(seeds),), float("nan"), device=device)
    for i in reversed(range(len(schedule))):                # i = S-1 (noisiest) .. 0
        t = torch.full((len(seeds),), int(schedule.timesteps[i]), device=device, dtype=torch.long)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            if guidance is not None and guidance.active(i):
                eps, var, J = guided_eps(backbone, guidance, x, t, y, float(schedule.alphas_cumprod[i]),
                                         float(schedule.betas[i]), cfg)
            else:
                eps, var = predict_eps(backbone, x, t, y, cfg.cfg_scale, cfg.cfg_first3_quirk)
        step_noise = noise.next() if i > 0 else None
        x, x0_hat = scheduler.step(eps.float(), i, x, None if var is None else var.float(), step_noise)
        if post_step is not None:                           # batch-level update of x_{i-1}
            x = post_step(i, x, x0_hat, y)
    return {"z0": x.float(), "J": J.float()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B,C,H,W] float -> uint8 [B,C,H,W]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
