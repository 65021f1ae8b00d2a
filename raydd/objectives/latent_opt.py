"""Condition-aware latent optimisation (CaO2, Sec. 3.3): move a generated latent x, with the
diffusion model frozen, toward where the model's conditional density estimate is accurate.

    min_x  E_{t, eps} [ ||eps_phi(x_t, c_hat, t) - eps||_2^2 + lambda * ||eps_phi(x_t, c_hat, t) - eps||_inf ]
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,   t ~ U{1, ..., T_hat} (TRUE timesteps of the
    1000-step schedule),   eps fixed per image,   subject to ||x_bar - x||_inf <= eta (projection).

||.||_2^2 is the mean over the latent's elements (as the reference code's mse_loss); ||.||_inf
the largest absolute residual of the image. c_hat is the true class or the null class.
Note: the reference code feeds the DiT a *respaced* step index (1..11 of 50) as if it were a true
timestep, i.e. almost noise-free inputs; here t is always a true timestep in [1, T_hat].

`optimize_latents` is the plain PyTorch function (tests call it with any backbone-like module);
`LatentOptBatches` is the callable class for `ctx.map` (loads the backbone once per actor).
"""
from __future__ import annotations

import numpy as np
import torch

from raydd.config import SamplerConfig
from raydd.diffusion import Schedule, make_schedule, q_sample
from raydd.generate import heavy_column, keep_units, map_units, own_stage
from raydd.sampling import to_uint8


def latent_objective(backbone, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     schedule: Schedule, lam: float) -> torch.Tensor:
    """Per-image objective [B]: mean (eps_phi - eps)^2 + lam * max |eps_phi - eps|.
    x [B,C,H,W] clean latents, y [B] backbone condition ids, t [B] true timesteps, eps [B,C,H,W];
    schedule: the full (unrespaced) schedule, so schedule.alphas_cumprod[t] is abar_t."""
    x_t = q_sample(x, t, eps, schedule)                         # sqrt(abar) x + sqrt(1 - abar) eps
    eps_hat, _ = backbone(x_t, t, y)                            # [B,C,H,W] (learned variance unused)
    r = (eps_hat.float() - eps).flatten(1)                      # residual  [B, C*H*W]
    return r.pow(2).mean(dim=1) + lam * r.abs().amax(dim=1)


@torch.no_grad()
def expected_objective(backbone, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, schedule: Schedule,
                       t_hat: int, lam: float, points: int = 10) -> torch.Tensor:
    """E_t of the objective [B] at the image's fixed eps, on a fixed grid of `points` true timesteps
    spread over [1, T_hat] (the training curve draws a random t per step, so it is too noisy to
    compare before and after)."""
    ts = np.unique(np.linspace(1, t_hat, points).round().astype(np.int64))
    return torch.stack([latent_objective(backbone, x, y, torch.full_like(y, int(t)), eps, schedule, lam)
                        for t in ts]).mean(0)


