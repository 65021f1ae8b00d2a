"""ims3: inversion-matching fine-tuning (IM) + selective subgroup sampling (S3) against distributional aggregation.

Paper: "IMS3: Breaking Distributional Aggregation in Diffusion-Based Dataset Distillation" (seed 002).
  Stage 1, IM (Ray Train, cached per config): DiffFit-style PEFT of the DiT (biases, norms, scale
      factors, class embedding) on the real train split with
          L = L_diff + lambda_IM (1 - cos(z_t^inv, z_t))                     (raydd/objectives/inversion.py)
      z_t the forward-noised latent, z_t^inv the model's DDIM inversion of z0 to the same step.
  Stage 2, S3 (training-free): per class G candidate subgroups of IPC images; a frozen encoder phi;
      choose one subgroup per class minimising (raydd/subgroups.py)
          alpha sum_i log(1 - cos(c_{i,g_i}, r_i)) - w sum_i sum_{j!=i} log(1 - cos(c_{i,g_i}, c_{j,g_j}))
      w = beta/2 (ims3.separation=reference: the reference code's beta sum_{i<j}, under which its alpha = 0.4,
      beta = 0.9 were tuned) or beta/(C-1) (separation=paper: the paper's form, (C-1)/2 times weaker)
      by coordinate descent from the closest-to-real start: one global step between the per-class
      stages (generate + encode on the actors; take the chosen groups).
Ablations: ims3.finetune=false (+S3 only), ims3.s3=false (+IM only); both false is `dit` (same noise).

Encoder: the paper uses an ImageNet ResNet-18: ims3.encoder=timm:resnet18.tv_in1k (torchvision's weights
through timm, from the local HF cache; images resized and centre-cropped to 224 and normalised as timm's
eval transform does). The default, "teacher", is a raydd classifier trained on the real train split with
raydd.protocols.train_teacher (the soft protocol's teacher job, shared cache), its penultimate features.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

import raydd.objectives.inversion  # noqa: F401  registers the fine-tuning loss term "im"
from raydd.config import ConfigError
from raydd.finetune import finetune, finetune_config
from raydd.generate import BackboneSpec, DistilledSet, StagedSet
from raydd.methods import register_method
from raydd.sampling import sample_seed
from raydd.subgroups import SEPARATIONS, EncodeImages, class_centroids, s3_search, subgroup_centroids

SMOKE_FINETUNE_STEPS = 8   # --smoke: the same fine-tuning job, a few steps


@dataclass
class Config:
    finetune: bool = True          # stage 1: IM fine-tuning (false: sample the given backbone)
    s3: bool = True                # stage 2: selective subgroup sampling (false: IPC i.i.d. samples per class)
    # --- IM fine-tuning (raydd.finetune.finetune_loop) ---
    lambda_im: float = 0.002       # lambda_IM, weight of 1 - cos(z_t^inv, z_t) (paper 0.002)
    inversion_steps: int = 2       # DDIM steps of the inversion z0 -> z_t^inv (the reference code: 1)
    im_matrix: bool = False        # the reference code's B x B cosine average instead of per-sample cosines
    peft: str = "difffit"          # "difffit" (paper) | "full"
    epochs: float = 8.0            # passes over the real train split (paper 8)
    steps: int = 0                 # > 0 overrides epochs: optimizer steps
    batch: int = 8                 # real latents per step and worker (paper 8)
    lr: float = 1e-3               # AdamW learning rate (paper 1e-3)
    ema: float = 0.9999            # EMA decay of the weights sampled from (the reference pipeline's; 0 = last weights)
    finetune_seed: int = 0         # fixed (not the run seed), so every run seed reuses one fine-tune
    # --- S3 ---
    G: int = 5                     # candidate subgroups per class
    K: int = 200                   # K_i, real images per class averaged into r_i (capped at what the class has)
    alpha: float = 0.4             # weight of the closeness-to-real term
    beta: float = 0.9              # weight of the inter-class separation term
    separation: str = "reference"  # "reference": beta * sum_{i<j} (the defaults' form) | "paper": beta/(C-1) sum_{i!=j}
    max_sweeps: int = 100          # coordinate-descent sweeps at most (stops when a sweep changes nothing)
    encoder: str = "teacher"       # "teacher" | "timm:<name>" (pretrained, local HF cache)
    encoder_arch: str = ""         # teacher architecture ("" = eval.teacher_arch)
    encoder_epochs: int = 0        # teacher epochs (0 = eval.teacher_epochs)


def check(cfg: Config, run=None) -> None:
    """Allowed values and ranges (called by the registry before anything starts)."""
    if cfg.peft not in ("difffit", "full"):
        raise ConfigError(f"ims3.peft={cfg.peft!r}; allowed: difffit, full")
    if cfg.separation not in SEPARATIONS:
        raise ConfigError(f"ims3.separation={cfg.separation!r}; allowed: {', '.join(SEPARATIONS)}")
    if not (cfg.encoder == "teacher" or cfg.encoder.startswith("timm:")):
        raise ConfigError(f"ims3.encoder={cfg.encoder!r}; allowed: teacher, timm:<model name>")
    if cfg.G < 1 or cfg.K < 1 or cfg.batch < 1 or cfg.inversion_steps < 1 or cfg.lambda_im < 0:
        raise ConfigError("ims3: need G >= 1, K >= 1, batch >= 1, inversion_steps >= 1, lambda_im >= 0")
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"ims3.ema={cfg.ema} must be in [0, 1)")


def im_finetune(ctx, cfg: Config) -> BackboneSpec:
    """Stage 1: DiffFit PEFT with L_diff + lambda_IM L_IM; returns the fine-tuned backbone's spec
    (`<dir>/transformer`, loadable as backbone.source by any method). Logs the loss curve."""
    b, n = ctx.spec.cfg, len(ctx.data.part("train"))                  # its labels: the images stay where they are
    steps = cfg.steps or math.ceil(cfg.epochs * n / (cfg.batch * ctx.cfg.compute.train_workers))
    if ctx.cfg.smoke:
        steps = min(steps, SMOKE_FINETUNE_STEPS)
    config = finetune_config(b.checkpoint or b.source, ctx.cfg.data, ctx.cfg.sampler, steps=steps, batch=cfg.batch,
                             lr=cfg.lr, peft=cfg.peft, terms={"im": cfg.lambda_im},
                             term_options={"im": {"inversion_steps": cfg.inversion_steps, "im_matrix": cfg.im_matrix}},
                             seed=cfg.finetune_seed, ema=cfg.ema, latent_size=b.latent_size, vae=b.vae,
                             vae_scale=b.vae_scale)
    path = finetune(ctx, config)
    curve = json.loads((path / ("history.json" if (path / "history.json").exists() else "metrics.json")).read_text())
    for h in curve if isinstance(curve, list) else [curve]:              # the curve: loss, mse, vb, im
        ctx.log_metrics({f"finetune/{k}": v for k, v in h.items() if k != "step"}, step=int(h["step"]))
    ctx.log_metrics({"finetune_steps": steps})
    return dataclasses.replace(ctx.spec, cfg=dataclasses.replace(b, source=str(path / "transformer"), checkpoint=""))


def encoder_spec(ctx, cfg: Config) -> dict:
    """phi: a pretrained timm model, or the real-data teacher (trained once, cached under teachers/)."""
    if cfg.encoder.startswith("timm:"):
        return {"kind": "timm", "name": cfg.encoder[len("timm:"):]}
    path = ctx.real_classifier(cfg.encoder_arch, cfg.encoder_epochs)
    d = ctx.cfg.data
    return {"kind": "student", "arch": cfg.encoder_arch or ctx.cfg.eval.teacher_arch, "path": str(path),
            "num_classes": ctx.data.num_classes, "channels": d.channels, "image_size": d.image_size}


def encode(ctx, encoder: dict, images: dict[str, np.ndarray], labels: torch.Tensor) -> torch.Tensor:
    """phi on the actor pool (a class is a unit): images (a set's image_columns, or {"image": uint8 [N,C,H,W]}) ->
    l2-normalised features [N, D], in row order."""
    out = ctx.map_rows(EncodeImages, {"encoder": encoder, "gpus": ctx.cfg.compute.gpus_per_actor},
                       {"class_idx": labels.numpy(), **images}, unit=labels.numpy())
    return torch.from_numpy(np.stack(out["feature"]))


def real_reference(ctx, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K_i real train images per class (a seeded pick; all of a class if it has fewer): (x uint8, y). From a store
    only the picked images are read."""
    train = ctx.data.part("train")
    y, picks = train.y, []
    for c in range(ctx.data.num_classes):
        idx = torch.nonzero(y == c).flatten()
        g = torch.Generator().manual_seed(sample_seed(ctx.cfg.seed, c, 0, "s3-real"))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:K]])
    picked = train.take(torch.cat(picks))
    return picked.x, picked.y


