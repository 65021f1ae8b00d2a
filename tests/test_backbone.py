"""raydd.backbone: loading DiTs / VAEs in every real format, on tiny models saved by the tests.

Tiny DiT used throughout: 5 classes, 2 channels, 8x8 inputs, hidden 32, 2 heads, depth 2, patch 2.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from raydd.backbone import (DIFFFIT_BLOCKS, LABEL_DROPOUT, Backbone, IdentityVAE, SDVAE, add_difffit_gammas,
                            convert_original_dit, drop_labels, fold_difffit_gammas, infer_num_heads, load_backbone,
                            load_transformer, load_vae, save_transformer, tiny_dit, to_original_dit)
from raydd.config import BackboneConfig

NUM_CLASSES, CHANNELS, SIZE, HIDDEN, HEADS, DEPTH, PATCH = 5, 2, 8, 32, 2, 2, 2


def make_dit(seed: int = 0, learned_sigma: bool = True):
    """A tiny DiT whose per-block embedders are identical, as in any model converted from DiT
    (DiT shares one t/y embedder; diffusers keeps a copy per block)."""
    torch.manual_seed(seed)
    model = tiny_dit(NUM_CLASSES, CHANNELS, SIZE, hidden_size=HIDDEN, depth=DEPTH, heads=HEADS,
                     patch_size=PATCH, learned_sigma=learned_sigma)
    with torch.no_grad():
        for p in model.parameters():  # make every weight matter (incl. biases diffusers inits to 0)
            p.normal_(0.0, 0.2)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model.eval()


def to_original(model) -> dict:
    """The model written out with facebookresearch/DiT's key names (the converter's inverse)."""
    return to_original_dit(model)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, CHANNELS, SIZE, SIZE, generator=g)                 # [B, C, H, W]
    t = torch.tensor([0, 1, 250, 500, 998, 999])                          # true timesteps
    y = torch.tensor([0, 1, 2, 3, 4, NUM_CLASSES])                        # last = null class
    return x, t, y


def run(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample               # [B, out_ch, H, W]


def uses_original_t_embedding(model) -> bool:
    """Every timestep projection uses DiT's frequencies (raydd.backbone switches diffusers' shift 1 -> 0)."""
    projs = [b.norm1.emb.time_proj for b in model.transformer_blocks]
    return len(projs) == DEPTH and all(p.downscale_freq_shift == 0 for p in projs)


def same(a, b):
    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


# ---- original .pt format -------------------------------------------------------------------
def test_original_key_names_and_conversion():
    model = make_dit()
    original = to_original(model)
    assert "blocks.1.attn.qkv.weight" in original and original["pos_embed"].shape == (1, (SIZE // PATCH) ** 2, HIDDEN)
    converted = convert_original_dit(original)
    assert "pos_embed" not in converted
    # every diffusers key is produced, with identical values (qkv split back into q, k, v)
    assert set(converted) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(converted[k], v), k


@pytest.mark.parametrize("nesting", ["plain", "ema", "train_checkpoint"])
def test_load_original_pt(tmp_path, inputs, nesting):
    model = make_dit()
    sd = to_original(model)
    if nesting == "ema":
        obj = {"ema": sd}
    elif nesting == "train_checkpoint":  # DiT train.py layout: EMA must win over "model"; args is a Namespace
        other = to_original(make_dit(seed=5))
        obj = {"model": other, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": argparse.Namespace(lr=1e-4)}
    else:
        obj = sd
    path = tmp_path / "DiT-tiny.pt"
    torch.save(obj, path)
    loaded = load_transformer(str(path), num_heads=HEADS)
    cfg = loaded.config
    assert (cfg.num_layers, cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.out_channels,
            cfg.num_embeds_ada_norm, cfg.num_attention_heads) == (DEPTH, SIZE, PATCH, CHANNELS, 2 * CHANNELS,
                                                                  NUM_CLASSES, HEADS)
    assert not loaded.training and uses_original_t_embedding(loaded)
    assert same(run(loaded, inputs), run(model, inputs))


def test_timestep_embedding_matches_original_dit(inputs):
    """DiT: freqs = exp(-ln(10000) * i / half), embedding = [cos, sin] (diffusers' default divides by half-1)."""
    _, t, _ = inputs
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # [B, 256]
    model = make_dit()
    for block in model.transformer_blocks:
        got = block.norm1.emb.time_proj(t)
        assert torch.allclose(got, expected, atol=1e-5)


def test_infer_num_heads():
    assert [infer_num_heads(h) for h in (384, 768, 1024, 1152)] == [6, 12, 16, 16]
    assert infer_num_heads(128) == 2
    with pytest.raises(ValueError, match="num_heads"):
        infer_num_heads(100)


# ---- diffusers dirs and the hub cache ------------------------------------------------------
def test_diffusers_dirs(tmp_path, inputs):
    model = make_dit()
    save_transformer(model, str(tmp_path / "bare"))
    save_transformer(model, str(tmp_path / "pipe" / "transformer"))
    assert (tmp_path / "bare" / "config.json").is_file()
    assert list((tmp_path / "bare").glob("*.safetensors"))
    ref = run(model, inputs)
    for d in ("bare", "pipe"):
        loaded = load_transformer(str(tmp_path / d))
        assert uses_original_t_embedding(loaded)
        assert same(run(loaded, inputs), ref), d
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_transformer(str(tmp_path / "empty"))


def tiny_autoencoder():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16).eval()