def fixed_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed eps of each image [B, *shape], a function of its seed only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def optimize_latents(backbone, x: torch.Tensor, y: torch.Tensor, seeds: list[int], schedule: Schedule, *,
                     iterations: int = 100, lr: float = 6e-4, lam: float = 10.0, t_hat: int = 500,
                     eta: float = 0.06, autocast_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the latents themselves, DiT frozen. x [B,C,H,W]; y [B] condition ids (true or null);
    seeds [B] per image: its fixed noise eps and its timestep draws come from its own generator, so
    an image's result does not depend on its batch-mates.
    Returns (x_bar [B,C,H,W] float32 with ||x_bar - x||_inf <= eta, loss curve [B, iterations]:
    the objective at each iteration before its update)."""
    if not 1 <= t_hat < len(schedule):
        raise ValueError(f"t_hat={t_hat} must be in [1, {len(schedule) - 1}] (true timesteps of the "
                         f"{len(schedule)}-step schedule)")
    if eta <= 0 or iterations < 1 or lr <= 0:
        raise ValueError(f"need eta > 0, iterations >= 1, lr > 0 (got {eta}, {iterations}, {lr})")
    device = x.device
    eps = fixed_noise(seeds, tuple(x.shape[1:])).to(device)                # fixed eps [B,C,H,W]
    gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]      # each image's timestep draws
    x0 = x.detach().float()
    x_bar = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x_bar], lr=lr)
    curve = []
    for _ in range(iterations):
        t = torch.cat([torch.randint(1, t_hat + 1, (1,), generator=g) for g in gens]).to(device)  # true t [B]
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = latent_objective(backbone, x_bar, y, t, eps, schedule, lam)         # [B]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()                    # a sum: each image's gradient is its own objective's
        opt.step()
        with torch.no_grad():                    # projection onto the L_inf ball around the start
            x_bar.copy_(x0 + (x_bar - x0).clamp(-eta, eta))
        curve.append(loss.detach().float())
    return x_bar.detach(), torch.stack(curve, dim=1).cpu()


NULL_COND = -1   # cond of a row optimised with the null class: the backbone's null id (DiT-XL/2: 1000), known once loaded


class LatentOptBatches:
    """rows {unit, class_idx, slot, seed, score, cond (backbone class ids, or NULL_COND), latent [N,C,H,W] (or image
    uint8, encoded here; either given, or read here from the rows a StagedSet's unit_file/pos columns point at)} ->
    rows + {latent: optimised float16 (as a sampled set's), image: decoded uint8, loss_curve [N, iterations],
    objective_before / objective_after [N]: `expected_objective` at the start and at the end}.
    Constructor: load the frozen backbone once (like raydd.generate.SampleBatches). stage_dir / stage_host: as
    SampleBatches, each finished unit is written there and only the light columns are returned."""

    def __init__(self, spec, sampler: SamplerConfig, iterations: int, lr: float, lam: float, t_hat: int,
                 eta: float, gpus: float = 0.0, threads: int = 0, precision: str = "fp32", stage_dir: str = "",
                 stage_host: str = ""):
        from raydd.generate import actor_device, autocast_for

        self.stage_dir = own_stage(stage_dir, stage_host)
        self.device = actor_device(gpus, threads)
        self.backbone = spec.load(self.device)
        self.schedule = make_schedule(sampler)   # the full 1000-step schedule
        self.opts = dict(iterations=iterations, lr=lr, lam=lam, t_hat=t_hat, eta=eta)
        self.autocast = autocast_for(precision, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return keep_units(self.stage_dir, map_units(self.run_unit, batch))

    def run_unit(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydd.protocols import to_float

        latents = heavy_column(rows, "latent")
        if latents is not None:
            x = torch.from_numpy(latents.astype(np.float32)).to(self.device)
        else:                                    # real images (a generator without latents): encode them
            with torch.no_grad():
                images = to_float(torch.from_numpy(heavy_column(rows, "image")).to(self.device))   # [-1, 1]
                x = self.backbone.vae.encode(images).float()
        y = torch.from_numpy(rows["cond"]).long().to(self.device)
        y = torch.where(y == NULL_COND, self.backbone.num_classes, y)     # the loaded DiT's own null class
        x_bar, curve = optimize_latents(self.backbone, x, y, rows["seed"].tolist(), self.schedule,
                                        autocast_dtype=self.autocast, **self.opts)
        eps = fixed_noise(rows["seed"].tolist(), tuple(x.shape[1:])).to(self.device)
        before, after = (expected_objective(self.backbone, z, y, eps, self.schedule, self.opts["t_hat"],
                                            self.opts["lam"]).cpu().numpy() for z in (x, x_bar))
        with torch.no_grad():
            images = to_uint8(self.backbone.vae.decode(x_bar))
        keep = {k: v for k, v in rows.items() if k not in ("latent", "image", "unit_file", "pos")}
        return {**keep, "latent": x_bar.to(torch.float16).cpu().numpy(), "image": images.cpu().numpy(),
                "loss_curve": curve.numpy().astype(np.float32), "objective_before": before, "objective_after": after}
