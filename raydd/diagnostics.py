"""Set diagnostics, logged for every distilled set: is it still recognisable, diverse, and in range?

- distilled/teacher_acc: top-1 of the real-data classifier (the soft protocol's teacher, trained on the real
  train split and cached) on the distilled images against their labels. Near the teacher's own test
  accuracy for faithful samples; a guidance scale that breaks samples shows here first.
- distilled/diversity: 1 - mean pairwise cosine of the teacher's penultimate features within a class,
  averaged over classes (0 = a class's images are identical to the teacher; needs IPC >= 2).
- distilled/latent_std: std of the distilled latents over all elements (the DiT's space: ~1 for SD-VAE
  latents scaled by 0.18215, and for the tiny VAE scaled by its own factor; pixels in [-1, 1] on digits).
  Guidance that blows latents up or collapses them shows here. Absent for sets of real images (random).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raydd.objectives.dpp import mean_pairwise_cosine
from raydd.subgroups import classifier_head, load_encoder


class TeacherScores:
    """ctx.map UDF: rows {"class_idx", "unit", "image" uint8 [N,C,H,W] (or a StagedSet's "unit_file"/"pos")} ->
    {"class_idx", "unit", "correct",
    "feature" [N, D] l2-normalised penultimate features}. Loads the teacher once per actor."""

    def __init__(self, encoder: dict, gpus: float = 0.0, batch: int = 256):
        from raydd.generate import pick_device

        self.device, self.batch = pick_device(gpus), batch
        self.model, self.features = load_encoder(encoder, self.device)
        self.head = classifier_head(self.model)

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydd.generate import images_of

        x = torch.from_numpy(images_of(rows))
        f = torch.cat([self.features(xb) for xb in x.split(self.batch)])          # [N, D]
        pred = self.head(f.to(self.device)).argmax(1).cpu().numpy()               # the classifier's own logits
        return {"class_idx": rows["class_idx"], "unit": rows["unit"],
                "correct": (pred == rows["class_idx"]).astype(np.float32),
                "feature": F.normalize(f.float(), dim=1).cpu().numpy()}


def summarise(scores: dict[str, np.ndarray], latent_std: float | None) -> dict[str, float]:
    """TeacherScores' columns (+ the std of the set's latents) -> {"distilled/teacher_acc", "distilled/diversity",
    "distilled/latent_std"}."""
    out = {"distilled/teacher_acc": float(scores["correct"].mean())}
    cos = [mean_pairwise_cosine(torch.from_numpy(scores["feature"][scores["class_idx"] == c]))   # [IPC, D]
           for c in np.unique(scores["class_idx"]) if (scores["class_idx"] == c).sum() > 1]
    if cos:
        out["distilled/diversity"] = 1.0 - float(np.mean(cos))
    if latent_std is not None:
        out["distilled/latent_std"] = latent_std
    return out
