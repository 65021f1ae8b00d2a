"""CGS (seed 003), collaborative guided sampling: DPP diversity + mean matching over one class's latents.

The N = IPC samples of class c are denoised together (one batch). After every scheduler step

    Z <- Z - (eta_dpp * grad_Z L_dpp(Z) + eta_dm * grad_Z L_dm(Z))
    L_dpp(Z) = -log det(K + eps I),       K_ij = cos(z_i, z_j)           diversity (DPP likelihood of the set)
    L_dm(Z)  = || (1/N) sum_i z_i - sqrt(abar) mu_c ||^2                 drift: the set's mean vs the real one

with mu_c the mean clean latent of class c's real images (VAE encode; identity on pixel backbones) and
abar the noise level of Z (z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps, so E z_t = sqrt(abar) mu_c).
Both steps are scale-free. K holds cosines, so grad_{z_i} L_dpp is perpendicular to z_i with norm ~ 1/||z_i||:
an absolute eta_dpp set on 16x16 pixels (||z|| ~ 11) would be ~40x weaker, relative to the latent, on
4x32x32 SD latents (||z|| ~ 64); the factor ||z_i||^2 makes the relative move ||dz_i|| / ||z_i|| =
eta_dpp * ||z_i|| * ||grad_{z_i} L_dpp|| a function of directions only. grad_{z_i} L_dm = (2/N)(mean - target)
is already a fraction of the class's gap to its target, whatever the scale: eta_dm = 0.05 at N = 10 closes
1 % of the gap per step. eps is added to cosines, which have no scale.

Where the losses are evaluated (a decision: the paper leaves it open):
  on="z_t" (default): on the freshly stepped latents Z_{t-1} themselves (target sqrt(abar_{t-1}) mu_c), the
      same latents the update moves; cheap, no backprop through the DiT. At the last step abar = 1, so the
      final z_0 is pulled toward mu_c directly. (The paper writes g_t from Z_t and applies it to Z_{t-1}; the
      sampler's post_step hook sees Z_{t-1} and x0_hat, and a gradient taken where it is applied is exact.)
  on="x0": on the step's clean prediction x0_hat (target mu_c); the gradient is applied to Z_{t-1} through
      its clean component, scaled by sqrt(abar_{t-1}).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raydd.data import DataError
from raydd.sampling import GuidanceError

ON = ("z_t", "x0")


# --------------------------------------------------------------------------------------------
# The two collaborative losses (one class's latents z [N, c, h, w])
# --------------------------------------------------------------------------------------------
def cosine_kernel(z: torch.Tensor) -> torch.Tensor:
    """K [N, N], K_ij = cos(z_i, z_j) over flattened latents."""
    u = F.normalize(z.flatten(1), dim=1, eps=1e-12)
    return u @ u.T


def dpp_loss(z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """L_dpp = -log det(K + eps I), a scalar, computed in float64 through a Cholesky factor.

    K is a Gram matrix of unit vectors (PSD), so K + eps I is positive definite for eps > 0 and the value
    is finite even for duplicate samples: N copies give K = 11^T and -log det = -(N-1) log eps - log(N + eps)."""
    if not eps > 0:
        raise ValueError(f"DPP jitter eps={eps} must be > 0 (log det of a singular kernel is -inf)")
    K = cosine_kernel(z.double())
    L, info = torch.linalg.cholesky_ex(K + eps * torch.eye(len(K), dtype=K.dtype, device=K.device))
    if int(info) != 0:
        raise GuidanceError(f"K + {eps} I is not positive definite in float64 (N={len(K)}); raise the jitter eps")
    return -2.0 * torch.log(torch.diagonal(L)).sum()


def dm_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_dm = || mean_i z_i - target ||^2, a scalar (target [c, h, w], e.g. sqrt(abar) mu_c)."""
    return ((z.flatten(1).mean(0) - target.flatten()) ** 2).sum()


def cgs_direction(z: torch.Tensor, target: torch.Tensor, eta_dpp: float, eta_dm: float, eps: float) -> torch.Tensor:
    """g_i = eta_dpp ||z_i||^2 grad_{z_i} L_dpp + eta_dm grad_{z_i} L_dm for one class's latents z [N, ...]
    (float64 maths; module docstring for the ||z_i||^2). With one sample (IPC 1) log det(K + eps I) is
    constant: only mean matching acts."""
    zz = z.detach().double().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(eta_dm * dm_loss(zz, target.double()), zz)
        if eta_dpp != 0 and len(z) > 1:
            (g_dpp,) = torch.autograd.grad(dpp_loss(zz, eps), zz)
            sq_norm = zz.detach().flatten(1).pow(2).sum(1).view((-1,) + (1,) * (z.dim() - 1))   # [N, 1, ...]
            g = g + eta_dpp * sq_norm * g_dpp
    return g.to(z.dtype)


