"""random: a random subset of the real training images at the same IPC (DD-Ranking's reference).

Each class's pick is a function of (run seed, class) only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raydd.data import DataError, Split
from raydd.generate import DistilledSet
from raydd.methods import register_method
from raydd.sampling import sample_seed


@dataclass
class Config:
    """random has no hyperparameters."""


def random_subset(train: Split, ipc: int, seed: int) -> DistilledSet:
    counts = torch.bincount(train.y)
    if int(counts.min()) < ipc:
        raise DataError(f"ipc={ipc} is larger than the real pool: class {int(counts.argmin())} has only "
                        f"{int(counts.min())} training images")
    picks = []
    for c in range(len(counts)):
        idx = torch.nonzero(train.y == c).flatten()
        g = torch.Generator().manual_seed(sample_seed(seed, c, 0, "random"))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    idx = torch.cat(picks)
    return DistilledSet(images=train.x[idx], labels=train.y[idx],
                        slots=torch.arange(ipc).repeat(len(counts)))


@register_method("random", Config)
def run(ctx, cfg: Config):
    return random_subset(ctx.data.train, ctx.cfg.ipc, ctx.cfg.seed)
