"""rsm_cgs: sparse fine-tuning (RSM) + collaborative synchronous sampling (CGS) against distribution shift.

Paper: "Mitigating the Distribution Shift of Diffusion-based Dataset Distillation" (seed 003).
  Stage 1, RSM (training-stage shift): fine-tune the DiT on the real data with
      L = ||eps - eps_theta(x_t, t, y)||^2 + lambda ||x0_hat(x_t, t)||_1          (raydd/objectives/sparsity.py)
  Stage 2, CGS (sampling-stage shift): the IPC noises of a class are denoised together as one batch and
      after every scheduler step  z_i <- z_i - (eta_dpp ||z_i||^2 grad L_dpp + eta_dm grad L_dm)   (objectives/dpp.py:
      both steps scale-free, so one default holds on 16x16 pixels and on 4x32x32 latents)
      L_dpp = -log det(K + eps I) (K: cosine kernel of the class's latents), L_dm = ||mean z - sqrt(abar) mu_c||^2.
Ablations: rsm_cgs.rsm=false (CGS only), rsm_cgs.cgs=false (RSM only); both false is `dit`.

PEFT decision: the paper (summary) only says the DiT is "fine-tuned on D_real"; its baselines and setting
(Minimax, IMS3: DiT-XL/2 fine-tuned DiffFit-style on ImageNet subsets, single GPU) use DiffFit PEFT, so
RSM defaults to `peft=difffit` (biases, norms, label table); `rsm_cgs.peft=full` trains everything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

import raydd.objectives.sparsity  # noqa: F401  registers the fine-tuning loss term "rsm"
from raydd.config import ConfigError
from raydd.finetune import finetune, finetune_config
from raydd.generate import BackboneSpec, DistilledSet
from raydd.methods import register_method
from raydd.objectives.dpp import (ON, ClassLatentSums, cgs_post_step, class_means, mean_distance,
                                  mean_pairwise_cosine)


@dataclass
class Config:
    rsm: bool = True               # stage 1: fine-tune the backbone with the L1 term (false: sample the frozen DiT)
    cgs: bool = True               # stage 2: class-synchronous sampling with DPP + mean-matching updates
    # --- RSM fine-tuning (raydd.finetune.finetune_loop) ---
    lam: float = 0.1               # lambda: weight of ||x0_hat||_1 (mean over elements); paper: no value, digits probe
    peft: str = "difffit"          # "difffit" (DiffFit-style PEFT, as Minimax/IMS3) | "full"
    ft_steps: int = 300            # optimizer steps
    ft_batch: int = 32             # real latents per step
    ft_lr: float = 1e-3            # AdamW learning rate (DiffFit's)
    ft_ema: float = 0.99           # EMA decay of the weights sampled from (Minimax/IMS3 use 0.9999 over ~10k steps;
                                   # over 300 steps that would keep 97% of the starting weights; 0 = last weights)
    # --- CGS ---
    eta_dpp: float = 0.01          # eta_dpp: relative step on grad L_dpp (diversity; no effect at IPC 1); 1.0
                                   #   absolute on digits pixels (||z||^2 ~ 100) before steps were made relative
    eta_dm: float = 0.05           # eta_dm: step on grad L_dm (grad per sample = 2/N (mean - target))
    eps: float = 1e-3              # eps: jitter in log det(K + eps I)
    on: str = "z_t"                # "z_t": losses on the current latents (default) | "x0": on the clean prediction
    mu_max_per_class: int = 0      # real train images per class averaged into mu_c (0 = all)
    compare_unguided: bool = True  # also sample CGS-off from the same noise, to log before/after diagnostics


def check(cfg: Config, run=None) -> None:
    """Allowed values and ranges (called by the registry before anything starts)."""
    if cfg.peft not in ("difffit", "full"):
        raise ConfigError(f"rsm_cgs.peft={cfg.peft!r}; allowed: difffit, full")
    if cfg.on not in ON:
        raise ConfigError(f"rsm_cgs.on={cfg.on!r}; allowed: {', '.join(ON)}")
    if not cfg.eps > 0:
        raise ConfigError(f"rsm_cgs.eps={cfg.eps} must be > 0")
    if cfg.rsm and (cfg.ft_steps < 1 or cfg.ft_batch < 1 or cfg.lam < 0 or not 0 <= cfg.ft_ema < 1):
        raise ConfigError("rsm_cgs: need ft_steps >= 1, ft_batch >= 1, lam >= 0 and 0 <= ft_ema < 1")


def rsm_finetune(ctx, cfg: Config) -> BackboneSpec:
    """Stage 1: L_simple + L_vlb + lambda ||x0_hat||_1 on the real train split (Ray Train, cached per config).
    Returns the spec of the fine-tuned DiT (`<dir>/transformer`, loadable as backbone.source by any method)."""
    b = ctx.spec.cfg
    config = finetune_config(b.checkpoint or b.source, ctx.cfg.data, ctx.cfg.sampler, steps=cfg.ft_steps,
                             batch=cfg.ft_batch, lr=cfg.ft_lr, peft=cfg.peft, terms={"rsm": cfg.lam},
                             seed=ctx.cfg.seed, ema=cfg.ft_ema, latent_size=b.latent_size, vae=b.vae,
                             vae_scale=b.vae_scale)
    path = finetune(ctx, config)
    return dataclasses.replace(ctx.spec, cfg=dataclasses.replace(b, source=str(path / "transformer"), checkpoint=""))


def real_class_means(ctx, cfg: Config) -> np.ndarray:
    """mu_c [C, c, h, w]: mean clean latent of each class's real train images (the first mu_max_per_class), encoded
    on the actor pool, streamed from the store when there is one; with data.latents, summed from the stored ones."""
    b, latents = ctx.spec.cfg, ctx.stored_latents()
    sums = ctx.map_real(ClassLatentSums, dict(vae="" if latents else b.vae, vae_scale=b.vae_scale,
                                              gpus=ctx.cfg.compute.gpus_per_actor),
                        per_class=cfg.mu_max_per_class, latents=latents)
    return class_means(sums, ctx.data.num_classes)


def log_diagnostics(ctx, after: DistilledSet, before: DistilledSet | None, mu: np.ndarray) -> None:
    """Per class (MLflow step = class index): mean pairwise cosine of the final latents and the distance
    of their mean to mu_c, after CGS and (if sampled) before it, from the same noise; then class means."""
    sums: dict[str, list[float]] = {}
    for c in range(ctx.data.num_classes):
        m = {}
        for tag, s in (("after", after), ("before", before)):
            if s is None:
                continue
            z = s.take(torch.nonzero(s.labels == c).flatten()).latents.float()   # [IPC, c, h, w]: one unit's file
            m[f"cgs/dist_{tag}"] = mean_distance(z, torch.from_numpy(mu[c]))
            if len(z) > 1:
                m[f"cgs/cos_{tag}"] = mean_pairwise_cosine(z)
        ctx.log_metrics(m, step=c)
        for k, v in m.items():
            sums.setdefault(k, []).append(v)
    ctx.log_metrics({k.replace("cgs/", "cgs/mean_"): float(np.mean(v)) for k, v in sums.items()})


@register_method("rsm_cgs", Config, check=check)
def run(ctx, cfg: Config):
    if cfg.rsm:                                                # stage 1: sample from the RSM-fine-tuned DiT
        ctx = dataclasses.replace(ctx, backbone=rsm_finetune(ctx, cfg))
    if not cfg.cgs:
        return ctx.generate(ctx.rows(per_class=ctx.cfg.ipc))   # i.i.d. sampling, batches mix classes
    rows = ctx.rows(per_class=ctx.cfg.ipc, by_class=True)      # stage 2: one class = one unit = one batch
    mu = real_class_means(ctx, cfg)                            # [C, c, h, w], once per run
    class_ids = ctx.spec.class_ids                  # the sampler's y are backbone class ids
    post_step = partial(cgs_post_step, mu=mu, class_ids=class_ids,
                        eta_dpp=cfg.eta_dpp, eta_dm=cfg.eta_dm, eps=cfg.eps, on=cfg.on)
    distilled = ctx.generate(rows, post_step_factory=post_step)
    before = ctx.generate(rows) if cfg.compare_unguided else None   # same rows = same noise, CGS off
    log_diagnostics(ctx, distilled, before, mu)
    return distilled
