"""dit: plain class-conditional DiT sampling with classifier-free guidance (the "DiT" baseline).

Every other method is measured against this one: IPC samples per class from the frozen backbone,
50-step DDPM, CFG scale `sampler.cfg_scale` (4.0), no selection, no guidance objective.
"""
from __future__ import annotations

from dataclasses import dataclass

from raydd.methods import register_method


@dataclass
class Config:
    """dit has no hyperparameters of its own: its knobs are sampler.cfg_scale and sampler.steps."""


@register_method("dit", Config)
def run(ctx, cfg: Config):
    rows = ctx.rows(per_class=ctx.cfg.ipc)   # (class, slot, seed) for IPC slots of every class
    return ctx.generate(rows)                # sharded sampling, no objective
