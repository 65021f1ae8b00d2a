"""The frozen class-conditional diffusion backbone: a diffusers DiT plus its VAE.

Everything that produces or loads a DiT goes through this module:

- `tiny_dit` builds a small `DiTTransformer2DModel` for pixel-space data (digits); the caller trains
  it and caches it with `save_transformer`.
- `load_transformer` loads a DiT from any of the formats the reference code and the hub use:
  a hub id (read from the local HF cache only), a local diffusers dir (pipeline layout with
  `transformer/`, or a bare model dir), an original facebookresearch/DiT `.pt` state dict
  (e.g. `DiT-XL-2-256x256.pt`, maybe nested under `ema`/`model`/`state_dict` as the Minimax/IMS3
  fine-tuned checkpoints are), or a `.safetensors` file in either key format.
- `load_vae` gives the latent codec: `IdentityVAE` for pixel-space backbones, `SDVAE` around a
  diffusers `AutoencoderKL` (stabilityai/sd-vae-ft-mse / -ema) for latent backbones.
- `Backbone` joins them; `Backbone.forward(x_t, t, y)` returns (eps, var_values). It does no
  classifier-free guidance: the sampler batches cond + uncond itself.

Timestep embedding: the original DiT embeds t with frequencies exp(-ln(10000) * i / 128),
i = 0..127, while diffusers' DiT uses i / 127 (`downscale_freq_shift=1`). All DiT weights we load
(the original .pt, the hub's converted copy of the same weights, Minimax/IMS3 fine-tunes) were
trained with the original formula, so every model built or loaded here is switched to it
(`use_original_timestep_embedding`). Our tiny DiT is built the same way, so training and loading
agree. Consequence: outputs differ slightly from diffusers' own `DiTPipeline`, by design.
That setting is not stored by `save_pretrained`: load models with `load_transformer` (not
`DiTTransformer2DModel.from_pretrained`) to get it back.

One embedder, labels dropped once per sample: the original DiT has one timestep embedder and one label
embedder (`t_embedder`, `y_embedder`) and, in training, replaces a sample's label with the null class
(index `num_classes`) with p = 0.1 - that is how the unconditional branch that classifier-free guidance
uses is learned. diffusers' DiT gives every block its own `CombinedTimestepLabelEmbeddings` (the final
layer uses block 0's), each dropping labels by itself in train() mode: the all-null input CFG needs then
occurs with p = 0.1^depth, and PEFT trains depth untied label tables. So every model built or loaded here
shares block 0's embedder across blocks (`share_embedder`; when loading, only if the copies are equal, as
in every checkpoint converted from the original format) with the modules' own dropout switched off, and
training loops drop labels once per sample themselves (`drop_labels`). Saved models write the shared
embedder into every block, the diffusers layout, so checkpoints load anywhere. Loaders return models in
eval() mode; the sampler passes the null class explicitly.

DiffFit (Minimax, IMS3): PEFT adds scale factors gamma to the first 14 blocks (`add_difffit_gammas`);
they are folded into the layers they scale before saving (`fold_difffit_gammas`), and a Minimax/IMS3
checkpoint in the original format has them folded when it is converted, so all of these load as plain
DiTs.

Precision: nothing here casts to a fixed dtype; run under torch.autocast (bf16 on CUDA) with
float32 weights.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.utils import is_accelerate_available

from raydd.config import BackboneConfig, ConfigError
from raydd.diffusion import split_output
from raydd.errors import CheckpointError

# Keys that wrap the real state dict in training checkpoints, in order of preference:
# DiT's train.py saves {"model", "ema", "opt", "args"}; the EMA weights are the ones to sample with.
NESTING_KEYS = ("ema", "model", "state_dict", "module")
# Number of attention heads of the published DiT sizes, by hidden size (S, B, L, XL). Heads are not
# visible in the tensors' shapes, so they have to come from a rule like this one.
DIT_HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}
TIMESTEP_FREQ_DIM = 256  # DiT's sinusoidal timestep embedding size (both formats)
LABEL_DROPOUT = 0.1      # DiT's class_dropout_prob: a training label becomes the null class with this probability
DIFFFIT_BLOCKS = 14      # DiffFit's gammas sit on blocks 0..13 (Minimax's models.py: use_gamma = [True] * 14 + ...)


# --------------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------------
class IdentityVAE(nn.Module):
    """Pixel-space backbones: the 'latent' is the image itself ([-1, 1], [B, C, H, W])."""

    scale = 1.0
    downscale_factor = 1      # latent side = image side
    latent_channels = None    # = the image's channels

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


def downscale_factor(vae_config) -> int:
    """An AutoencoderKL's side ratio: each down block but the last halves the side (4 blocks -> 8x: 256 px ->
    32x32 latents)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


