"""Inversion matching (IMS3, seed 002): a fine-tuning loss term that aligns the model's DDIM
inversion of a clean latent with the forward-noised latent at the same timestep.

    L_IM    = 1 - cos(z_t^inv, z_t)                                  per sample  [B]
    z_t     = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                 (q_sample: no model in it)
    z_t^inv = DDIM inversion of z0 from step 0 up to step t, K steps with the model being tuned:
              s_k = floor(k t / K), k = 0..K  (per sample: every sample has its own t)
              z_{s_{k+1}} = sqrt(abar_{s_{k+1}}) x0_hat(z_{s_k}) + sqrt(1 - abar_{s_{k+1}}) eps_theta(z_{s_k}, s_k, y)
              x0_hat(z_s) = (z_s - sqrt(1 - abar_s) eps_theta(z_s, s, y)) / sqrt(abar_s)

The gradient reaches the trained parameters through eps_theta inside the inversion (z_t holds none).
The model is in train() mode, so DiT's 10% label dropout to the null class applies here as in L_diff.

Options (finetune_config(term_options={"im": {...}})):
  inversion_steps  K above (default 2; "a few": each step is one forward + backward of the DiT)
  im_matrix        False: per-sample cosine (the paper's equation). True: the reference code's
                   average over the B x B matrix of cosines, returned per sample as the row mean
                   1 - mean_j cos(z_t^inv_i, z_t_j), whose batch mean is 1 - (matrix mean).
The reference code also differs elsewhere (noted, not reproduced): it inverts ONE step at the
sampled t under no_grad and matches against the model's posterior sample x_{t-1}, with lambda
inside: 1 - lambda * mean(cos).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydd.diffusion import coef, predict_x0
from raydd.finetune import register_loss_term

IM_OPTIONS = {"inversion_steps": 2, "im_matrix": False}


def ddim_invert(predict, z0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, schedule, steps: int) -> torch.Tensor:
    """Deterministic DDIM inversion z0 -> z_t^inv in `steps` steps (eta = 0), per-sample t [B].
    predict(x, t, y) -> (eps, var|None); z0 [B,C,H,W]; returns [B,C,H,W] (differentiable)."""
    z, s = z0, torch.zeros_like(t)                                   # start at the clean latent, step 0
    for k in range(1, steps + 1):
        s_next = torch.div(k * t, steps, rounding_mode="floor")      # [B] next grid point (s_K = t)
        eps, _ = predict(z, s, y)                                    # eps_theta(z_s, s, y)  [B,C,H,W]
        a, a_next = coef(schedule.alphas_cumprod, s, z), coef(schedule.alphas_cumprod, s_next, z)   # full schedule
        x0_hat = predict_x0(z, eps, a)                               # [B,C,H,W]
        z = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps       # z_{s_next}
        s = s_next
    return z


@register_loss_term("im")
def inversion_matching(predict, x0, y, t, x_t, noise, out, schedule, options) -> torch.Tensor:
    """L_IM per sample [B] (see the module docstring); x_t is q_sample(x0, t, noise) = z_t."""
    unknown = set(options) - set(IM_OPTIONS)
    if unknown:
        raise ValueError(f"unknown 'im' term option(s) {sorted(unknown)}; allowed: {sorted(IM_OPTIONS)}")
    opts = IM_OPTIONS | dict(options)
    if int(opts["inversion_steps"]) < 1:
        raise ValueError(f"im inversion_steps={opts['inversion_steps']} must be >= 1")
    z_inv = ddim_invert(predict, x0, y, t, schedule, int(opts["inversion_steps"])).flatten(1)  # [B, D]
    z_t = x_t.flatten(1)                                                                       # [B, D]
    if opts["im_matrix"]:
        cos = F.normalize(z_inv, dim=1) @ F.normalize(z_t, dim=1).T                            # [B, B]
        return 1 - cos.mean(dim=1)
    return 1 - F.cosine_similarity(z_inv, z_t, dim=1)                                          # [B]