def test_hub_id_from_local_cache(tmp_path, monkeypatch, inputs):
    # real hub cache layout: <cache>/models--org--name/{refs/main, snapshots/<rev>/transformer/...}
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--testorg--tiny-dit"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    model = make_dit()
    save_transformer(model, str(snap / "transformer"))
    tiny_autoencoder().save_pretrained(str(snap / "vae"))
    # facebook/DiT-XL-2-256's transformer config still names the legacy class: it must load all the same
    cfg_path = snap / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"_class_name": "Transformer2DModel", "cross_attention_dim": None})
    cfg_path.write_text(json.dumps(cfg))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded = load_transformer("testorg/tiny-dit")
    assert same(run(loaded, inputs), run(model, inputs))
    vae = load_vae("testorg/tiny-dit")
    assert isinstance(vae, SDVAE) and vae.latent_channels == 4
    with pytest.raises(FileNotFoundError) as err:
        load_transformer("facebook/DiT-XL-2-256")
    assert "facebook/DiT-XL-2-256" in str(err.value) and "download" in str(err.value)


# ---- safetensors, overrides, errors ---------------------------------------------------------
def test_safetensors_both_formats(tmp_path, inputs):
    model = make_dit()
    ref = run(model, inputs)
    save_file(to_original(model), str(tmp_path / "orig.safetensors"))
    assert same(run(load_transformer(str(tmp_path / "orig.safetensors"), num_heads=HEADS), inputs), ref)
    diff_sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(diff_sd, str(tmp_path / "diff.safetensors"))
    assert same(run(load_transformer(str(tmp_path / "diff.safetensors"), num_heads=HEADS, sample_size=SIZE),
                    inputs), ref)
    with pytest.raises(ValueError, match="sample_size"):  # diffusers keys carry no pos_embed
        load_transformer(str(tmp_path / "diff.safetensors"), num_heads=HEADS)


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_checkpoint_override(tmp_path, inputs, fmt):
    base, other = make_dit(seed=0), make_dit(seed=1)
    save_transformer(base, str(tmp_path / "base"))
    ckpt = tmp_path / "ft.pt"
    torch.save({"ema": to_original(other)} if fmt == "original" else other.state_dict(), ckpt)
    loaded = load_transformer(str(tmp_path / "base"), checkpoint=str(ckpt))
    out = run(loaded, inputs)
    assert same(out, run(other, inputs))
    assert not same(out, run(base, inputs))