class SDVAE(nn.Module):
    """Stable Diffusion's AutoencoderKL as used by DiT: latents = scale * posterior.

    encode(x) returns the posterior MEAN times `scale` (deterministic, so the same real image always
    gives the same latent - what latent statistics, inversion and caching need). DiT's training
    script draws a posterior sample instead; pass a `generator` to get that (the posterior std of
    sd-vae-ft-* is small, so the two differ little).
    """

    def __init__(self, vae: AutoencoderKL, scale: float = 0.18215):
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.latent_channels = int(vae.config.latent_channels)
        self.downscale_factor = downscale_factor(vae.config)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # x: [B, 3, H, W] in [-1, 1] -> [B, latent_channels, H/f, W/f]
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean if generator is None else posterior.sample(generator=generator)
        return z * self.scale

    def decode(self, z: Tensor) -> Tensor:
        # z: [B, latent_channels, h, w] (scaled) -> images [B, 3, h*f, w*f], roughly in [-1, 1]
        return self.vae.decode(z / self.scale).sample


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A class-conditional DiT and the VAE whose latents it denoises."""

    def __init__(self, transformer: DiTTransformer2DModel, vae: IdentityVAE | SDVAE):
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        cfg = transformer.config
        self.num_classes = int(cfg.num_embeds_ada_norm)  # null (unconditional) class index
        self.latent_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        out_channels = int(cfg.out_channels or cfg.in_channels)
        if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            raise CheckpointError(f"DiT out_channels={out_channels} must be in_channels ({cfg.in_channels}) "
                             f"or 2*in_channels (learned sigma)")
        self.learned_sigma = out_channels == 2 * cfg.in_channels
        self.activation_checkpointing = False  # set_activation_checkpointing

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """x_t [B,C,H,W]; t [B] int64 true timesteps in [0, 1000); y [B] int64 labels (num_classes = null).

        Returns (eps [B,C,H,W], var_values [B,C,H,W] raw model output for the learned-range
        variance, or None when the model does not learn sigma). No guidance here.
        """
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        y = torch.as_tensor(y, device=x_t.device)
        if t.ndim == 0:  # convenience: one timestep for the whole batch
            t = t.expand(b)
        if y.ndim == 0:
            y = y.expand(b)
        out = self.transformer(x_t, timestep=t, class_labels=y, return_dict=False)[0]  # [B, out_ch, H, W]
        return split_output(out, x_t.shape[1])


def set_activation_checkpointing(backbone: Backbone, on: bool) -> None:
    """Recompute the DiT's blocks and the VAE decoder's blocks in a backward pass instead of keeping their
    activations (diffusers' gradient checkpointing, torch.utils.checkpoint without re-entrance). It acts only
    where gradients are on, i.e. in guided steps; no-grad sampling is unchanged. Called every guided step: the
    modules are walked only when the setting changes."""
    if backbone.activation_checkpointing == on:
        return
    for model in (backbone.transformer, getattr(backbone.vae, "vae", None)):   # IdentityVAE has no model
        if model is not None:
            model.enable_gradient_checkpointing() if on else model.disable_gradient_checkpointing()
    backbone.activation_checkpointing = on


# --------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------
def use_original_timestep_embedding(model: nn.Module) -> nn.Module:
    """Switch every timestep projection to the original DiT frequencies (i / half, not i / (half-1))."""
    for module in model.modules():
        if hasattr(module, "downscale_freq_shift") and hasattr(module, "flip_sin_to_cos"):
            module.downscale_freq_shift = 0
    return model


def share_embedder(model: DiTTransformer2DModel, force: bool = False) -> bool:
    """One timestep + label embedder for all blocks (block 0's), as the original DiT; the modules' own label
    dropout off (training loops call `drop_labels`). Ties only when every block's copy holds the same
    weights (or force=True, for a freshly built model); returns whether the model is tied."""
    blocks = model.transformer_blocks
    first = blocks[0].norm1.emb
    for block in blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    reference = first.state_dict()
    same = all(all(torch.equal(v, reference[k]) for k, v in block.norm1.emb.state_dict().items())
               for block in blocks[1:])
    if same or force:
        for block in blocks[1:]:
            block.norm1.emb = first
    return same or force


def drop_labels(y: Tensor, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Classifier-free guidance training: each label becomes the null class with p = LABEL_DROPOUT, once per
    sample (DiT's LabelEmbedder.token_drop). y [B] -> [B]."""
    drop = torch.rand(len(y), generator=generator) < LABEL_DROPOUT
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


class _Scale:
    """Forward hook: out * owner.<name>[part] (a DiffFit gamma; a class, not a closure, so that deepcopy of the
    model makes the copy's hooks read the copy's gammas)."""

    def __init__(self, owner: nn.Module, name: str, part: int | None = None):
        self.owner, self.name, self.part = owner, name, part

    def gamma(self) -> Tensor:
        g = getattr(self.owner, self.name)
        return g if self.part is None else g.chunk(3)[self.part]

    def __call__(self, module, args, out):
        return out * self.gamma()


def add_difffit_gammas(model: DiTTransformer2DModel) -> None:
    """DiffFit's scale factors, all ones (the model's output is unchanged until they train), on the first
    DIFFFIT_BLOCKS blocks, named as in Minimax's models.py (D = hidden size):
        block.gamma1 [D]         x = x + gamma1 * gate_msa * Attn(...)
        block.gamma2 [D]         x = x + gamma2 * gate_mlp * MLP(...)
        block.attn1.gamma1 [3D]  [q, k, v] = gamma * qkv(x)
        block.attn1.gamma2 [D]   Attn out = gamma * proj(...)
    Each multiplies the output of the layer it follows (a forward hook), so the diffusers modules stay as they are."""
    for block in model.transformer_blocks[:DIFFFIT_BLOCKS]:
        if hasattr(block, "gamma1"):
            continue
        attn, d = block.attn1, block.norm1.linear.in_features
        device = block.norm1.linear.weight.device
        block.gamma1, block.gamma2 = nn.Parameter(torch.ones(d, device=device)), nn.Parameter(torch.ones(d, device=device))
        attn.gamma1, attn.gamma2 = nn.Parameter(torch.ones(3 * d, device=device)), nn.Parameter(torch.ones(d, device=device))
        for part, layer in enumerate((attn.to_q, attn.to_k, attn.to_v)):
            layer.register_forward_hook(_Scale(attn, "gamma1", part))
        attn.to_out[0].register_forward_hook(_Scale(attn, "gamma2"))
        attn.register_forward_hook(_Scale(block, "gamma1"))
        block.ff.register_forward_hook(_Scale(block, "gamma2"))


def _scale_rows(weight: Tensor, bias: Tensor | None, g: Tensor) -> tuple[Tensor, Tensor | None]:
    """A linear layer followed by an elementwise scale g [out] = the same layer with rows (and bias) scaled."""
    return weight * g[:, None], (None if bias is None else bias * g)


@torch.no_grad()
def fold_difffit_gammas(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Multiply every DiffFit gamma into the layer it scales and remove it (and its hooks): a plain diffusers DiT
    with the same outputs, the layout save_transformer writes."""
    for block in model.transformer_blocks:
        if not hasattr(block, "gamma1"):
            continue
        attn = block.attn1
        layers = list(zip((attn.to_q, attn.to_k, attn.to_v), attn.gamma1.chunk(3)))
        layers += [(attn.to_out[0], attn.gamma2 * block.gamma1), (block.ff.net[2], block.gamma2)]
        for layer, g in layers:
            w, b = _scale_rows(layer.weight, layer.bias, g)
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        for module in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0], attn, block.ff):
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _Scale):
                    del module._forward_hooks[key]
        del block.gamma1, block.gamma2, attn.gamma1, attn.gamma2
    return model


def _build_dit(*, num_classes: int, in_channels: int, out_channels: int, sample_size: int, hidden_size: int,
               depth: int, heads: int, patch_size: int) -> DiTTransformer2DModel:
    if hidden_size % heads:
        raise ConfigError(f"hidden size {hidden_size} is not divisible by {heads} heads")
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden_size // heads,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=depth,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,  # label table has num_classes + 1 rows: the last is the null class
        norm_type="ada_norm_zero",
    )
    return use_original_timestep_embedding(model)


def tie_after_load(model: DiTTransformer2DModel, origin: str) -> DiTTransformer2DModel:
    """A loaded DiT: one shared embedder when its blocks' copies are equal; otherwise (a model trained with
    per-block embedders) kept as it is, with a warning, since tying would change its outputs."""
    if not share_embedder(model):
        warnings.warn(f"{origin}: the blocks' timestep/label embedders differ (trained untied); kept per block")
    return model


def tiny_dit(num_classes: int, channels: int, image_size: int, hidden_size: int = 128, depth: int = 4,
             heads: int = 4, patch_size: int = 2, learned_sigma: bool = True,
             zero_init: bool = False) -> DiTTransformer2DModel:
    """A small pixel-space DiT (diffusers layout), e.g. for 16x16 digits.

    In train() mode its label embedding drops 10% of labels to the null class (index num_classes):
    that trains the unconditional branch used by classifier-free guidance.
    zero_init=True applies DiT's initialisation (xavier linears, adaLN-Zero: modulation and output
    layers zeroed), the recipe for training from scratch; the model then outputs exactly 0 until
    trained. The default keeps diffusers' (PyTorch) initialisation, so an untrained model gives
    non-trivial outputs and gradients (useful in tests).
    """
    if image_size % patch_size:
        raise ConfigError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    model = _build_dit(num_classes=num_classes, in_channels=channels,
                       out_channels=2 * channels if learned_sigma else channels, sample_size=image_size,
                       hidden_size=hidden_size, depth=depth, heads=heads, patch_size=patch_size)
    share_embedder(model, force=True)
    if zero_init:
        _dit_initialize(model)
    return model


@torch.no_grad()
def _dit_initialize(model: DiTTransformer2DModel) -> None:
    """facebookresearch/DiT's initialize_weights, on diffusers module names."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight  # patch embedding initialised like a linear layer
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def infer_num_heads(hidden_size: int) -> int:
    """Heads of a DiT from its hidden size: the published sizes S/B/L/XL (384/768/1024/1152 ->
    6/12/16/16); otherwise head dim 64 (as DiT-S/B/L). Pass num_heads= to override."""
    if hidden_size in DIT_HEADS_BY_HIDDEN:
        return DIT_HEADS_BY_HIDDEN[hidden_size]
    if hidden_size % 64 == 0:
        return hidden_size // 64
    raise ConfigError(f"cannot infer the number of attention heads for hidden size {hidden_size} "
                     f"(known DiT sizes: {DIT_HEADS_BY_HIDDEN}); pass num_heads=")


# --------------------------------------------------------------------------------------------
# Original DiT <-> diffusers key conversion
# --------------------------------------------------------------------------------------------
# original per-block sub-key -> diffusers per-block sub-key (qkv is split separately)
_BLOCK_MAP = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_TOP_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# shared embedders in DiT, copied into every diffusers block's norm1.emb
_SHARED_MAP = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def _is_original_format(sd: dict) -> bool:
    return any(k.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer."))
               for k in sd)


def _is_diffusers_format(sd: dict) -> bool:
    return any(k.startswith(("pos_embed.proj.", "transformer_blocks.", "proj_out_")) for k in sd)


def _convert(sd: dict) -> tuple[dict, dict]:
    """Original DiT keys -> diffusers keys. Returns (converted, {new key: original key})."""
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}

    def put(new: str, old: str, value: Tensor) -> None:
        out[new] = value
        source[new] = old

    gammas = {k: v for k, v in sd.items() if re.fullmatch(r"blocks\.\d+\.(attn\.)?gamma[12]", k)}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")  # leaf: weight | bias
        if key == "pos_embed" or key in gammas:
            continue  # pos_embed: a fixed sin-cos buffer diffusers recomputes; gammas: folded below
        if prefix in _TOP_MAP:
            put(f"{_TOP_MAP[prefix]}.{leaf}", key, value)
        elif prefix in _SHARED_MAP:
            if depth == 0:
                raise CheckpointError(f"original DiT state dict has {key!r} but no 'blocks.N.*' keys")
            for i in range(depth):  # shared in DiT, per block in diffusers
                put(f"transformer_blocks.{i}.{_SHARED_MAP[prefix]}.{leaf}", key, value)
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", prefix):
            i, sub = m.group(1), m.group(2)
            if sub == "attn.qkv":  # [3D, D] / [3D] -> q, k, v rows
                if value.shape[0] % 3:
                    raise CheckpointError(f"weight {key!r}: first dim {value.shape[0]} is not divisible by 3 (q, k, v)")
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    put(f"transformer_blocks.{i}.attn1.{name}.{leaf}", key, part)
            elif sub in _BLOCK_MAP:
                put(f"transformer_blocks.{i}.{_BLOCK_MAP[sub]}.{leaf}", key, value)
            else:
                put(key, key, value)  # unknown: kept, so strict loading reports it
        else:
            put(key, key, value)  # already diffusers-style or unknown: strict loading decides
    _fold_original_gammas(gammas, out)
    return out, source


