"""Selective Subgroup Sampling (S3, IMS3 seed 002): pick one candidate subgroup per class so that
subgroup centroids sit close to their class's real centroid and far from the other classes' picks.

    phi            frozen feature encoder, l2-normalised features on the unit sphere
    r_i            centroid of K_i real images of class i                          [C, D]
    c_{i,g}        centroid of candidate subgroup g (IPC images) of class i        [C, G, D]
    L_S3(g) = alpha * sum_i log(1 - cos(c_{i,g_i}, r_i)) - w * sum_i sum_{j != i} log(1 - cos(c_{i,g_i}, c_{j,g_j}))
    w = beta / (C - 1)   separation="paper": the paper's normalised form
    w = beta / 2         separation="reference": the reference code's beta * sum_{i<j} (no 1/(C-1)), the form its
                         alpha = 0.4, beta = 0.9 were tuned under; (C - 1)/2 times stronger than "paper"
                         (4.5x at C = 10, ~50x at C = 100)
    g* = argmin_g L_S3(g): coordinate descent from the closest-to-real start g_i = argmax_g cos(c_{i,g}, r_i).

Coordinate descent sets one class's group at a time to its exact best reply (others fixed) and
repeats sweeps until nothing changes: L_S3 never increases, so the result is never worse than the
start, but it is a local optimum of a pairwise objective (a different start can find a lower one).
`s3_brute_force` gives the global optimum on small instances (G^C choices) for checking.

The selection sees all classes at once: it is the one global step between two per-class stages
(sharded generation + encoding on the actors, then taking the chosen groups).

Encoders (`load_encoder`): {"kind": "student", "arch", "path", ...}: a raydd classifier (e.g. the
hard-label teacher trained on the real train split), features = the input of its last linear layer
(penultimate); {"kind": "timm", "name"}: a pretrained timm model from the local HF cache with its
classifier removed (the paper: an ImageNet ResNet-18, "resnet18.tv_in1k"), fed as timm's eval transform
feeds it (resize to input / crop_pct, centre crop, the model's mean/std).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raydd.generate import actor_device, images_of, rows_with

LOG_EPS = 1e-6   # log(1 - cos) is clamped at log(1e-6) when two centroids coincide
SEPARATIONS = ("reference", "paper")


def separation_weight(beta: float, num_classes: int, separation: str) -> float:
    """w, the weight of sum_{i != j} log(1 - cos(c_i, c_j)) in L_S3 (module docstring)."""
    if separation not in SEPARATIONS:
        raise ValueError(f"S3 separation {separation!r}; allowed: {', '.join(SEPARATIONS)}")
    return beta / 2 if separation == "reference" else beta / max(num_classes - 1, 1)


# --------------------------------------------------------------------------------------------
# Centroids and the objective
# --------------------------------------------------------------------------------------------
def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature per class: features [N, D], labels [N] -> [C, D] (float64)."""
    f = features.double()
    out = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
    out.index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) == 0:
        raise ValueError(f"class {int(counts.argmin())} has no features to average")
    return out / counts[:, None]


def subgroup_centroids(features: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_classes: int,
                       num_groups: int) -> torch.Tensor:
    """Mean feature per (class, subgroup): features [N, D], labels [N], groups [N] in [0, G) -> [C, G, D]."""
    flat = class_centroids(features, labels * num_groups + groups, num_classes * num_groups)
    return flat.view(num_classes, num_groups, -1)


