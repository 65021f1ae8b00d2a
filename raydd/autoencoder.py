"""The latent world's codec: a small diffusers `AutoencoderKL` trained on the real train split.

raydd's users run DiT-XL/2 on SD-VAE latents (4x32x32 for 256 px images, no clipping). The embedded
`digits-latent` preset mirrors that at toy size: digits at 32 px (RGB) -> this VAE (4 latent channels,
side / 4) -> a tiny DiT on 4x8x8 latents. It is trained on first use (a Ray Train job, cached by config
like the tiny DiT) with the usual KL-VAE loss (as SD's first stage, without the perceptual and GAN terms):
    L = ||D(z) - x||^2 + kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x)        (per image, mean over pixels)
and saved as a plain diffusers model dir whose `scaling_factor` is 1 / std of the training latents, the
rule behind SD's 0.18215, so that the DiT sees latents of unit variance.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch

from raydd.config import BackboneConfig, DataConfig
from raydd.train_hooks import TrainHooks, TrainLoop

LATENT_CHANNELS = 4    # as SD's VAE
KL_WEIGHT = 1e-6       # on the summed KL relative to the summed squared error (SD's first stage)
LR, BATCH = 1e-3, 64


def tiny_vae(channels: int, image_size: int, width: int):
    """AutoencoderKL with blocks (width, 2 width, 2 width): two downsamplings, so latents are side / 4."""
    from diffusers import AutoencoderKL

    blocks = (width, 2 * width, 2 * width)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                         layers_per_block=1, norm_num_groups=min(32, width), sample_size=image_size)


def tiny_vae_config(backbone: BackboneConfig, data: DataConfig, seed: int = 0) -> dict:
    """The training job's config (also its cache key): only what changes the trained weights."""
    return {"vae_width": backbone.vae_width, "vae_train_steps": backbone.vae_train_steps,
            "data": asdict(data), "seed": seed,
            "draws": "epochs"}   # batches: epochs of the shuffled split, no longer i.i.d. picks (older VAEs retrain)


def train_tiny_vae(config: dict, hooks: TrainHooks) -> None:
    """Train the VAE on the real train split, held or streamed from the store (the job's dataset "train"), epoch
    after epoch; report a diffusers model dir `vae/` as the final checkpoint."""
    from raydd.data import StreamedSplit, endless_batches, load_real
    from raydd.jobs import real_train
    from raydd.protocols import to_float

    dcfg, steps = DataConfig(**config["data"]), int(config["vae_train_steps"])
    torch.manual_seed(config["seed"])
    train = real_train(dcfg, hooks, load_real(dcfg, train=hooks.dataset("train") is None))
    vae = tiny_vae(dcfg.channels, dcfg.image_size, config["vae_width"])
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    loop = TrainLoop(hooks, "vae", steps, {"vae": vae, "opt": opt})   # restores both after a worker failure
    net = hooks.prepare_model(VAELoss(vae))                              # DDP-wrapped when world_size > 1
    device = hooks.device
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + hooks.world_rank + loop.start)
    batches = endless_batches(train, BATCH, gen)

    def final(d: str) -> dict:
        batches.close()                                                  # its stream ends before the next pass
        return {"scaling_factor": save_with_scaling_factor(vae, train, f"{d}/vae", device),
                "streamed": isinstance(train, StreamedSplit)}

    for step in loop.steps():
        x = to_float(next(batches)[0]).to(device)                        # [B, C, H, W] in [-1, 1]
        mse, kl = net(x, gen)
        loss = mse + KL_WEIGHT * kl / x[0].numel()                       # both per pixel, as SD's ratio
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop.end_step(step, len(x), metrics=lambda: {"loss": float(loss), "mse": float(mse), "kl": float(kl)},
                      final=final)


class VAELoss(torch.nn.Module):
    """x [B, C, H, W] -> (reconstruction MSE per pixel, KL per image summed over latent elements)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None):
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=generator)).sample
        return ((recon - x) ** 2).mean(), posterior.kl().mean()


@torch.no_grad()
def save_with_scaling_factor(vae, train, path: str, device) -> float:
    """scaling_factor = 1 / std of the posterior means over the train split (a raydd.data.Split or StreamedSplit,
    one pass: running sums, not the latents); saved in the VAE's config.json."""
    from raydd.protocols import to_float

    vae.eval()
    n, total, squares = 0, 0.0, 0.0                                      # over every latent element, in float64
    for x, _ in train.ordered(256):
        z = vae.encode(to_float(x).to(device)).latent_dist.mean.double().cpu()
        n, total, squares = n + z.numel(), total + float(z.sum()), squares + float((z ** 2).sum())
    scale = float(1.0 / math.sqrt((squares - total ** 2 / n) / (n - 1)))    # 1 / the unbiased std, as torch.std
    vae.register_to_config(scaling_factor=scale)
    vae.cpu().save_pretrained(path, safe_serialization=True)
    return scale
