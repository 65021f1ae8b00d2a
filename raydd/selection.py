"""Selecting distilled samples from a larger candidate pool (plain PyTorch; no Ray, no MLflow).

Confidence selection (CaO2, "objective-guided sample selection"): a selector classifier scores
every candidate; per class keep the candidates it classifies correctly, ordered by confidence.

A selector is any raydd classifier (raydd.students) fed `raydd.protocols.to_float` images, stored
as a safetensors state dict, or "timm:<name>": a pretrained 1000-way ImageNet classifier from the local
HF cache (the paper's ImageNet ResNet-18: "timm:resnet18.tv_in1k"), whose class k is the k-th wnid in
sorted order, the backbone's class id. `SelectorScores` is the callable class that scores candidates
on the actor pool (`ctx.map`): the constructor loads the selector once, each call scores a batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raydd.errors import CheckpointError
from raydd.generate import actor_device, images_of, rows_with

ORDERS = ("most", "least")


# --------------------------------------------------------------------------------------------
# Confidence selection (CaO2)
# --------------------------------------------------------------------------------------------
def confidence_selection(probs: torch.Tensor, labels: torch.Tensor, ipc: int,
                         order: str = "most") -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `ipc` candidates per class: correctly classified ones, by confidence.

    probs [N, K]: the selector's softmax over the K classes; labels [N]: each candidate's
    conditioned class. The score of a candidate is s_n = p(label_n | x_n) (for a correct one this
    is its top probability, the paper's "confidence"). Per class c, with n_c candidates:
      1. correct = {n : argmax_k probs[n, k] == c}, sorted by s_n descending ("most") or
         ascending ("least": correct but least confident);
      2. if |correct| < ipc, pad with the incorrect candidates of highest s_n (the closest to being
         correct; the paper pads "randomly", the reference code by top-class confidence).
    Returns (indices [C * ipc] into the N candidates, class-major in ascending class order and
    selection order within a class; scores [N] = s_n for every candidate).
    """
    if order not in ORDERS:
        raise ValueError(f"selection order {order!r}; allowed: {', '.join(ORDERS)}")
    if probs.dim() != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be [N, K] with N = len(labels); got {tuple(probs.shape)} and {len(labels)}")
    labels = labels.long().cpu()
    probs = probs.float().cpu()
    scores = probs.gather(1, labels[:, None]).squeeze(1)                   # s_n = p(label_n | x_n)  [N]
    correct = probs.argmax(dim=1) == labels                                # [N]
    picks = []
    for c in labels.unique().tolist():
        cand = torch.nonzero(labels == c).flatten()                         # this class's candidates
        if len(cand) < ipc:
            raise ValueError(f"class {c} has {len(cand)} candidates, fewer than ipc={ipc}")
        ok, wrong = cand[correct[cand]], cand[~correct[cand]]
        ok = ok[torch.argsort(scores[ok], descending=(order == "most"), stable=True)]
        wrong = wrong[torch.argsort(scores[wrong], descending=True, stable=True)]
        picks.append(torch.cat([ok, wrong])[:ipc])
    return torch.cat(picks), scores


# --------------------------------------------------------------------------------------------
# Selectors: loading a checkpoint, scoring images
# --------------------------------------------------------------------------------------------
def load_selector(path: str | Path, arch: str, num_classes: int, channels: int, image_size: int,
                  device: str | torch.device = "cpu") -> torch.nn.Module:
    """A frozen classifier from a safetensors state dict, with errors that say what does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from raydd.students import create_student

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selector checkpoint {path} does not exist (expected a safetensors state dict "
                                f"of a {arch} over {num_classes} classes)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"selector checkpoint {path} is not a readable safetensors file: {e}") from None
    model = create_student(arch, num_classes=num_classes, in_chans=channels, image_size=image_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:6]
        raise CheckpointError(f"selector checkpoint {path} does not fit a {arch} with {num_classes} classes, {channels} "
                         f"channel(s), {image_size}px images (set the arch with the selector's own key): "
                         + " ".join(lines)) from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax probabilities [N, K] of a classifier on uint8 images [N, C, H, W] (to_float normalisation)."""
    from raydd.protocols import to_float

    out = [F.softmax(model(to_float(images[i:i + batch_size].to(device))).float(), dim=1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def subset_probs(logits: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
    """A 1000-way classifier's view of a K-class run: logits [N, 1000] -> [N, K + 1], the softmax over all 1000
    at the run's classes (column k = backbone class id class_ids[k]) plus, last, the largest probability of any
    other class. argmax over the K + 1 columns is a run class exactly when the 1000-way argmax is one, so
    "classified correctly" and the confidence p(y|x) keep the 1000-way meaning (the paper's selector)."""
    p = F.softmax(logits.float(), dim=1)
    ids = torch.as_tensor(class_ids, device=p.device)
    others = p.clone()
    others[:, ids] = -1.0
    return torch.cat([p[:, ids], others.max(dim=1, keepdim=True).values], dim=1)


class SelectorScores:
    """rows {"image" uint8 [N,C,H,W] (or a StagedSet's "unit_file"/"pos"), ...} -> the same rows plus "probs" [N, K]
    ([N, K + 1] for a timm 1000-way selector, see subset_probs). Loads the selector once."""

    def __init__(self, path: str, arch: str, num_classes: int, channels: int, image_size: int,
                 gpus: float = 0.0, threads: int = 0, class_ids: list[int] | None = None):
        self.device = actor_device(gpus, threads)
        self.class_ids = class_ids
        if path.startswith("timm:"):
            from raydd.students import pretrained_timm

            self.model, self.prepare = pretrained_timm(path[len("timm:"):], self.device)
        else:
            self.model, self.prepare = load_selector(path, arch, num_classes, channels, image_size, self.device), None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(images_of(batch))                         # uint8 [N,C,H,W]
        if self.prepare is None:
            probs = predict_probs(self.model, images, device=self.device)
        else:
            probs = torch.cat([subset_probs(self.model(self.prepare(b)), self.class_ids).cpu() for b in images.split(64)])
        return rows_with(batch, probs=probs.numpy())
