"""Training and fine-tuning losses for the DiT, and the tiny backbone's training loop.

Loss (improved DDPM / DiT, "hybrid"): L = L_simple + L_vlb
  L_simple = || eps - eps_theta(x_t, t, y) ||^2                       (mean over dims)
  L_vlb    = KL( q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t) )    (t > 0, bits per dim)
           = -log p_theta(x0 | x1)  (discretised Gaussian)           (t = 0)
with the mean in L_vlb built from a stop-gradient eps, so L_vlb trains only the variance.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raydd.config import BackboneConfig, DataConfig, SamplerConfig
from raydd.diffusion import (Schedule, coef, learned_range_log_variance, make_schedule, predict_x0, q_sample,
                             split_output)
from raydd.train_hooks import TrainHooks, TrainLoop

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) for x in [-1, 1] quantised to 256 bins, under N(mean, exp(log_scale)^2)."""
    centered = x - mean
    inv = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_probs


def diffusion_losses(predict: Predict, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     s: Schedule) -> dict[str, torch.Tensor]:
    """Per-sample losses [B]: {'loss', 'mse', 'vb', 'x0_hat'(batch)}; s is the full (unrespaced) schedule."""
    x_t = q_sample(x0, t, noise, s)
    eps, var = predict(x_t, t, y)
    dims = tuple(range(1, x0.dim()))
    mse = ((noise - eps) ** 2).mean(dim=dims)
    ab = coef(s.alphas_cumprod, t, x0)
    out = {"mse": mse, "x0_hat": predict_x0(x_t, eps, ab)}
    if var is None:
        out["vb"] = torch.zeros_like(mse)
    else:
        c1, c2 = coef(s.posterior_mean_coef1, t, x0), coef(s.posterior_mean_coef2, t, x0)
        true_mean = c1 * x0 + c2 * x_t
        true_logvar = coef(s.posterior_log_variance_clipped, t, x0)
        model_mean = c1 * predict_x0(x_t, eps.detach(), ab) + c2 * x_t     # stop-grad: vb trains variance only
        model_logvar = learned_range_log_variance(var, true_logvar, coef(np.log(s.betas), t, x0))
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=dims) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=dims) / math.log(2.0)
        out["vb"] = torch.where(t == 0, nll, kl)
    out["loss"] = out["mse"] + out["vb"]
    return out


def transformer_predict(model, channels: int) -> Predict:
    """Predict function over a (possibly DDP-wrapped) diffusers DiTTransformer2DModel."""
    def predict(x_t, t, y):
        return split_output(model(x_t, timestep=t, class_labels=y, return_dict=False)[0], channels)
    return predict


# The training recipe's version, part of every DiT training job's cache key: models trained by an older
# recipe are not reused. 2: one shared embedder, labels dropped once per sample; EMA and DiffFit gammas
# in fine-tunes. 3: batches are epochs of the shuffled split (raydd.data.endless_batches, held or streamed),
# no longer i.i.d. picks of a held split.
RECIPE = 3


