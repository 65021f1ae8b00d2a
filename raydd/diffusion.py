"""The diffusion maths shared by sampling and training, written once: the linear-beta schedule, per-step
coefficients, x̂0 from ε̂, the forward process q(x_t | x0), the learned-range variance
and the DiT's output split (improved DDPM / DiT conventions).

Index conventions: the Schedule is indexed by the true timestep t = 0 (cleanest) .. train_timesteps-1 (noisiest),
the timesteps the DiT receives. Sampling steps through diffusers' schedulers (raydd.sampling.Steps) on the same
betas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from raydd.config import SamplerConfig


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """Coefficients at every training timestep t = 0 (cleanest) .. T-1 (noisiest). float64."""
    timesteps: np.ndarray            # [T] 0 .. T-1
    alphas_cumprod: np.ndarray       # [T] abar_t
    alphas_cumprod_prev: np.ndarray  # [T] abar_{t-1} (1.0 for t = 0)
    betas: np.ndarray                # [T] beta_t = 1 - abar_t / abar_{t-1}
    posterior_variance: np.ndarray   # [T] beta_tilde
    posterior_log_variance_clipped: np.ndarray  # [T] log beta_tilde, with t = 0 clipped to t = 1
    posterior_mean_coef1: np.ndarray # [T] coefficient of x0 in the posterior mean
    posterior_mean_coef2: np.ndarray # [T] coefficient of x_t in the posterior mean

    def __len__(self) -> int:
        return len(self.timesteps)


def make_schedule(cfg: SamplerConfig) -> Schedule:
    """The training schedule: linear betas over all cfg.train_timesteps steps (sampling takes its steps through a
    diffusers scheduler, raydd.sampling.Steps)."""
    base_betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.train_timesteps, dtype=np.float64)
    ts = np.arange(cfg.train_timesteps)
    abar = np.cumprod(1.0 - base_betas)
    abar_prev = np.append(1.0, abar[:-1])
    betas = base_betas
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # log(0) at t = 0: clip to the next value, as improved DDPM does
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(betas)
    return Schedule(
        timesteps=ts, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev, betas=betas,
        posterior_variance=post_var, posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
    )


def coef(arr: np.ndarray, i, ref: torch.Tensor) -> torch.Tensor:
    """Coefficient(s) arr[i] in ref's dtype and device: i an int -> a scalar tensor; i a tensor of per-sample
    indices [B] -> [B, 1, ..., 1], broadcastable to ref [B, C, H, W]. (arr is float64; cast once here.)"""
    if isinstance(i, torch.Tensor):
        v = torch.as_tensor(arr, dtype=ref.dtype, device=ref.device)[i.to(ref.device)]
        return v.reshape(-1, *([1] * (ref.dim() - 1)))
    return torch.tensor(float(arr[i]), dtype=ref.dtype, device=ref.device)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar); abar a float or per-sample [B, 1, ..., 1]."""
    if isinstance(abar, torch.Tensor):
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, s: Schedule) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t [B] indices into s."""
    ab = coef(s.alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def learned_range_log_variance(var_values: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor) -> torch.Tensor:
    """Improved DDPM's learned range: log var = f max_log + (1 - f) min_log, f = (v + 1) / 2 for the DiT's raw
    variance output v in [-1, 1]; min_log = log beta_tilde (clipped), max_log = log beta."""
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def split_output(model_out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DiT output [B, C or 2C, H, W] -> (eps, var_values | None)."""
    if model_out.shape[1] == 2 * channels:
        return model_out[:, :channels], model_out[:, channels:]
    return model_out, None