def _fold_original_gammas(gammas: dict, out: dict) -> None:
    """DiffFit checkpoints (Minimax, IMS3): blocks.N.gamma1/gamma2 [D] and blocks.N.attn.gamma1 [3D] /
    attn.gamma2 [D] scale the outputs of attn.qkv, attn.proj and mlp.fc2 (see add_difffit_gammas), so they
    are multiplied into those converted layers' rows: the result is a plain DiT with the same outputs."""
    def scale(layer: str, g: Tensor, key: str) -> None:
        w = out.get(f"{layer}.weight")
        if w is None or w.shape[0] != g.shape[0]:
            raise CheckpointError(f"DiffFit weight {key!r} of shape {tuple(g.shape)} does not fit {layer!r} "
                             f"({None if w is None else tuple(w.shape)})")
        out[f"{layer}.weight"], bias = _scale_rows(w, out.get(f"{layer}.bias"), g)
        if bias is not None:
            out[f"{layer}.bias"] = bias

    for i in sorted({int(k.split(".")[1]) for k in gammas}):
        names = [f"blocks.{i}.{n}" for n in ("gamma1", "gamma2", "attn.gamma1", "attn.gamma2")]
        if missing := [n for n in names if n not in gammas]:
            raise CheckpointError(f"DiffFit checkpoint: block {i} has some gammas but not {missing}")
        g1, g2, attn_g1, attn_g2 = (gammas[n] for n in names)
        base = f"transformer_blocks.{i}"
        for name, part in zip(("to_q", "to_k", "to_v"), attn_g1.chunk(3)):
            scale(f"{base}.attn1.{name}", part, names[2])
        scale(f"{base}.attn1.to_out.0", attn_g2 * g1, f"{names[3]} * {names[0]}")
        scale(f"{base}.ff.net.2", g2, names[1])