class EMA:
    """Exponential moving average of a model's trainable parameters, the weights DiT, Minimax and IMS3 sample
    from: after every optimizer step  shadow <- d * shadow + (1 - d) * param,  with d = decay, or with
    warmup d = min(decay, (1 + step) / (10 + step)). decay = 0 keeps the last weights."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = float(decay), warmup
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n])
        return model

    def state_dict(self) -> dict:
        return {n: v.cpu() for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, v in state.items():
            self.shadow[n].copy_(v)


# --------------------------------------------------------------------------------------------
# The tiny backbone: trained with the DiT recipe on the real train split (Ray Train loop)
# --------------------------------------------------------------------------------------------
def tiny_backbone_config(backbone: BackboneConfig, sampler: SamplerConfig, data: DataConfig, seed: int) -> dict:
    """The training job's config (also its cache key): only what changes the trained weights. With a VAE
    (digits-latent: backbone.vae is the trained tiny VAE's dir), the DiT learns that VAE's latents."""
    return {"backbone": asdict(backbone), "sampler": schedule_key(sampler), "data": asdict(data), "seed": seed,
            "recipe": RECIPE}


def schedule_key(sampler: SamplerConfig) -> dict:
    """The noise schedule a DiT trains under: the part of the sampler config that enters a training job's
    config and cache key. Sampling-only settings (steps, CFG, guidance) stay out, so adding or changing one
    never invalidates trained backbones and fine-tunes."""
    return {"train_timesteps": sampler.train_timesteps, "beta_start": sampler.beta_start, "beta_end": sampler.beta_end}


@torch.no_grad()
def encode_real(vae, x_uint8: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Real images uint8 [N, C, H, W] (on the CPU) -> the DiT's inputs [N, c, h, w] on `device`, encoded there
    `batch` images at a time: VAE latents (the posterior mean, scaled; DiT's train.py draws a posterior
    sample, whose std is small for SD's VAE), or the pixels in [-1, 1] for pixel-space backbones."""
    from raydd.protocols import to_float

    return torch.cat([vae.encode(to_float(x).to(device)) for x in x_uint8.split(batch)])


def train_tiny_backbone(config: dict, hooks: TrainHooks) -> None:
    """Train a tiny DiT on the real train split, held or streamed from the store (the job's dataset "train"),
    epoch after epoch, each batch encoded as it comes; report a diffusers model dir as the checkpoint.
    Data-parallel when hooks.world_size > 1 (each rank draws its own batches)."""
    from raydd.backbone import drop_labels, load_vae, save_transformer, tiny_dit
    from raydd.data import StreamedSplit, endless_batches, load_real
    from raydd.jobs import real_train

    bcfg, scfg, dcfg = BackboneConfig(**config["backbone"]), SamplerConfig(**config["sampler"]), DataConfig(**config["data"])
    torch.manual_seed(config["seed"])
    data = load_real(dcfg, train=hooks.dataset("train") is None)
    train = real_train(dcfg, hooks, data)                                 # held, or streamed from the store
    vae = load_vae(bcfg.vae, bcfg.vae_scale).to(hooks.device)             # identity in pixel space
    channels = vae.latent_channels or dcfg.channels                       # the DiT's input: [channels, side, side]
    side = dcfg.image_size // vae.downscale_factor
    model = tiny_dit(data.num_classes, channels, side, bcfg.hidden_size, bcfg.depth, bcfg.heads, bcfg.patch_size,
                     learned_sigma=True)                                  # one shared embedder, no module dropout
    opt = torch.optim.AdamW(model.parameters(), lr=bcfg.train_lr, weight_decay=0.0)
    net = hooks.prepare_model(model)
    device = hooks.device
    ema = EMA(model, decay=0.999, warmup=True)                            # (DiT: 0.9999 over 400k steps)
    loop = TrainLoop(hooks, "backbone", bcfg.train_steps, {"model": model, "ema": ema, "opt": opt})
    schedule = make_schedule(scfg)
    predict = transformer_predict(net, channels)
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + hooks.world_rank + loop.start)
    net.train()
    batches = endless_batches(train, bcfg.train_batch, gen)

    def final(d: str) -> dict:                                            # the EMA weights
        save_transformer(ema.copy_to(model).cpu(), f"{d}/transformer")
        return {"streamed": isinstance(train, StreamedSplit)}

    for step in loop.steps():
        images, labels = next(batches)                                    # uint8 [B, C, H, W], [B]
        x0 = encode_real(vae, images, device)                             # [B, channels, side, side]
        t = torch.randint(0, scfg.train_timesteps, (len(labels),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        y = drop_labels(labels.to(device), data.num_classes, gen)         # CFG: 10% null, once per sample
        losses = diffusion_losses(predict, x0, y, t, noise, schedule)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        loop.end_step(step, len(labels),
                      metrics=lambda: {"loss": loss.item(), "mse": losses["mse"].mean().item(),
                                       "vb": losses["vb"].detach().mean().item()}, final=final)


# --------------------------------------------------------------------------------------------
# Fine-tuning a DiT backbone (IMS3, RSM): one entry point, several objectives
# --------------------------------------------------------------------------------------------
# Extra loss terms added to L_simple + L_vlb, registered by the files that define them
# (raydd/objectives/*.py). Each is
#   term(predict, x0, y, t, x_t, noise, out, schedule, options) -> per-sample loss [B]
# where `out` is diffusion_losses' dict (mse, vb, x0_hat) and `options` the term's own settings.
LOSS_TERMS: dict[str, Callable] = {}


def register_loss_term(name: str):
    def deco(fn: Callable) -> Callable:
        LOSS_TERMS[name] = fn
        return fn
    return deco


def peft_parameters(model: torch.nn.Module, mode: str) -> list[str]:
    """Names of the parameters that train. "full": all. "difffit" (DiffFit-style PEFT): biases, norm
    parameters, scale factors and the class embedding; everything else stays bit-identical.

    Chosen by module type and parameter name, not by substrings of the full path: in diffusers'
    DiT the adaLN modulation (`norm1.linear.weight`) and the timestep MLP
    (`norm1.emb.timestep_embedder.linear_*.weight`) sit under a module named `norm1` but are
    weight matrices, not DiffFit parameters. Norm parameters = those owned by a leaf module whose
    class name contains "Norm" (LayerNorm, GroupNorm, RMSNorm, ...); scale factors = parameters
    named gamma*/scale* (DiffFit's added gammas; diffusers' DiT has none); class embedding = the
    label table (diffusers `class_embedder`, original DiT `y_embedder`)."""
    if mode == "full":
        return [n for n, _ in model.named_parameters()]
    if mode != "difffit":
        raise ValueError(f"peft mode {mode!r}; allowed: difffit, full")
    keep: set[str] = set()
    for mod_name, mod in model.named_modules():
        is_norm = "Norm" in type(mod).__name__ and next(mod.children(), None) is None
        is_label_table = bool({"class_embedder", "y_embedder"} & set(mod_name.split(".")))
        for p_name, _ in mod.named_parameters(recurse=False):
            if p_name == "bias" or is_norm or is_label_table or p_name.startswith(("gamma", "scale")):
                keep.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return [n for n, _ in model.named_parameters() if n in keep]


def finetune_config(backbone_source: str, data: DataConfig, sampler: SamplerConfig, *, steps: int, batch: int,
                    lr: float, peft: str, terms: dict[str, float], term_options: dict | None = None,
                    seed: int = 0, weight_decay: float = 0.0, ema: float = 0.9999, latent_size: int = 32,
                    vae: str = "identity", vae_scale: float = 0.18215) -> dict:
    """ema: the EMA decay of the weights that are saved and sampled from (Minimax/IMS3: 0.9999; 0 = the last)."""
    return {"backbone_source": backbone_source, "vae": vae, "vae_scale": vae_scale, "latent_size": latent_size,
            "data": asdict(data), "sampler": schedule_key(sampler), "steps": steps, "batch": batch, "lr": lr,
            "weight_decay": weight_decay, "ema": ema, "peft": peft, "terms": dict(terms),
            "term_options": term_options or {}, "seed": seed, "recipe": RECIPE,
            # the files that registered the terms: a Ray Train worker is a fresh process, the loop imports them
            "term_modules": sorted({LOSS_TERMS[k].__module__ for k in terms if k in LOSS_TERMS})}


def finetune(ctx, config: dict) -> Path:
    """finetune_loop on the real train split as a cached Ray Train job (ctx.train_cached) -> its entry dir. With
    data.latents the job streams the split's stored latents (ctx.stored_latents, encoded once) instead of encoding
    every batch, and its config says so (stored_latents: part of the key, as fp16 rounds the latents; absent
    otherwise, so older entries keep their keys)."""
    latents = ctx.stored_latents()
    config = config | ({"stored_latents": True} if latents else {})
    return ctx.train_cached("finetune", finetune_loop, config, reads=("train",), latents=latents)


def finetune_loop(config: dict, hooks: TrainHooks) -> None:
    """Fine-tune a DiT on the real train split: L = L_simple + L_vlb + sum_k lambda_k * term_k.
    peft="difffit" adds DiffFit's gammas and trains them with biases, norms and the label table. The split is
    held, or streamed from the store (the job's dataset "train": no worker holds it), epoch after epoch
    (raydd.data.endless_batches); each batch is encoded on the worker's device as it comes, as DiT's train.py
    does, or with stored_latents the stream is the split's latents (no VAE is loaded). Data-parallel across
    workers (DDP via hooks.prepare_model); reports a diffusers model dir `transformer/` (the EMA weights, gammas
    folded) as the final checkpoint, loadable with backbone.source=<dir>/transformer."""
    from raydd.backbone import add_difffit_gammas, drop_labels, fold_difffit_gammas, load_transformer, load_vae, \
        save_transformer
    from raydd.data import StreamedSplit, endless_batches, load_real, stream_spec, streamed_split
    from raydd.jobs import real_train

    for module in config.get("term_modules", []):                         # registers the terms here
        importlib.import_module(module)
    unknown = [k for k in config["terms"] if k not in LOSS_TERMS]
    if unknown:
        raise ValueError(f"unknown fine-tuning loss term(s) {unknown}; registered: {sorted(LOSS_TERMS)}")
    dcfg, scfg = DataConfig(**config["data"]), SamplerConfig(**config["sampler"])
    torch.manual_seed(config["seed"])
    data = load_real(dcfg, train=hooks.dataset("train") is None)
    model = load_transformer(config["backbone_source"])                    # one shared embedder (backbone.py)
    null_class, channels = int(model.config.num_embeds_ada_norm), int(model.config.in_channels)
    stored = bool(config.get("stored_latents"))
    if stored:                                                             # float16 [c, h, w]: the DiT's input
        side = int(model.config.sample_size)
        train = streamed_split(hooks.dataset("train"), stream_spec(dcfg), dcfg, latent_shape=(channels, side, side))
    else:
        train = real_train(dcfg, hooks, data)                              # held, or streamed from the store
    class_ids = torch.tensor(data.backbone_class_ids(null_class))          # label -> backbone class id [C]
    if config["peft"] == "difffit":
        add_difffit_gammas(model)
    trainable = set(peft_parameters(model, config["peft"]))
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                            weight_decay=config["weight_decay"])
    net = hooks.prepare_model(model)
    device = hooks.device
    vae = None if stored else load_vae(config["vae"], config["vae_scale"]).to(device).eval()
    ema = EMA(model, config["ema"])
    # the logged rows (the loss curve) are kept with the model as history.json
    loop = TrainLoop(hooks, "finetune", config["steps"], {"model": model, "opt": opt, "ema": ema},
                     curve_file="history.json")
    schedule = make_schedule(scfg)
    predict = transformer_predict(net, channels)
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + hooks.world_rank + loop.start)
    net.train()
    batches = endless_batches(train, config["batch"], gen)

    def final(d: str) -> dict:                                            # the EMA weights, gammas folded
        save_transformer(fold_difffit_gammas(ema.copy_to(model)).cpu(), f"{d}/transformer")
        return {"streamed": isinstance(train, StreamedSplit), "stored_latents": stored}

    for step in loop.steps():
        x, labels = next(batches)                                         # uint8 [B, C, H, W] or fp16 latents, [B]
        x0 = x.to(device).float() if stored else encode_real(vae, x, device)   # [B, c, h, w] latents
        B = len(labels)
        t = torch.randint(0, scfg.train_timesteps, (B,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        y = drop_labels(class_ids[labels].to(device), null_class, gen)    # CFG: 10% null, once per sample
        out = diffusion_losses(predict, x0, y, t, noise, schedule)
        loss, parts = out["loss"], {"mse": out["mse"].mean().item(), "vb": out["vb"].detach().mean().item()}
        x_t = q_sample(x0, t, noise, schedule)
        for name, lam in config["terms"].items():
            term = LOSS_TERMS[name](predict, x0, y, t, x_t, noise, out, schedule, config["term_options"].get(name, {}))
            loss = loss + lam * term
            parts[name] = term.detach().mean().item()
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        loop.end_step(step, B, metrics=lambda: {"loss": loss.item(), **parts}, final=final)
