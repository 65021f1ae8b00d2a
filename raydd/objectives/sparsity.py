"""RSM (seed 003), restricted score matching: an L1 penalty on the predicted clean latent.

    L_RSM = E ||eps - eps_theta(x_t, t, y)||^2  +  lambda * E ||x0_hat(x_t, t)||_1
    x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta(x_t, t, y)) / sqrt(abar_t)

x0_hat is built from the prediction, so the L1 term trains eps_theta: it shrinks the model's clean
estimate toward 0 (strongest at high noise, where d x0_hat / d eps = sqrt(1 - abar_t) / sqrt(abar_t) is
large) and so prunes the prior toward a sparser, "distillation-aware" manifold.

Registered as the fine-tuning loss term "rsm": raydd.finetune.finetune_loop adds lambda * term to
L_simple + L_vlb (pass terms={"rsm": lambda}).
"""
from __future__ import annotations

import torch

from raydd.finetune import register_loss_term

REDUCTIONS = ("mean", "sum")


@register_loss_term("rsm")
def rsm_l1(predict, x0, y, t, x_t, noise, out, schedule, options) -> torch.Tensor:
    """||x0_hat||_1 per sample [B]. options["reduce"]: "mean" (default: per element, like L_simple's
    mean squared error, so lambda does not depend on the latent size) or "sum" (the plain L1 norm)."""
    reduce = options.get("reduce", "mean")
    if reduce not in REDUCTIONS:
        raise ValueError(f"rsm option reduce={reduce!r}; allowed: {', '.join(REDUCTIONS)}")
    l1 = out["x0_hat"].abs().flatten(1)          # [B, D], differentiable w.r.t. the DiT's parameters
    return l1.mean(1) if reduce == "mean" else l1.sum(1)
