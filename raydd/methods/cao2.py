"""cao2: objective-guided sample selection + condition-aware latent optimisation (CaO2, seed 004).

Algorithm 1 of the paper, per class c with N = IPC:
  1. Pool: m*N samples from the frozen generator (default: DiT with CFG; `generator=<method>` takes
     another registered method's output instead: that method is run through its own run() with
     ipc = m*N, its own settings from `<method>.<field>` keys).
  2. Objective-guided selection: a selector classifier (trained on the real train split, or
     `selector=<checkpoint>`) scores the decoded pool; keep the N correctly classified samples
     with the highest confidence at low IPC, the lowest (still correct) at high IPC; pad with
     incorrect ones only if fewer than N are correct (raydd.selection.confidence_selection).
     Threshold of `order=auto`: most confident for IPC < 50, least confident from IPC 50 on
     (`least_from_ipc`; the reference code uses "most" at IPC 10 and "least" at IPC 50; the
     paper's Fig. 3c finds "most" best in most settings, so set `order=most` to always use it).
  3. Condition-aware latent optimisation of the kept latents against the frozen DiT
     (raydd.objectives.latent_opt): Adam, random TRUE timesteps t ~ U[1, T_hat], fixed noise per
     image, loss ||eps_phi(x_t, c_hat, t) - eps||^2 + lambda ||eps_phi - eps||_inf, ||x_bar - x||_inf <= eta,
     c_hat = the true class (easy tasks) or the null class (hard tasks). Then decode.

Task-oriented defaults (Sec. 3.4 / 4.3 / App. 8): the paper treats ImageWoof and ImageNet-1K as
"hard" (m = 4, T_hat = T/8, c_hat = null) and ImageNette / ImageNet-100 as "easy" (m = 2,
T_hat = T/2, c_hat = true). `task=auto` is hard for the imagewoof / imagenet1k class sets, easy
otherwise (digits included). The pool is sampled at CFG 2.7 as in the paper and its reference code
(`cao2.cfg_scale`; 0 = `sampler.cfg_scale`, the `dit` baseline's 4.0, so the two differ only by CaO2's
stages). Ablations: `select=false` (optimisation alone, on IPC plain samples),
`optimize=false` (selection alone).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from raydd.config import ConfigError
from raydd.data import subset_classes
from raydd.generate import DistilledSet, StagedSet
from raydd.methods import get_method, register_method
from raydd.objectives.latent_opt import NULL_COND, LatentOptBatches
from raydd.outputs import grid_rows, image_grid
from raydd.sampling import sample_seed
from raydd.selection import SelectorScores, confidence_selection, load_selector
from raydd.students import pretrained_timm

WNIDS = set(subset_classes("imagenet1k"))

HARD_SUBSET, HARD_MIN_CLASSES = "imagewoof", 1000   # the paper's "hard" tasks: ImageWoof's dog breeds, IN-1K


@dataclass
class Config:
    task: str = "auto"             # "easy" | "hard" | "auto" (hard: imagewoof/imagenet1k); fills the 0/"auto" fields
    m: int = 0                     # pool size factor: m*IPC candidates per class (0 = auto: 2 easy, 4 hard)
    cfg_scale: float = 2.7         # the pool's classifier-free guidance scale (paper: 2.7); 0 = sampler.cfg_scale
    select: bool = True            # stage 1, objective-guided selection (false: no pool, IPC plain samples)
    order: str = "auto"            # "most" | "least" confident of the correct | "auto": most if IPC < least_from_ipc
    least_from_ipc: int = 50       # auto order: least confident from this IPC on (reference code: 10 most, 50 least)
    selector: str = ""             # selector checkpoint (safetensors) | "timm:<name>" (pretrained 1000-way, e.g. the
                                   #   paper's timm:resnet18.tv_in1k; ImageNet classes) | "" = train one, cached
    selector_arch: str = ""        # "" = eval.teacher_arch (convnet_d3 on digits, resnet18 on ImageNet presets)
    selector_epochs: int = 0       # 0 = eval.teacher_epochs (then the selector IS the soft-label teacher's cache entry)
    optimize: bool = True          # stage 2, condition-aware latent optimisation
    iterations: int = 100          # Adam iterations per image
    lr: float = 6e-4               # Adam learning rate
    lam: float = 10.0              # lambda: weight of the L_inf residual term
    t_hat: float = 0.0             # T_hat / T (T = 1000 train steps): t ~ U[1, T_hat] (0 = auto: 1/2 easy, 1/8 hard)
    condition: str = "auto"        # c_hat: "true" label | "null" label | "auto" (true easy, null hard)
    eta: float = 0.0               # ||x_bar - x||_inf <= eta (0 = lr*iterations ~ the most Adam moves; paper: no value)
    generator: str = "dit"         # registered method whose output CaO2 refines (pool: its run() with ipc = m*IPC)


def check(cfg: Config, run=None) -> None:
    """Allowed values and ranges (called by the registry before anything starts; m = 0 and the other 0 /
    "auto" values mean the task's defaults)."""
    allowed = {"task": ("auto", "easy", "hard"), "order": ("auto", "most", "least"),
               "condition": ("auto", "true", "null")}
    for key, values in allowed.items():
        if getattr(cfg, key) not in values:
            raise ConfigError(f"cao2.{key}={getattr(cfg, key)!r} is not allowed; allowed: {', '.join(values)}")
    if cfg.generator == "cao2":
        raise ConfigError("cao2.generator=cao2 would recurse; name another method (e.g. dit)")
    try:
        get_method(cfg.generator)
    except ValueError as e:                                      # unknown: the message lists the methods
        raise ConfigError(f"cao2.generator: {e}") from None
    for key, ok in (("m", cfg.m >= 0), ("iterations", cfg.iterations >= 1), ("lr", cfg.lr > 0), ("lam", cfg.lam >= 0),
                    ("cfg_scale", cfg.cfg_scale == 0 or cfg.cfg_scale >= 1),
                    ("t_hat", 0 <= cfg.t_hat <= 1), ("eta", cfg.eta >= 0), ("least_from_ipc", cfg.least_from_ipc >= 1),
                    ("selector_epochs", cfg.selector_epochs >= 0)):
        if not ok:
            raise ConfigError(f"cao2.{key}={getattr(cfg, key)} is out of range")


def resolve(ctx, cfg: Config) -> Config:
    """Fill the task-dependent defaults (the 0 / "auto" fields)."""
    check(cfg)
    # auto: decided from the classes themselves (any subset of ImageWoof's fine-grained dog breeds, or 1000+
    # classes), not from the class-set's name, so a comma list of Woof wnids is hard too
    names = ctx.data.class_names
    hard = cfg.task == "hard" or (cfg.task == "auto" and (set(names) <= set(subset_classes(HARD_SUBSET))
                                                          or len(names) >= HARD_MIN_CLASSES))
    order = cfg.order if cfg.order != "auto" else ("most" if ctx.cfg.ipc < cfg.least_from_ipc else "least")
    return dataclasses.replace(
        cfg, task="hard" if hard else "easy", order=order, m=cfg.m or (4 if hard else 2),
        t_hat=cfg.t_hat or (1 / 8 if hard else 1 / 2), condition=cfg.condition if cfg.condition != "auto" else
        ("null" if hard else "true"), eta=cfg.eta or cfg.lr * cfg.iterations,
        selector_arch=cfg.selector_arch or ctx.cfg.eval.teacher_arch,
        selector_epochs=cfg.selector_epochs or ctx.cfg.eval.teacher_epochs)


def selector_path(ctx, cfg: Config) -> str:
    """The user's checkpoint (checked now: missing / wrong shape fails before sampling), or a classifier
    trained on the real train split by raydd.protocols.train_teacher, cached like the soft-label teacher."""
    c, d = ctx.cfg, ctx.data
    if cfg.selector.startswith("timm:"):
        if not set(d.class_names) <= WNIDS:
            raise ConfigError(f"cao2.selector={cfg.selector}: a 1000-way ImageNet selector needs ImageNet classes "
                              f"(wnids); this run's are {d.class_names[:5]}")
        pretrained_timm(cfg.selector[len("timm:"):], "cpu")   # fails now, before sampling, if not in the HF cache
        return cfg.selector
    if cfg.selector:
        load_selector(cfg.selector, cfg.selector_arch, d.num_classes, c.data.channels, c.data.image_size)
        return cfg.selector
    return str(ctx.real_classifier(cfg.selector_arch, cfg.selector_epochs))


def sample_pool(ctx, cfg: Config, per_class: int) -> DistilledSet:
    """per_class candidates of every class from the generator at CFG cfg.cfg_scale, in (label, slot) order."""
    sampler = dataclasses.replace(ctx.cfg.sampler, cfg_scale=cfg.cfg_scale or ctx.cfg.sampler.cfg_scale)
    sub = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, ipc=per_class, sampler=sampler),
                              backbone=lambda: ctx.spec)
    if cfg.generator == "dit":
        return sub.generate(sub.rows(per_class=per_class, stream="pool"))
    return sub.run_method(cfg.generator, per_class).sorted()