def selective_subgroup_sampling(ctx, cfg: Config) -> DistilledSet | StagedSet:
    """Stage 2: G x IPC candidates per class -> features -> global choice g* -> IPC images per class."""
    ipc, C = ctx.cfg.ipc, ctx.data.num_classes
    cand = ctx.generate(ctx.rows(per_class=cfg.G * ipc, stream="s3"))     # per class, slots 0 .. G*IPC-1
    group = cand.slots // ipc                                             # subgroup g of each candidate
    encoder = encoder_spec(ctx, cfg)
    f_syn = encode(ctx, encoder, cand.image_columns(), cand.labels)       # [C*G*IPC, D], read on the actors
    x_real, y_real = real_reference(ctx, cfg.K)
    f_real = encode(ctx, encoder, {"image": x_real.numpy()}, y_real)      # [sum_i K_i, D]
    c = subgroup_centroids(f_syn, cand.labels, group, C, cfg.G)           # c_{i,g}  [C, G, D]
    r = class_centroids(f_real, y_real, C)                                # r_i      [C, D]
    res = s3_search(c, r, cfg.alpha, cfg.beta, cfg.max_sweeps, cfg.separation)   # the global step
    cos_real = torch.nn.functional.cosine_similarity(c, r[:, None], dim=-1)   # [C, G]
    ctx.log_metrics({"s3/objective_start": res.objective_start, "s3/objective_end": res.objective_end,
                     "s3/sweeps": res.sweeps, "s3/classes_moved": int((res.groups != res.start).sum()),
                     "s3/real_images": len(y_real)})
    ctx.tracker.log_dict({"groups": res.groups.tolist(), "start": res.start.tolist(), "trace": res.trace,
                          "objective_start": res.objective_start, "objective_end": res.objective_end,
                          "cos_to_real": cos_real.tolist(), "alpha": cfg.alpha, "beta": cfg.beta, "G": cfg.G,
                          "separation": cfg.separation},
                         "s3.json")
    keep = torch.from_numpy(res.groups)[cand.labels] == group             # candidates in the chosen groups
    idx = torch.nonzero(keep).flatten()
    return cand.subset(idx, slots=cand.slots[idx] % ipc).sorted()        # slot within the class: 0 .. IPC-1; rows only


@register_method("ims3", Config, check=check)
def run(ctx, cfg: Config):
    if cfg.finetune:                                           # stage 1: sample from the IM-fine-tuned DiT
        ctx = dataclasses.replace(ctx, backbone=im_finetune(ctx, cfg))
    if not cfg.s3:
        return ctx.generate(ctx.rows(per_class=ctx.cfg.ipc))   # IPC i.i.d. samples per class (dit's rows)
    return selective_subgroup_sampling(ctx, cfg)