def _log1m_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(1 - cos(a, b)) along the last dim (broadcasting)."""
    cos = F.cosine_similarity(a, b, dim=-1)
    return torch.log((1 - cos).clamp_min(LOG_EPS))


def s3_objective(c: torch.Tensor, r: torch.Tensor, g, alpha: float, beta: float,
                 separation: str = "reference") -> float:
    """L_S3 for one choice g [C] of subgroups; c [C, G, D], r [C, D]."""
    C = c.shape[0]
    picked = c[torch.arange(C), torch.as_tensor(g)]                         # [C, D]
    rep = _log1m_cos(picked, r).sum()                                       # sum_i log(1 - cos(c_i, r_i))
    if C == 1:
        return float(alpha * rep)
    pair = _log1m_cos(picked[:, None], picked[None, :])                     # [C, C]
    sep = pair.sum() - pair.diagonal().sum()                                # sum over i != j
    return float(alpha * rep - separation_weight(beta, C, separation) * sep)


@dataclass
class S3Result:
    groups: np.ndarray            # [C] chosen subgroup per class (g*)
    start: np.ndarray             # [C] closest-to-real start
    objective_start: float        # L_S3(start)
    objective_end: float          # L_S3(groups)
    sweeps: int                   # coordinate-descent sweeps run (the last one changed nothing)
    trace: list = field(default_factory=list)   # L_S3 after each sweep


def s3_search(c: torch.Tensor, r: torch.Tensor, alpha: float = 0.4, beta: float = 0.9,
              max_sweeps: int = 100, separation: str = "reference") -> S3Result:
    """Coordinate descent on L_S3 from the closest-to-real start; c [C, G, D], r [C, D]."""
    c, r = c.double(), r.double()
    C, G, _ = c.shape
    rep = _log1m_cos(c, r[:, None])                                          # [C, G] log(1 - cos(c_{i,g}, r_i))
    g = torch.argmin(rep, dim=1)                                             # closest to real: max cos = min log(1-cos)
    start = g.clone()
    w = separation_weight(beta, C, separation)
    trace = [s3_objective(c, r, g, alpha, beta, separation)]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for i in range(C):
            others = torch.tensor([j for j in range(C) if j != i], dtype=torch.long)
            if len(others):
                picked = c[others, g[others]]                                # [C-1, D]
                # class i appears in both (i, j) and (j, i): twice the pair term
                sep = 2 * _log1m_cos(c[i][:, None], picked[None]).sum(dim=1)  # [G]
                cost = alpha * rep[i] - w * sep                               # [G] terms of L_S3 that involve g_i
            else:
                cost = alpha * rep[i]
            best = int(torch.argmin(cost))
            if best != int(g[i]) and cost[best] < cost[g[i]] - 1e-12:        # strict improvement only
                g[i], changed = best, True
        trace.append(s3_objective(c, r, g, alpha, beta, separation))
        if not changed:
            break
    return S3Result(groups=g.numpy(), start=start.numpy(), objective_start=trace[0], objective_end=trace[-1],
                    sweeps=sweeps, trace=trace)


def s3_brute_force(c: torch.Tensor, r: torch.Tensor, alpha: float = 0.4, beta: float = 0.9,
                   separation: str = "reference") -> np.ndarray:
    """The global minimiser of L_S3 by enumerating all G^C choices (small instances only)."""
    C, G, _ = c.shape
    if G ** C > 10 ** 6:
        raise ValueError(f"brute force over G^C = {G}^{C} choices is too many")
    c, r = c.double(), r.double()
    best = min(itertools.product(range(G), repeat=C), key=lambda g: s3_objective(c, r, list(g), alpha, beta, separation))
    return np.array(best)


# --------------------------------------------------------------------------------------------
# The frozen encoder phi (a callable class for ctx.map: loads once per actor)
# --------------------------------------------------------------------------------------------
def classifier_head(model: torch.nn.Module) -> torch.nn.Linear:
    """A raydd student's last linear layer: its input is the penultimate feature, its output the logits."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def load_encoder(encoder: dict, device: torch.device) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """-> (model, features(x_uint8 [B,C,H,W]) -> [B, D] raw features)."""
    from raydd.protocols import to_float

    if encoder["kind"] == "student":
        from safetensors.torch import load_file

        from raydd.students import create_student

        model = create_student(encoder["arch"], encoder["num_classes"], encoder["channels"], encoder["image_size"])
        model.load_state_dict(load_file(encoder["path"]))
        model = model.to(device).eval().requires_grad_(False)
        head = classifier_head(model)
        captured = {}
        head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("f", args[0]))

        def features(x: torch.Tensor) -> torch.Tensor:
            model(to_float(x).to(device))             # the classifier's own normalisation ([-1, 1])
            return captured["f"].flatten(1)           # penultimate: the last linear layer's input [B, D]
        return model, features
    if encoder["kind"] == "timm":
        from raydd.students import pretrained_timm

        model, prepare = pretrained_timm(encoder["name"], device, num_classes=0)   # pooled features

        def features(x: torch.Tensor) -> torch.Tensor:
            return model(prepare(x))                  # [B, D]
        return model, features
    raise ValueError(f"S3 encoder kind {encoder['kind']!r}; allowed: student, timm")


class EncodeImages:
    """ctx.map UDF: {"image" uint8 [N,C,H,W] (or a StagedSet's "unit_file"/"pos"), ...} -> the same rows with
    "feature" [N, D] (l2-normalised)."""

    def __init__(self, encoder: dict, gpus: float = 0.0, batch: int = 256):
        self.device = actor_device(gpus)
        self.model, self.features = load_encoder(encoder, self.device)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(images_of(rows))
        f = torch.cat([self.features(xb) for xb in x.split(self.batch)])
        f = F.normalize(f.float(), dim=1).cpu().numpy()
        return rows_with(rows, feature=f)
