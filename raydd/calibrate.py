"""python -m raydd.calibrate --method igds|lgd [--scales 0.3,1,3] [--norm variance|eps] [--preset digits-latent] [--smoke]

Calibrate a guided method's scale: the same noises (5 per class, run seed 0) sampled unguided and at each
scale, in-process on the preset's backbone (trained and cached on first use), and for each: the objective
the method guides (IGDS: J = Î(X;Y) + β·Ĥ(X|Y) of its VE; LGD: the learnability S of θ_{i−1}, θ*, and the
max cosine to the memory) next to the set diagnostics (teacher_acc, diversity, latent_std). A good scale
raises the objective while teacher_acc and latent_std stay where the unguided set has them.

LGD here is one increment: a 5-IPC `dit` seed set (the memory), θ_{i−1} trained on it, then 5 guided
samples per class; γ moves with λ at the paper's ratio γ/λ = 50/15.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch


def world(preset: str, method: str, norm: str, smoke: bool = False):
    from raydd.config import load_config
    from raydd.context import Context, LocalRunner, NullTracker
    from raydd.prepare import load_data
    from raydd.distill import ensure_backbone

    cfg = load_config(preset, [f"sampler.guidance_norm={norm}"], method=method, smoke=smoke)
    data = load_data(cfg)
    runner = LocalRunner(cfg)
    return cfg, data, runner, Context(cfg, data, ensure_backbone(cfg, data, runner), runner=runner,
                                      tracker=NullTracker())


def igds_objectives(ctx):
    """-> (factory(scale) for ctx.generate, objectives(set) -> {"J": ...})."""
    from raydd.protocols import to_float
    from raydd.methods import igds
    from raydd.objectives.information import load_ve, make_guidance, per_sample_objective

    mcfg = igds.Config()
    ve_path = igds.ensure_ve(ctx, mcfg)
    ve, _ = load_ve(ve_path, num_classes=ctx.data.num_classes)
    beta = igds.beta_for_ipc(ctx.cfg.ipc, mcfg.beta_max)
    window = igds.step_window(mcfg.window_lo, mcfg.window_hi, ctx.cfg.sampler.steps)

    def factory(scale):
        return functools.partial(make_guidance, ve_path=str(ve_path), beta=beta, scale=scale, window=window,
                                 mode=mcfg.mode, class_ids=ctx.spec.class_ids)

    def objectives(ds):
        with torch.no_grad():
            return {"J": float(per_sample_objective(ve, to_float(ds.images), ds.labels, beta).mean())}
    return factory, objectives


def lgd_objectives(ctx, work: Path):
    from raydd.protocols import epochs_for
    from raydd.methods import lgd
    from raydd.objectives.learnability import max_memory_cosine, score_images
    from raydd.outputs import write_distilled
    from raydd.selection import load_selector

    mcfg = lgd.Config()
    seed = ctx.run_method("dit", 5)
    memory = write_distilled(seed, work / "seed", ctx.data.class_names)
    d = ctx.cfg.data
    classify = dict(arch=mcfg.arch, num_classes=ctx.data.num_classes, channels=d.channels, image_size=d.image_size)
    reference = ctx.real_classifier(mcfg.arch, mcfg.reference_epochs)
    theta_path, _ = ctx.set_classifier(memory, mcfg.arch, epochs_for(5, ctx.cfg.eval), work / "theta.safetensors")
    theta, theta_star = load_selector(theta_path, **classify), load_selector(reference, **classify)

    def factory(scale):
        return functools.partial(lgd.learnability_guidance, theta=str(theta_path), reference=str(reference),
                                 memory=str(memory), class_ids=ctx.spec.class_ids, lam=scale,
                                 omega=mcfg.omega, gamma=scale * 50 / 15,
                                 window=lgd.respaced_window(mcfg, ctx.cfg.sampler.steps), mode=mcfg.mode, **classify)

    def objectives(ds):
        s = score_images(theta, theta_star, ds.images, ds.labels, mcfg.omega)
        cos = max_memory_cosine(ds.latents.float(), ds.labels, seed.latents.float(), seed.labels)
        return {"S": float(s.mean()), "memory_cos": float(cos.mean())}
    return factory, objectives


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from raydd.distill import run_cli, set_diagnostics

    p = argparse.ArgumentParser(prog="python -m raydd.calibrate", description=__doc__.split("\n\n")[1])
    p.add_argument("--method", choices=["igds", "lgd"], required=True)
    p.add_argument("--scales", default="0.3,1,3", help="comma list of guidance scales (η for igds, λ for lgd)")
    p.add_argument("--norm", choices=["variance", "eps"], default="variance", help="sampler.guidance_norm")
    p.add_argument("--preset", default="digits-latent")
    p.add_argument("--smoke", action="store_true", help="the preset's smoke sizes (a check that it runs)")
    args = p.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]

    def body():
        cfg, data, runner, ctx = world(args.preset, args.method, args.norm, args.smoke)
        with tempfile.TemporaryDirectory() as work:
            factory, objectives = (igds_objectives(ctx) if args.method == "igds"
                                   else lgd_objectives(ctx, Path(work)))
            rows = ctx.rows(per_class=5, stream="calibrate")
            for scale in [0.0] + scales:
                t0 = time.time()
                ds = ctx.generate(rows, factory(scale) if scale else None)
                row = {"scale": scale, **objectives(ds),
                       **{k.split("/")[1]: v for k, v in set_diagnostics(cfg, data, runner, ds).items()},
                       "seconds": time.time() - t0}
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
