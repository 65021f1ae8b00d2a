"""igds: information-guided diffusion sampling (IGDS, seed 001) — ascend I(X;Y) + β·H(X|Y) while sampling.

1. Variational estimator (VE) on the real train split (a Ray Train job, cached by config hash):
   encoder f_θ by MoCo-style instance discrimination (τ = 0.07) + λ·E KL(σ(x̂) ‖ Q_y), then a
   classifier g_ψ on the frozen encoder; Q_y (class means of σ(x̂)) is stored with the weights.
   Or bring one: igds.ve_checkpoint=<dir> (a missing or ill-fitting checkpoint is an error).
2. Estimates: Î(X;Y) = H(Ŷ) + E log P(ŷ=y|x),  Ĥ(X|Y) = E KL(σ(x̂) ‖ Q_y)   (objectives/information.py).
3. Sampling: at every step i in the window, eps_tilde = eps_hat − η·ρ_t·∇_{x_t} J on the decoded x̂0,
   J = Î(X;Y) + β·Ĥ(X|Y) in its per-sample form (H(Ŷ) at the uniform marginal: a sample's guidance
   does not depend on its batch mates); β grows with IPC (≈0 at IPC 1, ≈0.5 at IPC 50+); ρ_t as
   `sampler.guidance_norm` says (default IGD's β_t·‖ε̂‖/‖g‖, raydd.sampling.Guidance).
   Not the paper's Alg. 2 literally: there the VE reads the intermediate x'_{t−1} and x_{t−1} =
   x'_{t−1} + η∇L, unnormalised, over 250 steps; raydd guides ε̂ through x̂0 like the other guided
   methods, so the step is scale-free and one helper serves all of them.
Logged: the VE's training curve and its estimates on real data and on the distilled set, and the
guidance cost `guidance_s_per_image` (wall seconds of guided sampling per distilled image).
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from raydd.config import ConfigError
from raydd.methods import register_method
from raydd.objectives.information import (VE_CURVE, InformationTerms, load_ve, make_guidance, set_estimates, ve_config,
                                          ve_files, ve_train_loop)
from raydd.sampling import warn_guidance_scheduler

SMOKE_VE = {"steps": 30, "cls_steps": 20, "batch": 32}   # --smoke: the same job, a few steps


@dataclass
class Config:
    beta: float = -1.0          # β, weight of Ĥ(X|Y) in J; < 0 = the IPC rule below
    beta_max: float = 0.5       # rule β(IPC) = beta_max·min(1, ln IPC / ln 50): 0 at IPC 1, .29 at 10, .5 at 50+
    eta: float = 2.0            # η, guidance scale: ε̃ = ε̂ − η·ρ_t·g, ρ_t = β_t‖ε̂‖/‖g‖ (sampler.guidance_norm);
                                #   on digits-latent samples break near η = 5 (README, "Guided methods on latents")
    window_lo: float = 0.0      # guidance window as fractions of the trajectory: 0 = cleanest step,
    window_hi: float = 1.0      #   1 = noisiest (paper: every step)
    mode: str = "x0"            # "x0": ε̂ held constant, ∇ through the VAE decoder and the VE only (the paper
                                #   differentiates the VE alone, at x'_{t−1}); "full": also back through the DiT
    ve_checkpoint: str = ""     # a trained VE (dir with ve.safetensors + ve.json, or that file); "" = train one
    ve_encoder: str = "convnet_d3"  # f_θ architecture (any raydd student name)
    ve_width: int = 64          # convnet_dN encoders: channels per block
    ve_embed_dim: int = 128     # D, the embedding x̂ (and σ(x̂)) dimension
    ve_tau: float = 0.07        # τ, InfoNCE temperature (paper 0.07)
    ve_lambda: float = 0.1      # λ, weight of E KL(σ(x̂) ‖ Q_y) in J_VE
    ve_queue: int = 4096        # MoCo queue length (capped at half the train split)
    ve_momentum: float = 0.99   # key-encoder EMA
    ve_steps: int = 1000        # encoder steps
    ve_cls_steps: int = 300     # classifier steps on the frozen encoder
    ve_batch: int = 128
    ve_lr: float = 1e-3
    ve_seed: int = 0            # fixed (not the run seed), so every run reuses one VE


def beta_for_ipc(ipc: int, beta_max: float) -> float:
    """IPC-dependent β (paper Fig. 5: ≈0 at IPC 1, ≈0.5 from IPC 50): log-linear in between."""
    return beta_max * min(1.0, math.log(ipc) / math.log(50))


def step_window(lo: float, hi: float, steps: int) -> tuple[int, int]:
    """Fractions of the trajectory -> respaced step indices (0 = cleanest, steps−1 = noisiest)."""
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"igds.window_lo={lo}, igds.window_hi={hi}: need 0 <= window_lo <= window_hi <= 1")
    return round(lo * (steps - 1)), round(hi * (steps - 1))


def ensure_ve(ctx, cfg: Config) -> Path:
    """The VE checkpoint dir: the user's (validated now, before any sampling) or a cached training job."""
    if cfg.ve_checkpoint:
        load_ve(cfg.ve_checkpoint, num_classes=ctx.data.num_classes, channels=ctx.cfg.data.channels)
        return Path(cfg.ve_checkpoint).expanduser().resolve()
    job = dict(encoder=cfg.ve_encoder, width=cfg.ve_width, embed_dim=cfg.ve_embed_dim, tau=cfg.ve_tau,
               lam=cfg.ve_lambda, queue_size=cfg.ve_queue, momentum=cfg.ve_momentum, steps=cfg.ve_steps,
               cls_steps=cfg.ve_cls_steps, batch=cfg.ve_batch, lr=cfg.ve_lr, flip=ctx.cfg.eval.flip, seed=cfg.ve_seed)
    if ctx.cfg.smoke:
        job |= {k: min(v, job[k]) for k, v in SMOKE_VE.items()}
    return ctx.train_cached("igds_ve", ve_train_loop, ve_config(ctx.cfg.data, **job), reads=("train", "val"))