def test_wrong_shape_missing_and_unexpected_keys(tmp_path):
    save_transformer(make_dit(), str(tmp_path / "base"))
    sd = to_original(make_dit(seed=1))
    bad = dict(sd, **{"blocks.1.attn.proj.weight": torch.zeros(HIDDEN, HIDDEN + 1)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_transformer(str(tmp_path / "base"), checkpoint=str(tmp_path / "bad.pt"))
    msg = str(err.value)
    assert "blocks.1.attn.proj.weight" in msg and f"({HIDDEN}, {HIDDEN + 1})" in msg and f"({HIDDEN}, {HIDDEN})" in msg
    # the same corruption in a weights file used as the source
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj\.weight"):
        load_transformer(str(tmp_path / "bad.pt"), num_heads=HEADS)
    # missing and unexpected keys are listed
    partial = {k: v for k, v in sd.items() if k != "blocks.0.mlp.fc2.bias"}
    partial["blocks.0.extra.gamma"] = torch.ones(HIDDEN)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError) as err:
        load_transformer(str(tmp_path / "base"), checkpoint=str(tmp_path / "partial.pt"))
    assert "transformer_blocks.0.ff.net.2.bias" in str(err.value) and "blocks.0.extra.gamma" in str(err.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope/DiT-XL-2-256x256.pt"):
        load_transformer(str(tmp_path / "nope" / "DiT-XL-2-256x256.pt"))
    save_transformer(make_dit(), str(tmp_path / "base"))
    with pytest.raises(FileNotFoundError, match="missing_ema.pt"):
        load_transformer(str(tmp_path / "base"), checkpoint=str(tmp_path / "missing_ema.pt"))
    with pytest.raises(FileNotFoundError, match="no_vae_here"):
        load_vae(str(tmp_path / "no_vae_here"))


def test_check_sources_finds_files_without_loading_them(tmp_path):
    """The driver's check before Ray starts actors: each missing piece is named; present ones pass."""
    from raydd.backbone import check_sources
    from raydd.config import BackboneConfig

    save_transformer(make_dit(), str(tmp_path / "base"))
    (tmp_path / "ema.pt").write_bytes(b"not read by the check")
    check_sources(BackboneConfig(source=str(tmp_path / "base"), checkpoint=str(tmp_path / "ema.pt")))
    for cfg, missing in ((BackboneConfig(source=str(tmp_path / "nope")), "DiT source not found"),
                         (BackboneConfig(source=str(tmp_path / "base"), vae=str(tmp_path / "no_vae")), "VAE source"),
                         (BackboneConfig(source=str(tmp_path / "base"), checkpoint=str(tmp_path / "no.pt")),
                          "backbone.checkpoint not found")):
        with pytest.raises(FileNotFoundError, match=missing):
            check_sources(cfg)


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self):
        self.payload = 1


def test_unsafe_and_unreadable_files_refused(tmp_path):
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "hook": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_transformer(str(tmp_path / "evil.pt"))
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_transformer(str(tmp_path / "junk.pt"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_transformer(str(tmp_path / "junk.safetensors"))


# ---- VAEs -----------------------------------------------------------------------------------
def test_sd_vae(tmp_path):
    raw = tiny_autoencoder()
    raw.save_pretrained(str(tmp_path / "vae"))
    vae = load_vae(str(tmp_path / "vae"), scale=0.5)
    assert isinstance(vae, SDVAE) and vae.scale == 0.5 and vae.downscale_factor == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1                                  # images in [-1, 1]
    with torch.no_grad():
        z = vae.encode(x)                                                 # [2, 4, 8, 8]
        assert z.shape == (2, 4, 8, 8)
        assert torch.allclose(z, raw.encode(x).latent_dist.mean * 0.5, atol=1e-6)
        assert vae.decode(z).shape == (2, 3, 16, 16)
        assert torch.allclose(vae.decode(z), raw.decode(z / 0.5).sample, atol=1e-6)
        # a generator draws a posterior sample instead: reproducible, different from the mean
        s1 = vae.encode(x, generator=torch.Generator().manual_seed(3))
        s2 = vae.encode(x, generator=torch.Generator().manual_seed(3))
        assert torch.equal(s1, s2) and not torch.allclose(s1, z)


def test_identity_vae():
    vae = load_vae("identity")
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert isinstance(vae, IdentityVAE) and vae.scale == 1.0
    assert torch.equal(vae.decode(vae.encode(x)), x)


# ---- Backbone -------------------------------------------------------------------------------
@pytest.mark.parametrize("learned_sigma", [True, False])
def test_backbone_forward_and_grad(inputs, learned_sigma):
    x, t, y = inputs
    backbone = Backbone(make_dit(learned_sigma=learned_sigma), IdentityVAE())
    assert backbone.num_classes == NUM_CLASSES and backbone.latent_shape == (CHANNELS, SIZE, SIZE)
    assert backbone.learned_sigma == learned_sigma
    x_t = x.clone().requires_grad_(True)
    eps, var = backbone(x_t, t, y)
    assert eps.shape == x.shape
    if learned_sigma:
        assert var.shape == x.shape
        full = backbone.transformer(x_t, timestep=t, class_labels=y).sample
        assert torch.equal(torch.cat([eps, var], dim=1), full)
    else:
        assert var is None
    eps.square().sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


def test_load_backbone(tmp_path, inputs):
    model = make_dit()
    save_transformer(model, str(tmp_path / "tiny"))
    cfg = BackboneConfig(source=str(tmp_path / "tiny"), vae="identity")
    backbone = load_backbone(cfg, num_classes=NUM_CLASSES, channels=CHANNELS, image_size=SIZE)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    x, t, y = inputs
    eps, var = backbone(x, t, y)
    assert same(torch.cat([eps, var], 1), run(model, inputs))
    with pytest.raises(ValueError, match="image_size"):
        load_backbone(cfg, num_classes=NUM_CLASSES, channels=CHANNELS, image_size=16)
    with pytest.raises(ValueError, match="classes"):
        load_backbone(cfg, num_classes=NUM_CLASSES + 1, channels=CHANNELS, image_size=SIZE)
    with pytest.raises(ValueError, match="tiny"):
        load_backbone(BackboneConfig(source="tiny"), num_classes=NUM_CLASSES, channels=CHANNELS, image_size=SIZE)


def test_tiny_dit_details(inputs):
    model = tiny_dit(NUM_CLASSES, CHANNELS, SIZE, hidden_size=HIDDEN, depth=DEPTH, heads=HEADS, learned_sigma=False)
    emb = model.transformer_blocks[0].norm1.emb.class_embedder
    assert emb.embedding_table.num_embeddings == NUM_CLASSES + 1 and emb.dropout_prob == 0.0   # loops drop labels
    assert model.config.out_channels == CHANNELS
    zero = tiny_dit(NUM_CLASSES, CHANNELS, SIZE, hidden_size=HIDDEN, depth=DEPTH, heads=HEADS, zero_init=True)
    assert torch.count_nonzero(run(zero.eval(), inputs)) == 0             # adaLN-Zero: output starts at 0


# ---- one embedder, labels dropped once per sample (the original DiT's CFG training) ----------
def embedders(model):
    return [b.norm1.emb for b in model.transformer_blocks]


def test_one_shared_embedder_and_no_dropout_inside_the_model(inputs):
    """diffusers' DiT drops labels in every block independently in train(): the all-null input CFG needs
    then occurs with p = 0.1^depth. raydd's models share one embedder and drop nothing themselves."""
    model = make_dit()
    first, *rest = embedders(model)
    assert all(e is first for e in rest)
    peft_tables = [n for n, _ in model.named_parameters() if "class_embedder" in n]
    assert peft_tables == ["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]  # one table
    x, t, y = inputs
    x, t, y = x.repeat(20, 1, 1, 1), t.repeat(20), y.repeat(20)            # 120 samples: some would drop
    model.train()
    with torch.no_grad():
        train_out = model(x, timestep=t, class_labels=y).sample
    model.eval()
    with torch.no_grad():
        assert torch.equal(train_out, model(x, timestep=t, class_labels=y).sample)


def test_drop_labels_once_per_sample():
    y = torch.arange(10).repeat(2000)                                     # [20000]
    dropped = drop_labels(y, 10, torch.Generator().manual_seed(0))
    null = dropped == 10
    assert torch.equal(dropped[~null], y[~null])                          # a label is kept or made null, whole
    assert abs(null.float().mean().item() - LABEL_DROPOUT) < 0.01
    again = drop_labels(y, 10, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)                                    # seeded by the loop's generator


def test_loading_ties_equal_embedders_and_keeps_different_ones(tmp_path, inputs):
    model = make_dit()
    torch.save(to_original(model), tmp_path / "dit.pt")
    loaded = load_transformer(str(tmp_path / "dit.pt"), num_heads=HEADS)  # original format: one embedder
    assert all(e is embedders(loaded)[0] for e in embedders(loaded))
    save_transformer(loaded, str(tmp_path / "tied"))                     # written as one copy per block
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "tied" / "diffusion_pytorch_model.safetensors"))
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight" in sd
    again = load_transformer(str(tmp_path / "tied"))
    assert all(e is embedders(again)[0] for e in embedders(again))
    assert same(run(again, inputs), run(model, inputs))
    # a diffusers model trained with per-block embedders keeps them (tying would change its outputs)
    untied = make_dit()
    for b in untied.transformer_blocks[1:]:
        b.norm1.emb = __import__("copy").deepcopy(b.norm1.emb)
    with torch.no_grad():
        untied.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    reference = run(untied, inputs)
    save_transformer(untied, str(tmp_path / "untied"))
    with pytest.warns(UserWarning, match="embedders differ"):
        kept = load_transformer(str(tmp_path / "untied"))
    assert embedders(kept)[1] is not embedders(kept)[0]
    assert same(run(kept, inputs), reference)


# ---- DiffFit (Minimax / IMS3) -----------------------------------------------------------------
def close(a, b):
    """Folding scales weights before the matmul instead of its output: equal up to float rounding."""
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def random_gammas(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in ("gamma1", "gamma2"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def test_difffit_gammas_start_neutral_fold_exactly_and_train_in_peft(inputs):
    from raydd.finetune import peft_parameters

    model = make_dit()
    reference = run(model, inputs)
    add_difffit_gammas(model)
    names = {n for n, _ in model.named_parameters() if "gamma" in n}
    assert names == {f"transformer_blocks.{i}.{g}" for i in range(min(DEPTH, DIFFFIT_BLOCKS))
                     for g in ("gamma1", "gamma2", "attn1.gamma1", "attn1.gamma2")}
    assert model.transformer_blocks[0].attn1.gamma1.shape == (3 * HIDDEN,)
    assert same(run(model, inputs), reference)                            # all ones: nothing changes yet
    assert names <= set(peft_parameters(model, "difffit"))
    random_gammas(model)
    scaled = run(model, inputs)
    assert not same(scaled, reference)                                    # the hooks act
    fold_difffit_gammas(model)
    assert not any("gamma" in n for n, _ in model.named_parameters())
    assert close(run(model, inputs), scaled)                              # folded: the same function


def test_minimax_ims3_checkpoint_loads(tmp_path, inputs):
    """Minimax/IMS3 fine-tunes save {"model", "ema", "opt", "args"} in the original key format plus DiffFit's
    blocks.N.gamma1/gamma2 [D] and blocks.N.attn.gamma1 [3D] / attn.gamma2 [D]; sampling uses the EMA."""
    model = make_dit()
    add_difffit_gammas(model)
    random_gammas(model)
    expected = run(model, inputs)
    sd = to_original(model)
    for i in range(DEPTH):
        b = model.transformer_blocks[i]
        sd |= {f"blocks.{i}.gamma1": b.gamma1.detach().clone(), f"blocks.{i}.gamma2": b.gamma2.detach().clone(),
               f"blocks.{i}.attn.gamma1": b.attn1.gamma1.detach().clone(),
               f"blocks.{i}.attn.gamma2": b.attn1.gamma2.detach().clone()}
    other = to_original(make_dit(seed=4))
    torch.save({"model": other, "ema": sd, "opt": {}, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "0008000.pt")
    loaded = load_transformer(str(tmp_path / "0008000.pt"), num_heads=HEADS)
    assert close(run(loaded, inputs), expected)
    bad = dict(sd)
    del bad["blocks.1.attn.gamma2"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="block 1 has some gammas but not"):
        load_transformer(str(tmp_path / "bad.pt"), num_heads=HEADS)
