"""Learnability (LGD, seed 000): what the current model can still learn from a sample.

    S(x, y) = L(θ_{i−1}, x, y) − ω · L(θ*, x, y)          (cross-entropy losses)

θ_{i−1} is the model trained on the distilled set so far, θ* a reference model trained on the full
real training split: a high S marks a sample the current model gets wrong but a well-informed
model gets right (a learnable gap, not noise). Guidance ascends

    J(x̂0, y) = S(D(x̂0), y) − (γ/λ) · max_{m ∈ M_y} cos(x̂0, m)

(with the Guidance helper's scale λ, so ε̃ = ε̂ − ρ_t ∇(λ·S − γ·max cos): learnability plus deviation
away from the most similar sample already in the class's memory buffer M_y, under one shared ρ_t).
S sees the decoded image D(x̂0) (`learnability_objective`, the Guidance helper's on_images); the
memory term sees the latent x̂0 itself (`memory_term`, its latent_term): M_y holds latents of the
class's accepted samples, which LGD adds as it accepts them (IGD's memory is sequential).
Then κ candidates are drawn per slot and the one with the highest S is kept (`top_kappa`).

Every classifier input is in [-1, 1]: `raydd.protocols.to_float`'s normalisation, which on
pixel-space backbones is x̂0 itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydd.generate import actor_device, images_of, rows_with
from raydd.protocols import to_float
from raydd.selection import load_selector


def learnability_score(model: nn.Module, reference: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                       omega: float) -> torch.Tensor:
    """S = CE(θ_{i−1}(x), y) − ω·CE(θ*(x), y).  x [B,C,H,W] in [-1, 1], labels [B] -> [B]."""
    loss_now = F.cross_entropy(model(x), labels, reduction="none")      # L(θ_{i−1}, x, y)  [B]
    loss_ref = F.cross_entropy(reference(x), labels, reduction="none")  # L(θ*, x, y)       [B]
    return loss_now - omega * loss_ref


def max_memory_cosine(x: torch.Tensor, labels: torch.Tensor, memory: torch.Tensor,
                      memory_labels: torch.Tensor) -> torch.Tensor:
    """max_{m ∈ M_y} cos(x, m) over the memory items of each sample's own class.
    x [B, ...], labels [B], memory [M, ...], memory_labels [M] -> [B] (0 where a class has no memory)."""
    if memory.numel() == 0:
        return x.new_zeros(len(x))
    xf = F.normalize(x.flatten(1), dim=1, eps=1e-8)                          # [B, D]
    mf = F.normalize(memory.flatten(1).to(xf), dim=1, eps=1e-8)              # [M, D]
    cos = xf @ mf.T                                                          # [B, M]
    same = labels[:, None] == memory_labels.to(labels.device)[None, :]       # [B, M]
    cos = cos.masked_fill(~same, -2.0)
    best = cos.max(dim=1).values                                             # [B]
    return torch.where(same.any(dim=1), best, torch.zeros_like(best))


@dataclass
class LearnabilityState:
    """What the objective needs; built once per sampling actor by LGD's guidance factory."""
    model: nn.Module              # θ_{i−1}: trained on the current distilled set (eval mode, frozen)
    reference: nn.Module          # θ*: trained on the full real training split (eval mode, frozen)
    omega: float                  # ω: weight of the reference loss in S
    diversity: float              # γ/λ: weight of the memory term relative to S
    memory: torch.Tensor          # [M, c, h, w] latents of the samples accepted so far (the buffer M)
    memory_labels: torch.Tensor   # [M] labels of the memory items
    class_ids: torch.Tensor       # [K] label -> backbone class id (the sampler passes backbone ids)