def log_ve(ctx, path: Path) -> dict:
    """The VE's training curve and its estimates on real data -> MLflow; returns the metadata."""
    _, meta_file = ve_files(path)
    meta = json.loads(meta_file.read_text())
    curve = meta_file.with_name(VE_CURVE)
    for row in json.loads(curve.read_text()) if curve.exists() else []:
        ctx.log_metrics({f"ve/{k}": v for k, v in row.items() if k not in ("step", "phase")}, step=row["step"])
    for split, est in meta.get("estimates", {}).items():
        ctx.log_metrics({f"ve/{k}_real_{split}": v for k, v in est.items() if k != "n"})
    ctx.tracker.log_dict(meta, "igds_ve.json")
    return meta


def check(cfg: Config, run=None) -> None:
    """Allowed values and ranges (called by the registry before anything starts)."""
    if cfg.mode not in ("full", "x0"):
        raise ConfigError(f"igds.mode={cfg.mode!r}; allowed: full, x0")
    if not 0 <= cfg.window_lo <= cfg.window_hi <= 1:
        raise ConfigError(f"igds.window_lo={cfg.window_lo}, window_hi={cfg.window_hi}: need 0 <= lo <= hi <= 1")
    for key in ("ve_width", "ve_embed_dim", "ve_queue", "ve_steps", "ve_batch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"igds.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.eta < 0 or cfg.beta_max < 0 or cfg.ve_tau <= 0 or cfg.ve_lr <= 0 or cfg.ve_cls_steps < 0:
        raise ConfigError("igds: need eta >= 0, beta_max >= 0, ve_tau > 0, ve_lr > 0 and ve_cls_steps >= 0")
    if run is not None and cfg.eta > 0:
        warn_guidance_scheduler("igds", run.sampler)


@register_method("igds", Config, prepare=ensure_ve, check=check)   # a sweep trains the VE once, before its trials
def run(ctx, cfg: Config):
    window = step_window(cfg.window_lo, cfg.window_hi, ctx.cfg.sampler.steps)
    beta = cfg.beta if cfg.beta >= 0 else beta_for_ipc(ctx.cfg.ipc, cfg.beta_max)

    # 1. the variational estimator (the user's, or trained once per config)
    ve_path = ensure_ve(ctx, cfg)
    log_ve(ctx, ve_path)

    # 3. sampling with J = Î(X;Y) + β·Ĥ(X|Y); the factory loads the VE once per actor
    factory = functools.partial(make_guidance, ve_path=str(ve_path), beta=beta, scale=cfg.eta, window=window,
                                mode=cfg.mode, class_ids=ctx.spec.class_ids)
    rows = ctx.rows(per_class=ctx.cfg.ipc)
    ctx.spec                                  # build/load the backbone before the clock starts
    t0 = time.time()
    distilled = ctx.generate(rows, factory)
    seconds = time.time() - t0

    # 2. the estimates on what we made (same VE, same definitions as on real data), its images read on the actors
    terms = ctx.map_rows(InformationTerms, dict(ve_path=str(ve_path), num_classes=ctx.data.num_classes,
                                                **ctx.actor_resources()),
                         {"class_idx": distilled.labels.numpy(), **distilled.image_columns()})
    est = set_estimates(*(torch.from_numpy(terms[k]) for k in ("p", "log_p_y", "kl")), distilled.labels)
    ctx.log_metrics({"igds/beta": beta, "igds/eta": cfg.eta, "guidance_s_per_image": seconds / len(distilled),
                     **{f"ve/{k}_distilled": v for k, v in est.items() if k != "n"}})
    ctx.tracker.log_dict({"beta": beta, "window": list(window), "config": asdict(cfg), "estimates_distilled": est,
                          "guidance_s_per_image": seconds / len(distilled)}, "igds.json")
    return distilled