def convert_original_dit(state_dict: dict) -> dict:
    """Original facebookresearch/DiT keys -> diffusers DiTTransformer2DModel keys.

    t_embedder / y_embedder are shared in DiT and copied into every block's norm1.emb (the copies
    share storage: clone before saving the result with safetensors); attn.qkv is split into
    to_q/to_k/to_v; final_layer -> proj_out_1 (adaLN) / proj_out_2 (linear); x_embedder.proj ->
    pos_embed.proj; pos_embed (a fixed sin-cos table) is dropped. Unknown keys pass through.
    """
    return _convert(state_dict)[0]


def to_original_dit(model: DiTTransformer2DModel) -> dict:
    """A diffusers DiT -> a state dict in facebookresearch/DiT's layout (how DiT-XL-2-256x256.pt is saved):
    the inverse of convert_original_dit, with block 0's embedder as the shared t/y embedders and the
    pos_embed sin-cos table. Fold DiffFit gammas first."""
    sd, emb = model.state_dict(), "transformer_blocks.0.norm1.emb"
    out = {"pos_embed": model.pos_embed.pos_embed}                        # [1, T, D]
    for original, new in list(_TOP_MAP.items()) + [(k, f"{emb}.{v[len('norm1.emb.'):]}") for k, v in _SHARED_MAP.items()]:
        for leaf in ("weight", "bias"):
            if f"{new}.{leaf}" in sd:
                out[f"{original}.{leaf}"] = sd[f"{new}.{leaf}"]
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([sd[f"{b}.attn1.{n}.{leaf}"] for n in ("to_q", "to_k", "to_v")])
            for original, new in _BLOCK_MAP.items():
                out[f"blocks.{i}.{original}.{leaf}"] = sd[f"{b}.{new}.{leaf}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Reading state dicts
# --------------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict:
    """Read a state dict from .safetensors or a torch.save file (weights-only), unwrapping nesting."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    else:
        try:
            # weights_only: tensors and plain containers only; argparse.Namespace is allowed too
            # because DiT's train.py stores its args next to the weights (a plain attribute bag).
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors, which weights-only "
                f"loading does not allow (a checkpoint must be a plain state dict). If you trust the "
                f"file, re-save just its state dict. Details: {str(e).splitlines()[0]}") from e
        except Exception as e:  # noqa: BLE001 - corrupt zip, truncated file, not a torch file...
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return _unwrap(sd, path)


def _unwrap(obj, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for key in NESTING_KEYS:  # {"ema": sd, "model": sd, ...} -> the preferred one
        if not _all_tensors(obj) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not _all_tensors(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)][:5]
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors (non-tensor entries: {bad}; "
                         f"looked for nesting under {list(NESTING_KEYS)})")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, Tensor) for v in d.values())


def _to_diffusers(sd: dict, path: Path) -> tuple[dict, dict, int | None]:
    """Any-format state dict -> (diffusers keys, {new key: key in file}, token grid side or None)."""
    if _is_original_format(sd):
        grid = None
        if "pos_embed" in sd:  # [1, T, D] with T = grid^2 tokens
            tokens = sd["pos_embed"].shape[-2]
            grid = math.isqrt(tokens)
            if grid * grid != tokens:
                raise CheckpointError(f"{path}: pos_embed has {tokens} tokens, not a square grid")
        converted, source = _convert(sd)
        return converted, source, grid
    if _is_diffusers_format(sd):
        return dict(sd), {k: k for k in sd}, None
    raise CheckpointError(f"{path}: keys match neither the original DiT nor the diffusers DiT layout "
                     f"(first keys: {list(sd)[:5]})")


def _load_strict(model: nn.Module, sd: dict, source: dict, origin: str) -> None:
    """load_state_dict(strict=True) with errors that name keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{origin}: state dict does not match the DiT: "
                         f"{len(missing)} missing keys (e.g. {missing[:5]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {[source.get(k, k) for k in unexpected[:5]]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            named = k if source.get(k, k) == k else f"{source[k]!r} (-> {k!r})"
            raise CheckpointError(f"{origin}: weight {named} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------
# Loading transformers and VAEs
# --------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _hub_cache_dir() -> str:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _resolve(source: str, what: str) -> Path:
    """A local path, or a hub id's snapshot dir from the local HF cache (never downloads)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    looks_like_id = (_HUB_ID.fullmatch(source) is not None and not source.endswith(_WEIGHT_SUFFIXES))
    if not looks_like_id:
        raise FileNotFoundError(f"{what} not found: {path} (no such file or directory)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(source, cache_dir=_hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"{what} {source!r}: no such local path, and hub id {source!r} is not in the local HF "
            f"cache ({_hub_cache_dir()}); nothing is downloaded at run time. Download it first "
            f"(`hf download {source}` / `huggingface-cli download {source}`) or pass a local "
            f"diffusers dir or an original .pt checkpoint") from e


def check_sources(cfg: BackboneConfig) -> None:
    """Find (not load) the backbone's files: a missing path, an uncached hub id or a missing checkpoint fails
    here, in the driver, with the loaders' message, instead of in every sampling actor once Ray started them."""
    if cfg.source != "tiny":                 # "tiny": trained on first use
        _resolve(cfg.source, "DiT source")
    if cfg.vae not in ("identity", "tiny"):
        _resolve(cfg.vae, "VAE source")
    if cfg.checkpoint and not Path(cfg.checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"backbone.checkpoint not found: {cfg.checkpoint} (no such file)")


def _from_pretrained_strict(cls, path: Path, subfolder: str | None, what: str):
    try:
        # low_cpu_mem_usage needs accelerate; say so explicitly to avoid diffusers' warning without it
        model, info = cls.from_pretrained(str(path), subfolder=subfolder, output_loading_info=True,
                                          low_cpu_mem_usage=is_accelerate_available())
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        where = path / subfolder if subfolder else path
        raise CheckpointError(f"cannot load {what} from {where}: {e}") from e
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
                if info.get(k)}
    if problems:
        raise CheckpointError(f"{what} at {path}: weights do not match the config: "
                         + "; ".join(f"{k}: {list(v)[:5]}" for k, v in problems.items()))
    return model


def _find_model_dir(path: Path, subfolder: str) -> str | None:
    """Pipeline layout (<dir>/<subfolder>/config.json) -> subfolder; bare model dir -> None."""
    if (path / subfolder / "config.json").is_file():
        return subfolder
    if (path / "config.json").is_file():
        return None
    contents = sorted(p.name for p in path.iterdir())[:10]
    raise FileNotFoundError(f"{path} is neither a diffusers pipeline dir (no {subfolder}/config.json) "
                            f"nor a model dir (no config.json); it contains {contents}")


def load_transformer(source: str, checkpoint: str = "", *, num_heads: int | None = None,
                     sample_size: int | None = None) -> DiTTransformer2DModel:
    """Load a DiT from a hub id (local cache), a diffusers dir, an original .pt or a .safetensors file.

    For weight files the architecture is inferred from the tensors: hidden size / in channels /
    patch from the patch embedding, depth from the block count, out channels from the last
    layer, num_classes = label-table rows - 1 (the last row is the null class), and the latent side
    from the original `pos_embed` ([1, (side/patch)^2, D]). Heads: `infer_num_heads` unless
    num_heads is given. A diffusers-format weight file has no pos_embed: pass sample_size.
    (num_heads / sample_size only matter for weight files; dirs carry a config.json.)
    `checkpoint` (either format) is then applied on top, strictly. Returns the model in eval().
    """
    path = _resolve(source, "DiT source")
    if path.is_dir():
        subfolder = _find_model_dir(path, "transformer")
        model = _from_pretrained_strict(DiTTransformer2DModel, path, subfolder, "DiT transformer")
        use_original_timestep_embedding(model)
    else:
        sd, src, grid = _to_diffusers(_read_state_dict(path), path)
        model = _dit_from_state_dict(sd, src, grid, path, num_heads, sample_size)
    if checkpoint:
        ckpt_path = Path(checkpoint).expanduser()
        sd, src, grid = _to_diffusers(_read_state_dict(ckpt_path), ckpt_path)
        side = model.config.sample_size // model.config.patch_size
        if grid is not None and grid != side:
            raise CheckpointError(f"checkpoint {ckpt_path}: pos_embed is a {grid}x{grid} token grid, "
                             f"the model's is {side}x{side}")
        _load_strict(model, sd, src, f"checkpoint {ckpt_path}")
    return tie_after_load(model, f"DiT {source}" + (f" + {checkpoint}" if checkpoint else "")).eval()


def _dit_from_state_dict(sd: dict, src: dict, grid: int | None, path: Path, num_heads: int | None,
                         sample_size: int | None) -> DiTTransformer2DModel:
    def need(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"{path}: missing weight {src.get(key, key)!r} needed to infer the architecture")
        return sd[key]

    patch_w = need("pos_embed.proj.weight")                     # [D, C_in, p, p]
    hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    out_rows = need("proj_out_2.weight").shape[0]               # [p*p*C_out, D]
    if out_rows % (patch * patch):
        raise CheckpointError(f"{path}: final linear has {out_rows} rows, not a multiple of patch^2={patch * patch}")
    out_channels = out_rows // (patch * patch)
    table = need("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")  # [classes+1, D]
    num_classes = table.shape[0] - 1
    if grid is not None:
        side = grid * patch
    elif sample_size is not None:
        side = int(sample_size)
    else:
        raise CheckpointError(f"{path}: cannot infer the input size (no original 'pos_embed'); pass sample_size=")
    heads = num_heads or infer_num_heads(hidden)
    model = _build_dit(num_classes=num_classes, in_channels=in_channels, out_channels=out_channels,
                       sample_size=side, hidden_size=hidden, depth=depth, heads=heads, patch_size=patch)
    _load_strict(model, sd, src, f"DiT weights {path}")
    return model


def load_vae(source: str, scale: float = 0.18215) -> IdentityVAE | SDVAE:
    """"identity" -> IdentityVAE; a hub id (local cache) or local dir -> SDVAE(AutoencoderKL).

    A dir may be the VAE itself (config.json) or a pipeline with a vae/ subfolder.
    """
    if source == "identity":
        return IdentityVAE()
    if source == "tiny":
        raise ValueError("backbone.vae='tiny' is not loaded by load_vae: train (or reuse) the cached tiny VAE first "
                         "(raydd.distill.ensure_backbone) and pass its saved directory")
    path, subfolder = _vae_location(source)
    vae = _from_pretrained_strict(AutoencoderKL, path, subfolder, "VAE")
    return SDVAE(vae.eval(), scale=scale)


def _vae_location(source: str) -> tuple[Path, str | None]:
    """A VAE source (hub id or local dir) -> (the dir, "vae" when it is a pipeline's subfolder, else None)."""
    path = _resolve(source, "VAE source")
    if not path.is_dir():
        raise CheckpointError(f"VAE source {path} must be a diffusers AutoencoderKL dir or hub id, not a file")
    return path, _find_model_dir(path, "vae")


def vae_latent_shape(source: str, image_size: int) -> tuple[int, int, int]:
    """[c, h, w] of a VAE's latents of image_size px images, from its config alone (no weights are loaded)."""
    path, subfolder = _vae_location(source)
    config = AutoencoderKL.load_config(str(path), subfolder=subfolder)
    side = image_size // downscale_factor(config)
    return int(config["latent_channels"]), side, side


@functools.lru_cache(maxsize=None)
def vae_fingerprint(source: str) -> str:
    """sha256 of a VAE's files (its config and weights, wherever they came from: a hub id's snapshot or a local
    dir, a pipeline's vae/ or a bare model dir): what keys latents encoded with it (raydd.prepare.latent_location).
    Hashed once a process (a run asks for its latents at each stage that reads them; SD's VAE is 335 MB)."""
    import hashlib

    path, subfolder = _vae_location(source)
    folder = path / subfolder if subfolder else path
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(2**24), b""):
                digest.update(block)
    return digest.hexdigest()


