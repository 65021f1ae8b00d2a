"""random: a random subset of the real training images at the same IPC (DD-Ranking's reference).

Each class's pick is a function of (run seed, class) only (raydd.generate.random_subset, which the
evaluation's DD-Ranking reference uses too). From a store only the picked images are read.
"""
from __future__ import annotations

from dataclasses import dataclass

from raydd.generate import random_subset
from raydd.methods import register_method


@dataclass
class Config:
    """random has no hyperparameters."""


@register_method("random", Config)
def run(ctx, cfg: Config):
    return random_subset(ctx.data.part("train"), ctx.cfg.ipc, ctx.cfg.seed)
