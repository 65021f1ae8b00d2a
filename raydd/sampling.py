"""diffusers' schedulers, classifier-free guidance, the one guidance helper and the visible denoising loop
(the schedule maths training uses lives in raydd.diffusion).

Conventions (as in DiT / improved DDPM):
  * a linear beta schedule of `train_timesteps` (1000) steps; sampling takes `steps` of them (DiT: 50,
    linspace) through a diffusers scheduler; the DiT always receives true timesteps in [0, 1000);
  * eps_hat = eps_phi(x_t, t, y);  x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t);
  * the scheduler only steps: step(eps, i, x_t) -> x_prev; the loop in `sample` joins backbone (eps with
    CFG), guidance (edits eps) and scheduler and stays readable top to bottom.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from raydd.config import ALLOWED, ConfigError, SamplerConfig
from raydd.diffusion import predict_x0
from raydd.errors import RayddError


class GuidanceError(RayddError, RuntimeError):
    """A guidance objective produced NaN/Inf: the run stops (no sample is silently re-drawn)."""


# --------------------------------------------------------------------------------------------
# Schedulers: diffusers' own, seen in DDPM's variance-preserving terms
# --------------------------------------------------------------------------------------------
SCHEDULERS = ALLOWED["sampler.scheduler"]                  # one list: the config's allowed values, Steps builds each


class Steps:
    """cfg.steps steps of a diffusers scheduler (sampler.scheduler), indexed i = S-1 (noisiest) .. 0 (cleanest).

    Whatever the scheduler, the loop's x is the variance-preserving x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    so guidance and post-step updates (CGS) read the same for all; per step i:
      t[i]         the true timestep the DiT sees (ints; DiT's respacing for ddpm: linspace over 1000 steps)
      abar[i]      abar at t[i];   abar_prev[i]: the noise level of x after the step (1.0 after the last);
      beta[i]      the step's beta = 1 - abar[i] / abar_prev[i];
      guidance_beta[i]  guidance's "variance" step size: the beta of DiT's 50-step grid at t[i] (interpolated in t),
                   so that the guidance edit of eps is a function of t alone, whatever the step count (below).
      ddpm   DDPMScheduler, ancestral, learned-range variance when the DiT learns sigma (improved DDPM / DiT);
      ddim   deterministic DDIM (eta = 0) on DiT's grid, as DPMSolverMultistepScheduler of order 1 (the same
             update, Lu et al. 2022): diffusers' DDIMScheduler steps from t to t - T // S instead of to the next
             grid point (979 -> 959, not 958, at S = 50; 999 -> 833, not 799, at S = 6), so it is not DiT's DDIM;
      dpm++  DPMSolverMultistepScheduler (DPM-Solver++(2M)), dpm++sde its stochastic form (SDE-DPM-Solver++(2M):
             fresh noise each step, as DDPM; each sample's from its own stream), unipc UniPCMultistepScheduler (UniPC-bh2),
      euler  EulerDiscreteScheduler: few-step solvers on diffusers' linspace grid (S points from 999, then to
             sigma = 0). Euler works on x_t sqrt(1 + sigma_t^2) = x0 + sigma_t eps; step() converts both ways.
    clip_x0 (pixel backbones): clip_sample for ddpm; thresholding with sample_max_value = 1 for ddim/dpm++/unipc,
    which clamps x0_hat to [-1, 1] exactly (the dynamic threshold is clamped to [1, 1]); euler has no clipping.
    coupled=True (a post_step moves x between steps): UniPC's corrector is turned off, because it rebuilds x_t
    from the previous x and would undo the move.
    """

    def __init__(self, cfg: SamplerConfig, learned_sigma: bool, coupled: bool = False):
        from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                               UniPCMultistepScheduler)

        name, clip, S = cfg.scheduler, cfg.clip_x0, cfg.steps
        common = dict(num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                      beta_schedule="linear", timestep_spacing="linspace")
        if name == "ddpm":
            d = DDPMScheduler(**common, variance_type="learned_range" if learned_sigma else "fixed_small",
                              clip_sample=clip, clip_sample_range=1.0)
        elif name == "ddim":   # DPM-Solver++ of order 1 is DDIM (eta = 0), stepping between DiT's grid points
            d = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=1,
                                            thresholding=clip, sample_max_value=1.0)
        elif name in ("dpm++", "dpm++sde"):
            d = DPMSolverMultistepScheduler(**common, algorithm_type="sde-dpmsolver++" if name == "dpm++sde" else
                                            "dpmsolver++", solver_order=2, thresholding=clip, sample_max_value=1.0)
        elif name == "unipc":
            d = UniPCMultistepScheduler(**common, thresholding=clip, sample_max_value=1.0,
                                        disable_corrector=list(range(S)) if coupled else [])
        elif name == "euler":
            d = EulerDiscreteScheduler(**common)
        else:
            raise ConfigError(f"sampler.scheduler={name!r}; allowed: {', '.join(SCHEDULERS)}")
        if name == "ddim":    # DiT's respaced grid (= ddpm's), ending with t = 0 -> x0_hat
            d.set_timesteps(timesteps=np.linspace(0, cfg.train_timesteps - 1, S).round()[::-1].astype(int).tolist())
        elif name == "euler":  # integer timesteps on the dpm++/unipc grid (diffusers' own Euler grid ends with a
            #                    step at t = 0, sigma 0.01: one model call of S that changes next to nothing)
            d.set_timesteps(timesteps=np.linspace(0, cfg.train_timesteps - 1, S + 1).round()[::-1][:-1].tolist())
        else:
            d.set_timesteps(S)
        self.d, self.name = d, name
        ts = d.timesteps.round().long().flip(0)                       # [S] ascending: t[i], i = 0 cleanest
        abar = d.alphas_cumprod.double()
        after = torch.cat([ts.new_tensor([-1]), ts[:-1]])             # the timestep each step lands on (-1: clean)
        self.t = ts
        self.key = d.timesteps.flip(0)                                # [S] the scheduler's own values, for step()
        self.abar = abar[ts]
        self.abar_prev = torch.where(after >= 0, abar[after.clamp_min(0)], torch.ones_like(self.abar))
        self.beta = 1.0 - self.abar / self.abar_prev
        self.guidance_beta = guidance_beta(abar, ts)
        self.sigma = ((1 - self.abar) / self.abar).sqrt()              # Euler's sigma_t
        self.sigma_prev = ((1 - self.abar_prev) / self.abar_prev).sqrt()

    def __len__(self) -> int:
        return len(self.t)

    def step(self, eps: torch.Tensor, i: int, x_t: torch.Tensor, var_values: torch.Tensor | None,
             generators: list[torch.Generator]) -> torch.Tensor:
        """x_t -> x_{i-1} (variance-preserving) with diffusers' step; generators: per-sample noise (ddpm, dpm++sde)."""
        t = self.key[i]
        if self.name == "ddpm":
            out = torch.cat([eps, var_values], 1) if var_values is not None else eps   # learned range: [B, 2C]
            return self.d.step(out, t, x_t, generator=generators).prev_sample
        if self.name == "dpm++sde":
            return self.d.step(eps, t, x_t, generator=generators).prev_sample
        if self.name == "euler":
            x_ve = x_t * math.sqrt(1 + float(self.sigma[i]) ** 2)         # x0 + sigma_t eps
            self.d.scale_model_input(x_ve, t)   # = x_t, the DiT's input (already computed); Euler checks the call
            return self.d.step(eps, t, x_ve).prev_sample / math.sqrt(1 + float(self.sigma_prev[i]) ** 2)
        return self.d.step(eps, t, x_t).prev_sample