def labels_of(y: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Backbone class ids [B] -> labels [B] (positions in class_ids)."""
    match = y[:, None] == class_ids.to(y.device)[None, :]                    # [B, K]
    if not bool(match.any(dim=1).all()):
        raise ValueError(f"backbone class ids {y[~match.any(dim=1)].tolist()} are not in the class list")
    return match.float().argmax(dim=1)


def learnability_objective(x0_images: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                           state: LearnabilityState) -> torch.Tensor:
    """S(D(x̂0), y), maximised by the Guidance helper. x0_images [B,C,H,W] (decoded, in [-1, 1]), t [B],
    y [B] backbone class ids -> [B]."""
    return learnability_score(state.model, state.reference, x0_images, labels_of(y, state.class_ids), state.omega)


def memory_term(x0_hat: torch.Tensor, t: torch.Tensor, y: torch.Tensor, state: LearnabilityState) -> torch.Tensor:
    """−(γ/λ)·max_{m ∈ M_y} cos(x̂0, m) on latents: x0_hat [B,c,h,w], y [B] backbone ids -> [B]."""
    labels = labels_of(y, state.class_ids)
    return -state.diversity * max_memory_cosine(x0_hat, labels, state.memory, state.memory_labels)


def rank_in_class(labels: torch.Tensor) -> torch.Tensor:
    """Each item's position among the items of its own label, in index order. [N] -> [N]."""
    rank = torch.empty_like(labels)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        rank[idx] = torch.arange(len(idx))
    return rank


@torch.no_grad()
def score_images(model: nn.Module, reference: nn.Module, x: torch.Tensor, labels: torch.Tensor, omega: float,
                 batch_size: int = 256) -> torch.Tensor:
    """S on final images in batches -> [N] (CPU float32). x: uint8 [N,C,H,W], converted batch by batch (a float
    copy of every candidate would be 4x their size: ~22 GiB at ImageNet-1K, IPC 10, κ = 3, by #20), or floats
    in [-1, 1]."""
    def batch(i: int) -> torch.Tensor:
        xb = x[i:i + batch_size]
        return to_float(xb) if xb.dtype == torch.uint8 else xb

    out = [learnability_score(model, reference, batch(i), labels[i:i + batch_size], omega)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).float().cpu() if out else torch.zeros(0)


class LearnabilityScores:
    """ctx.map UDF: rows {"class_idx", "image" uint8 [N,C,H,W] (or a StagedSet's "unit_file"/"pos"), ...} -> the same
    rows plus "S" [N] (score_images). LGD scores its κ·n candidates per class here, on the actors, so the driver
    reads only the candidates it keeps. Loads θ_{i−1} and θ* (safetensors state dicts of `arch`) once."""

    def __init__(self, theta: str, reference: str, omega: float, arch: str, num_classes: int, channels: int,
                 image_size: int, gpus: float = 0.0, threads: int = 0):
        self.device = actor_device(gpus, threads)
        classify = dict(arch=arch, num_classes=num_classes, channels=channels, image_size=image_size, device=self.device)
        self.model, self.reference = load_selector(theta, **classify), load_selector(reference, **classify)
        self.omega = omega

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(images_of(batch)).to(self.device)                 # uint8 [N,C,H,W]
        y = torch.from_numpy(np.asarray(batch["class_idx"], dtype=np.int64)).to(self.device)
        s = score_images(self.model, self.reference, x, y, self.omega)          # [N]
        return rows_with(batch, S=s.numpy())


def top_kappa(scores: np.ndarray | torch.Tensor, groups: np.ndarray | torch.Tensor) -> np.ndarray:
    """For each group (e.g. one slot's κ candidates) the index of its highest score (ties: the first
    in index order). scores [N], groups [N] (any hashable ints) -> indices [G], ordered by group id.
    NaN scores never win unless a whole group is NaN (then its first candidate)."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    if scores.shape != groups.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and groups {groups.shape} must be equally long 1-d arrays")
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    picks = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)              # this group's candidates, in index order
        picks.append(idx[int(np.argmax(keyed[idx]))])  # argmax returns the first maximum
    return np.asarray(picks, dtype=np.int64)
