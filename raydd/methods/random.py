"""random: a random subset of the real training images at the same IPC (DD-Ranking's reference).

Each class's pick is a function of (run seed, class) only (raydd.generate.random_picks, which the
evaluation's DD-Ranking reference uses too). From a store only the picked images are read, in one pass; on Ray
they are staged (ctx.real_rows), so the driver never holds the set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raydd.generate import random_picks
from raydd.methods import register_method


@dataclass
class Config:
    """random has no hyperparameters."""


@register_method("random", Config)
def run(ctx, cfg: Config):
    picks = random_picks(ctx.data.part("train").y, ctx.cfg.ipc, ctx.cfg.seed)                  # [C * IPC], class-major
    return ctx.real_rows(picks.numpy(), torch.arange(ctx.cfg.ipc).repeat(ctx.data.num_classes).numpy())