def load_backbone(cfg: BackboneConfig, num_classes: int, channels: int, image_size: int,
                  device="cpu") -> Backbone:
    """Transformer + VAE from the config, checked against the data, frozen, in eval() on `device`.

    Frozen = requires_grad False on every parameter (gradients still reach inputs such as x_t);
    methods that fine-tune switch on the parameters they train. The DiT may know more classes than
    the data (ImageNet subsets use DiT-XL's 1000 ImageNet labels; the caller maps labels), but not
    fewer. cfg.source == "tiny" is resolved by the caller (train, cache, pass the dir).
    """
    if cfg.source == "tiny":
        raise ValueError("backbone.source='tiny' is not loaded by load_backbone: train (or reuse) the cached "
                         "tiny DiT first and pass its saved directory as the source")
    vae = load_vae(cfg.vae, cfg.vae_scale)
    # weight files without pos_embed need the latent side: the image side in pixel space, else latent_size
    fallback_side = image_size if isinstance(vae, IdentityVAE) else cfg.latent_size
    transformer = load_transformer(cfg.source, cfg.checkpoint, sample_size=fallback_side)
    backbone = Backbone(transformer, vae)

    c, side, _ = backbone.latent_shape
    want_c = channels if isinstance(vae, IdentityVAE) else vae.latent_channels
    if c != want_c:
        raise CheckpointError(f"DiT {cfg.source!r} takes {c} input channels but backbone.vae={cfg.vae!r} with "
                         f"{channels}-channel images gives {want_c}")
    if side * vae.downscale_factor != image_size:
        raise CheckpointError(f"DiT {cfg.source!r} works on {side}x{side} latents = {side * vae.downscale_factor} px "
                         f"images through backbone.vae={cfg.vae!r}, but data.image_size={image_size}")
    if backbone.num_classes < num_classes:
        raise CheckpointError(f"DiT {cfg.source!r} knows {backbone.num_classes} classes, the data has {num_classes}")
    backbone.requires_grad_(False)
    return backbone.to(device).eval()


def save_transformer(model: DiTTransformer2DModel, path: str) -> None:
    """Save as a bare diffusers model dir (config.json + diffusion_pytorch_model.safetensors). A shared embedder
    is written into every block (safetensors stores no shared tensors; the diffusers layout has a copy per
    block), and the model is tied again afterwards. DiffFit gammas must be folded first."""
    if any(hasattr(block, "gamma1") for block in model.transformer_blocks):
        raise ValueError("save_transformer: the model has DiffFit gammas; fold_difffit_gammas(model) first")
    blocks = model.transformer_blocks
    shared = [i for i, block in enumerate(blocks) if i and block.norm1.emb is blocks[0].norm1.emb]
    for i in shared:
        blocks[i].norm1.emb = copy.deepcopy(blocks[0].norm1.emb)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path), safe_serialization=True)
    finally:
        for i in shared:
            blocks[i].norm1.emb = blocks[0].norm1.emb