def selection_stats(probs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, conf: torch.Tensor, ipc: int) -> dict:
    """Pool accuracy of the selector, confidence p(y|x) of the kept vs the dropped, classes that needed padding."""
    correct = probs.argmax(1) == labels
    dropped = torch.ones(len(labels), dtype=torch.bool)
    dropped[idx] = False
    padded = sum(int(correct[idx][labels[idx] == c].sum()) < ipc for c in labels.unique().tolist())
    return {"cao2/pool_correct_frac": float(correct.float().mean()),
            "cao2/kept_correct_frac": float(correct[idx].float().mean()),
            "cao2/conf_kept_mean": float(conf[idx].mean()),
            "cao2/conf_dropped_mean": float(conf[dropped].mean()) if dropped.any() else float("nan"),
            "cao2/classes_padded": padded}


def select(ctx, cfg: Config, pool: DistilledSet | StagedSet) -> DistilledSet | StagedSet:
    """Stage 1: score the decoded pool with the selector (on the actors), keep IPC per class (their rows)."""
    ipc, C, d = ctx.cfg.ipc, ctx.data.num_classes, ctx.cfg.data
    path = selector_path(ctx, cfg)
    cols = ctx.map_rows(SelectorScores, dict(path=path, arch=cfg.selector_arch, num_classes=C, channels=d.channels,
                                             image_size=d.image_size, class_ids=ctx.spec.class_ids,
                                             **ctx.actor_resources()),
                       pool.image_columns())                                      # read on the actors
    probs = torch.from_numpy(cols["probs"])                                       # p(k | x)  [N_pool, C]
    idx, conf = confidence_selection(probs, pool.labels, ipc, cfg.order)          # [C*ipc], p(y | x) [N_pool]
    ctx.log_metrics(selection_stats(probs, pool.labels, idx, conf, ipc))
    return pool.subset(idx, slots=torch.arange(ipc).repeat(C), scores=conf[idx])     # rows: nothing read yet