GUIDANCE_GRID_STEPS = 50   # guidance scales are calibrated on DiT's 50-step grid


def guidance_beta(abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar [T] (the training schedule), t [S] timesteps -> [S]: the beta that DiT's 50-step respaced grid has at t,
    linearly interpolated between its grid points (= the step's own beta for ddpm and ddim at 50 steps).

    Why not the step's own beta: a step of length dt edits eps by ~ scale * beta ~ dt, and an edit of eps moves
    x_{t-1} by ~ dt times as much, so a trajectory of S steps is pushed ~ S * (1/S)^2 = 1/S: dpm++ at 15 steps was
    pushed 2.2x as far as ddim at 50 by the same scale (IGDS at dpm++ 15 broke its sets, README). With beta a
    function of t, the edited eps_tilde(x_t, t) is one field, and any scheduler integrates (approximately) the
    same guided trajectory: the push no longer depends on S (tests/test_sampling.py)."""
    T = len(abar)
    grid = np.linspace(0, T - 1, GUIDANCE_GRID_STEPS).round()            # ascending, 0 .. T-1
    a = abar.double().numpy()[grid.astype(int)]
    beta = 1.0 - a / np.concatenate([[1.0], a[:-1]])
    return torch.from_numpy(np.interp(t.double().numpy(), grid, beta))


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
      "variance" (IGD's reference code): rho_t = beta_t * ||eps_hat|| / ||g||, beta_t the beta of DiT's 50-step
          grid at t (the top of DiT's learned variance range; Steps.guidance_beta, the same at any step count),
          so ||eps_tilde - eps_hat|| = scale * beta_t * ||eps_hat|| and, at 50 ddpm steps, x_{t-1}'s mean moves
          by scale * beta_t^2 / sqrt(alpha_t (1 - abar_t)) * ||eps_hat||: bounded, on pixels and unclipped
          latents alike;
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
    sampler.guidance_checkpoint: recompute those activations block by block in the backward pass instead.
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


def warn_guidance_scheduler(method: str, sampler: SamplerConfig) -> None:
    """Guidance scales were calibrated with ddpm at 50 steps. The guided eps field is now the same at any step count
    (guidance_beta), but deterministic solvers over-guide at ddpm's scale, even at 50 steps, and more so with
    fewer: IGDS on digits-latent at eta = 2 kept its accuracy with ddpm-50 only (ddim-50 76.9, dpm++ 15 75.3,
    ddim-15 60.4 against 90.2), and dpm++ 15 needed eta = 0.5 (README, Schedulers)."""
    if sampler.scheduler != "ddpm":
        import warnings

        warnings.warn(f"{method}'s guidance scale was calibrated with sampler.scheduler=ddpm (50 steps); with "
                      f"{sampler.scheduler} at {sampler.steps} steps the same scale may guide harder (deterministic solvers "
                      f"over-guided IGDS on digits-latent even at 50 steps; dpm++ 15 needed a quarter of its eta); check distilled/latent_std and teacher_acc, "
                      f"or lower the scale", stacklevel=2)


def guided_eps(backbone, guidance: Guidance, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               abar: float, beta: float, cfg: SamplerConfig
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One guided prediction -> (eps_tilde, var_values, J [B]). abar, beta: the step's abar_t and guidance beta_t.
    Rows go through in micro-batches of cfg.guidance_micro_batch. Raises GuidanceError on NaN/Inf."""
    if guidance.mode not in ("full", "x0"):
        raise ValueError(f"guidance mode {guidance.mode!r}; allowed: full, x0")
    from raydd.backbone import set_activation_checkpointing

    set_activation_checkpointing(backbone, cfg.guidance_checkpoint)
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
           post_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
           ) -> dict[str, torch.Tensor]:
    """Denoise one batch. y [B] labels, seeds [B] per-sample seeds.
    post_step(i, x_prev, x0_hat, y, abar_prev) -> x_prev': an update of the whole batch right after each scheduler
    step (batch-level guidance such as CGS, which couples the samples of a class); abar_prev is x_prev's noise
    level; None = no change.
    Returns {"z0": final latents [B,C,H,W] float32, "J": last guidance objective [B] (NaN if none)}."""
    steps = Steps(cfg, backbone.learned_sigma, coupled=post_step is not None)
    y = y.to(device)
    noise = NoiseStreams(seeds, backbone.latent_shape, device)
    x = noise.next()                                        # x_T ~ N(0, I)   [B,C,H,W]
    J = torch.full((len(seeds),), float("nan"), device=device)
    for i in reversed(range(len(steps))):                   # i = S-1 (noisiest) .. 0
        t = torch.full((len(seeds),), int(steps.t[i]), device=device, dtype=torch.long)
        abar = float(steps.abar[i])
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            if guidance is not None and guidance.active(i):
                eps, var, J = guided_eps(backbone, guidance, x, t, y, abar, float(steps.guidance_beta[i]), cfg)
            else:
                eps, var = predict_eps(backbone, x, t, y, cfg.cfg_scale, cfg.cfg_first3_quirk)
        eps, var = eps.float(), None if var is None else var.float()
        x0_hat = predict_x0(x, eps, abar)                   # the step's clean prediction (for post_step)
        if cfg.clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        x = steps.step(eps, i, x, var, noise.gens)          # x_{i-1}; ddpm draws each sample's noise from its own stream
        if post_step is not None:                           # batch-level update of x_{i-1}
            x = post_step(i, x, x0_hat, y, float(steps.abar_prev[i]))
    return {"z0": x.float(), "J": J.float()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B,C,H,W] float -> uint8 [B,C,H,W]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