# --------------------------------------------------------------------------------------------
# The post-step hook of raydd.sampling.sample: (i, x_prev, x0_hat, y, abar_prev) -> x_prev'
# --------------------------------------------------------------------------------------------
@dataclass
class CGS:
    mu: torch.Tensor      # [K, c, h, w] real mean clean latents mu_c, one row per entry of class_ids
    class_ids: list[int]  # backbone class id of each row of mu (the y the sampler sees)
    eta_dpp: float        # relative step size on grad L_dpp (times ||z_i||^2)
    eta_dm: float         # step size on grad L_dm
    eps: float = 1e-3     # jitter in log det(K + eps I)
    on: str = "z_t"       # "z_t" | "x0": which latents the losses see (module docstring)

    def __post_init__(self):
        if self.on not in ON:
            raise ValueError(f"CGS on={self.on!r}; allowed: {', '.join(ON)}")
        self.row = {int(c): k for k, c in enumerate(self.class_ids)}

    def __call__(self, i: int, x_prev: torch.Tensor, x0_hat: torch.Tensor, y: torch.Tensor,
                 abar_prev: float) -> torch.Tensor:
        sqrt_abar = math.sqrt(abar_prev)                   # noise level of Z_{t-1} (any scheduler)
        z, target_scale, apply_scale = (x_prev, sqrt_abar, 1.0) if self.on == "z_t" else (x0_hat, 1.0, sqrt_abar)
        out = x_prev.clone()
        for c in torch.unique(y).tolist():                 # each class is its own coupled system
            m = y == c
            g = cgs_direction(z[m], target_scale * self.mu[self.row[c]], self.eta_dpp, self.eta_dm, self.eps)
            out[m] = x_prev[m] - apply_scale * g
        if not torch.isfinite(out).all():
            raise GuidanceError(f"CGS update gave NaN/Inf at respaced step {i} (classes {torch.unique(y).tolist()})")
        return out


def cgs_post_step(backbone, device, *, mu: np.ndarray, class_ids: list[int], eta_dpp: float, eta_dm: float,
                  eps: float, on: str) -> CGS:
    """post_step_factory for ctx.generate (bind the keywords with functools.partial: picklable)."""
    mu = torch.tensor(np.array(mu, dtype=np.float32), device=device)   # a copy: Ray hands read-only arrays
    return CGS(mu, list(class_ids), eta_dpp, eta_dm, eps, on)


# --------------------------------------------------------------------------------------------
# mu_c from real data, and the diagnostics logged per class
# --------------------------------------------------------------------------------------------
class ClassLatentSums:
    """ctx.map UDF: real images (rows with class_idx, unit, image uint8 [C, H, W]) -> per class present in the
    batch: class_idx, unit, the sum of its VAE-encoded clean latents [c, h, w] (float64) and their count.
    Sums, not means, so a class whose rows arrive in several batches still averages exactly
    (`class_means` adds them up). Loads the VAE once per actor; vae="": the rows bring their latents already
    (a column latent [c, h, w]: the store's, data.latents)."""

    def __init__(self, vae: str, vae_scale: float, gpus: float = 0.0, batch: int = 64):
        from raydd.backbone import load_vae
        from raydd.generate import actor_device

        self.device, self.batch = actor_device(gpus), batch
        self.vae = load_vae(vae, vae_scale).to(self.device).eval() if vae else None

    @torch.no_grad()
    def __call__(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydd.protocols import to_float

        out: dict[str, list] = {"class_idx": [], "unit": [], "sum": [], "count": []}
        for c in np.unique(cols["class_idx"]):
            m = cols["class_idx"] == c
            if self.vae is None:
                z = torch.from_numpy(cols["latent"][m]).double()                     # [n, c, h, w]
            else:
                x = torch.from_numpy(np.ascontiguousarray(cols["image"][m]))
                z = torch.cat([self.vae.encode(to_float(b).to(self.device)).double() for b in x.split(self.batch)])
            for k, v in (("class_idx", c), ("unit", cols["unit"][m][0]), ("sum", z.sum(0).cpu().numpy()),
                         ("count", len(z))):
                out[k].append(v)
        return {k: np.stack(v) if k == "sum" else np.array(v, dtype=np.int64) for k, v in out.items()}


def class_means(parts: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """ClassLatentSums' rows (any order, a class possibly in several rows) -> mu [num_classes, c, h, w] float32."""
    sums = np.zeros((num_classes, *parts["sum"].shape[1:]))
    counts = np.zeros(num_classes)
    np.add.at(sums, parts["class_idx"], parts["sum"])
    np.add.at(counts, parts["class_idx"], parts["count"])
    if (counts == 0).any():
        raise DataError(f"no real images for class(es) {np.nonzero(counts == 0)[0].tolist()}: mu_c is undefined")
    return (sums / counts.reshape(-1, *([1] * (sums.ndim - 1)))).astype(np.float32)


def mean_pairwise_cosine(z: torch.Tensor) -> float:
    """Mean of cos(z_i, z_j) over pairs i < j (NaN for a single sample)."""
    n = len(z)
    if n < 2:
        return float("nan")
    K = cosine_kernel(z.double())
    return float(K[torch.triu_indices(n, n, offset=1).unbind()].mean())


def mean_distance(z: torch.Tensor, mu: torch.Tensor) -> float:
    """|| mean_i z_i - mu ||_2."""
    return float((z.double().flatten(1).mean(0) - mu.double().flatten()).norm())