def optimize(ctx, cfg: Config, kept: DistilledSet | StagedSet) -> DistilledSet | StagedSet:
    """Stage 2: condition-aware latent optimisation of the kept latents on the actors, then decode. The actors read
    the kept rows and write the optimised set (on Ray: the driver reads only the before/after grid's images)."""
    T = ctx.cfg.sampler.train_timesteps
    t_hat = max(1, min(round(cfg.t_hat * T), T - 1))                             # T_hat in true timesteps
    class_ids = torch.tensor(ctx.spec.class_ids)
    cond = class_ids[kept.labels] if cfg.condition == "true" else torch.full_like(kept.labels, NULL_COND)
    nan = torch.full((len(kept),), float("nan"))
    cols = {"class_idx": kept.labels.numpy(), "slot": kept.slots.numpy(), "cond": cond.numpy(),
            "score": (nan if kept.scores is None else kept.scores).numpy(),
            "seed": np.array([sample_seed(ctx.cfg.seed, int(c), int(s), "cao2-opt")       # fixed eps, t draws
                              for c, s in zip(kept.labels, kept.slots)], dtype=np.int64)}
    # the kept latents [N, c, h, w], or real images (generator=random) that the UDF encodes: of a StagedSet, where
    # the actors read them
    cols |= kept.columns("latent") or kept.columns("image")
    optimized, out = ctx.map_set(LatentOptBatches, dict(spec=ctx.spec, sampler=ctx.cfg.sampler,
                                                        iterations=cfg.iterations, lr=cfg.lr, lam=cfg.lam, t_hat=t_hat,
                                                        eta=cfg.eta, precision=ctx.cfg.compute.precision,
                                                        **ctx.actor_resources()), cols)     # (label, slot) order
    curve = out["loss_curve"].mean(axis=0)                                         # mean over images [iterations]
    for k, v in enumerate(curve):
        ctx.log_metrics({"cao2/latent_loss": float(v)}, step=k)
    ctx.log_metrics({"cao2/objective_before": float(out["objective_before"].mean()),   # E_t on a fixed t grid
                     "cao2/objective_after": float(out["objective_after"].mean()),
                     "cao2/objective_improved_frac": float((out["objective_after"] < out["objective_before"]).mean()),
                     "cao2/t_hat": t_hat, "cao2/eta": cfg.eta})
    k = min(ctx.cfg.ipc, 5)                                   # before | after, a row per class (of the first 20)
    rows = grid_rows(optimized.labels, per_class=k)           # both sets in (label, slot) order: the same rows
    before, after = kept.sorted().take(rows), optimized.take(rows)                # only the grid's are read
    by_class = [before.labels == c for c in before.labels.unique()]
    grid = torch.cat([torch.cat([before.images[m], after.images[m]]) for m in by_class])
    labels = torch.cat([before.labels[m].repeat(2) for m in by_class])
    ctx.tracker.log_images("cao2_before_after", image_grid(grid, labels, per_class=2 * k, names=ctx.data.class_names))
    return optimized if kept.scores is not None else dataclasses.replace(optimized, scores=None)


@register_method("cao2", Config, check=check)
def run(ctx, cfg: Config):
    cfg = resolve(ctx, cfg)
    ctx.tracker.log_dict(dataclasses.asdict(cfg), "cao2_resolved.json")   # the task-dependent values it used
    if cfg.select:
        selector_path(ctx, cfg)                   # train it now, or fail on a bad checkpoint before sampling
    pool = sample_pool(ctx, cfg, cfg.m * ctx.cfg.ipc if cfg.select else ctx.cfg.ipc)     # m*IPC per class
    kept = select(ctx, cfg, pool) if cfg.select else dataclasses.replace(pool, scores=None)
    return (optimize(ctx, cfg, kept) if cfg.optimize else kept).sorted()
