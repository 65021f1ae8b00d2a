"""Information objectives (IGDS, seed 001): the variational estimator (VE) of the prototype
information I(X;Y) and the contextual information H(X|Y), its training loop, and the guidance
objective J = Î(X;Y) + β·Ĥ(X|Y).

The VE (paper §4.1):
  encoder    f_θ : x -> x̂ ∈ R^D, ‖x̂‖ = 1           (instance discrimination, MoCo-style)
  σ(x̂)      = softmax(x̂ / τ) ∈ Δ^D                  (the embedding read as a distribution)
  Q_y        = E[σ(x̂) | y]                           (class mean, stored with the checkpoint)
  classifier g_ψ : x̂ -> P(ŷ | x) ∈ Δ^C              (trained on the frozen encoder, cross-entropy)
Estimates (Eq. 9 and 15):
  Î(X;Y) = H(Ŷ) + E log P(ŷ = y | x),   H(Ŷ) = entropy of the mean predicted distribution p̄
  Ĥ(X|Y) = E KL(σ(x̂) ‖ Q_y)
Training objective of the encoder (maximised): J_VE = I_NCE(X;X̂) + λ·E KL(σ(x̂) ‖ Q_y), i.e. the
loss L = InfoNCE − λ·KL. Both terms are lower bounds (of I(X;X̂) and of I(X;X̂|Y) ≤ H(X|Y)) that
the VE tightens by maximising them; λ < 0 gives the other reading of the paper's sign (the KL as a
class-clustering regulariser). During training Q_y is an EMA of batch class means (no gradient);
after training it is recomputed exactly on the real train split.

Per-sample J for guidance, with a FIXED marginal: H(Ŷ) is a property of a whole set, and its
batch estimate (p̄ over the sampling batch) made a sample's gradient depend on its batch mates and,
with class-major batches (~4 classes in a batch of 32 at ImageNet-100), pushed every sample toward
the classes absent from its batch. A distilled set is class-balanced by construction, so its
predicted marginal is the uniform one when every sample is classified as its label: we take
p̄ = 1/C, so h_i = −Σ_c p_ic log p̄_c = log C is a constant and
    J_i = log C + log P(ŷ = y_i | x_i) + β·KL(σ(x̂_i) ‖ Q_{y_i}),
a function of the sample alone (outputs independent of batch size and actor count). `estimate`
still reports the set-level H(Ŷ) of what was made.

Checkpoint: <dir>/ve.safetensors (encoder.*, classifier.*, q_y [C, D]) + <dir>/ve.json (architecture,
data shape, estimates on real data) + <dir>/curve.json (training curve).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydd.config import DataConfig
from raydd.errors import CheckpointError
from raydd.generate import actor_device, images_of, rows_with
from raydd.sampling import Guidance
from raydd.train_hooks import TrainHooks, TrainLoop

VE_WEIGHTS, VE_META, VE_CURVE = "ve.safetensors", "ve.json", "curve.json"


class VEError(CheckpointError):
    """A variational-estimator checkpoint is missing pieces or does not fit the run."""


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------
class VariationalEstimator(nn.Module):
    """f_θ (encoder), g_ψ (classifier) and Q_y. forward(x [B,C,H,W] in [-1,1]) ->
    x̂ [B,D] (unit norm), log σ(x̂) [B,D], classifier logits [B,C]."""

    def __init__(self, encoder: str, embed_dim: int, num_classes: int, channels: int, image_size: int,
                 tau: float, width: int = 64, cls_hidden: int = 256):
        super().__init__()
        from raydd.students import ConvNet, create_student, list_students

        if encoder not in list_students():
            raise VEError(f"VE encoder {encoder!r}; allowed: {', '.join(list_students())}")
        self.arch = dict(encoder=encoder, embed_dim=embed_dim, num_classes=num_classes, channels=channels,
                         image_size=image_size, tau=tau, width=width, cls_hidden=cls_hidden)
        self.tau = tau
        self.image_size = image_size
        if encoder.startswith("convnet_d"):                                            # x -> R^D
            self.encoder = ConvNet(int(encoder[len("convnet_d"):]), embed_dim, channels, image_size, width=width)
        else:
            self.encoder = create_student(encoder, embed_dim, channels, image_size)
        self.classifier = nn.Sequential(nn.Linear(embed_dim, cls_hidden), nn.ReLU(),   # x̂ -> logits [C]
                                        nn.Linear(cls_hidden, num_classes))
        self.register_buffer("q_y", torch.full((num_classes, embed_dim), 1.0 / embed_dim))  # [C, D]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=1)                                     # x̂ [B, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:           # decoded size differs
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x_hat = self.embed(x)                                                          # [B, D]
        return x_hat, F.log_softmax(x_hat / self.tau, dim=1), self.classifier(x_hat)


def kl_to_class_mean(log_sigma: torch.Tensor, q_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(σ(x̂_i) ‖ Q_{y_i}) per sample: log_sigma [B,D], q_y [C,D], y [B] -> [B]."""
    return (log_sigma.exp() * (log_sigma - q_y[y].clamp_min(1e-12).log())).sum(1)


def information_terms(ve: VariationalEstimator, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample pieces of the estimates for images x [B,C,H,W] in [-1,1] with labels y [B]:
    p [B,C] = P(ŷ|x), log_p_y [B] = log P(ŷ=y|x), kl [B] = KL(σ(x̂) ‖ Q_y)."""
    _, log_sigma, logits = ve(x)
    log_p = F.log_softmax(logits, dim=1)                                               # [B, C]
    return {"p": log_p.exp(), "log_p_y": log_p.gather(1, y[:, None]).squeeze(1),
            "kl": kl_to_class_mean(log_sigma, ve.q_y, y)}


def per_sample_objective(ve: VariationalEstimator, x: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """J_i = log C + log P(ŷ=y_i|x_i) + β·KL(σ(x̂_i) ‖ Q_{y_i})   (H(Ŷ) at the uniform marginal, log C).
    x [B,C,H,W] in [-1,1], y [B] labels -> [B]; row i depends on row i only."""
    terms = information_terms(ve, x, y)
    return math.log(terms["p"].shape[1]) + terms["log_p_y"] + beta * terms["kl"]


@torch.no_grad()
def estimate(ve: VariationalEstimator, split, batch: int = 256, device: str | torch.device = "cpu") -> dict[str, float]:
    """Î(X;Y), Ĥ(X|Y) and the VE classifier's accuracy on a whole set: a raydd.data.Split (uint8 images
    [N,C,H,W], labels [N]) or a StreamedSplit, read `batch` rows at a time."""
    from raydd.protocols import to_float

    ve = ve.eval().to(device)
    terms = [dict(information_terms(ve, to_float(xb).to(device), yb.to(device)), labels=yb)
             for xb, yb in split.ordered(batch)]
    return set_estimates(*(torch.cat([t[k].cpu() for t in terms]) for k in ("p", "log_p_y", "kl", "labels")))


def set_estimates(p: torch.Tensor, log_p_y: torch.Tensor, kl: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The estimates on a set from the per-sample terms of all its images (information_terms): p [N,C], log_p_y [N],
    kl [N], labels [N]. Î(X;Y) = H(Ŷ) + E log P(ŷ=y|x) with H(Ŷ) the entropy of the mean prediction p̄."""
    p_bar = p.mean(0)
    h_yhat = float(-(p_bar * p_bar.clamp_min(1e-12).log()).sum())                      # H(Ŷ)
    return {"I_XY": h_yhat + float(log_p_y.mean()), "H_X_given_Y": float(kl.mean()), "H_Yhat": h_yhat,
            "log_p_y": float(log_p_y.mean()), "acc": float((p.argmax(1) == labels).float().mean()),
            "n": len(labels)}


class InformationTerms:
    """ctx.map UDF: rows {"class_idx", "image" uint8 [N,C,H,W] (or a StagedSet's "unit_file"/"pos"), ...} -> the same
    rows plus the VE's per-sample terms "p" [N,C], "log_p_y" [N], "kl" [N] (information_terms). IGDS's estimates on
    its set come from these (set_estimates): the images are read on the actors, not by the driver."""

    def __init__(self, ve_path: str, num_classes: int, gpus: float = 0.0, threads: int = 0, batch: int = 256):
        self.device = actor_device(gpus, threads)
        self.ve, _ = load_ve(ve_path, num_classes=num_classes, device=self.device)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydd.protocols import to_float

        x = torch.from_numpy(images_of(rows))                                             # uint8 [N,C,H,W]
        y = torch.from_numpy(np.asarray(rows["class_idx"], dtype=np.int64))
        terms = [information_terms(self.ve, to_float(xb).to(self.device), yb.to(self.device))
                 for xb, yb in zip(x.split(self.batch), y.split(self.batch))]
        out = {k: torch.cat([t[k] for t in terms]).float().cpu().numpy() for k in ("p", "log_p_y", "kl")}
        return rows_with(rows, **out)


# --------------------------------------------------------------------------------------------
# Checkpoint: safetensors + json
# --------------------------------------------------------------------------------------------
def save_ve(ve: VariationalEstimator, out_dir: str | Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in ve.state_dict().items()}, str(out / VE_WEIGHTS))
    (out / VE_META).write_text(json.dumps({"arch": ve.arch, **meta}, indent=1, default=str))


def ve_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, metadata) of a VE given as its directory or its .safetensors file (ve.json beside it)."""
    p = Path(path).expanduser()
    weights, meta = (p / VE_WEIGHTS, p / VE_META) if p.is_dir() else (p, p.with_name(VE_META))
    if not weights.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"igds.ve_checkpoint={str(path)!r}: no variational estimator there (need {weights.name} and "
            f"{meta.name}: a directory written by the IGDS VE training job, or its {VE_WEIGHTS} file). "
            f"Leave igds.ve_checkpoint empty to train one (cached by config hash)")
    return weights, meta


def load_ve(path: str | Path, *, num_classes: int | None = None, channels: int | None = None,
            device: str | torch.device = "cpu") -> tuple[VariationalEstimator, dict]:
    """A trained VE, frozen and in eval mode, plus its json metadata. Fails loudly (never random
    weights): FileNotFoundError when the files are missing, VEError on wrong shapes or a VE built
    for other data."""
    from safetensors.torch import load_file

    weights, meta_file = ve_files(path)
    meta = json.loads(meta_file.read_text())
    arch = meta.get("arch") or {}
    need = ("encoder", "embed_dim", "num_classes", "channels", "image_size", "tau")
    if any(k not in arch for k in need):
        raise VEError(f"{meta_file}: 'arch' must name {', '.join(need)}; got {sorted(arch)}")
    for name, want in (("num_classes", num_classes), ("channels", channels)):
        if want is not None and int(arch[name]) != int(want):
            raise VEError(f"VE {weights} was trained for {name}={arch[name]}, but this run has {name}={want}")
    ve = VariationalEstimator(**arch)
    state = load_file(str(weights))
    expected = ve.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise VEError(f"VE checkpoint {weights} does not fit its architecture {arch}: "
                      f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    ve.load_state_dict(state, strict=True)
    return ve.eval().requires_grad_(False).to(device), meta


# --------------------------------------------------------------------------------------------
# Guidance: J = Î(X;Y) + β·Ĥ(X|Y) on decoded x̂0
# --------------------------------------------------------------------------------------------
@dataclass
class IGDSState:
    ve: VariationalEstimator
    beta: float
    label_of: torch.Tensor   # [max backbone id + 1]: backbone class id -> label (-1 elsewhere)


def igds_objective(x0_images: torch.Tensor, t: torch.Tensor, y: torch.Tensor, state: IGDSState) -> torch.Tensor:
    """The sampler's objective (maximised): decoded x̂0 [B,C,H,W] in [-1,1], y backbone ids [B] -> J [B]."""
    return per_sample_objective(state.ve, x0_images, state.label_of[y], state.beta)


def make_guidance(backbone, device, *, ve_path: str, beta: float, scale: float, window: tuple[int, int],
                  mode: str, class_ids: list[int]) -> Guidance:
    """Guidance factory (use with functools.partial): loads the VE once per sampling actor."""
    ve, _ = load_ve(ve_path, num_classes=len(class_ids), device=device)
    label_of = torch.full((max(class_ids) + 1,), -1, dtype=torch.long)
    label_of[torch.tensor(class_ids)] = torch.arange(len(class_ids))
    return Guidance(igds_objective, scale, window=tuple(window), mode=mode, on_images=True,
                    state=IGDSState(ve, float(beta), label_of.to(device)))


# --------------------------------------------------------------------------------------------
# Training loop (Ray Train via ctx.train_cached; plain PyTorch under run_local)
# --------------------------------------------------------------------------------------------
@dataclass
class VETrainConfig:
    data: dict                     # DataConfig as a dict (the real train split the VE learns)
    encoder: str = "convnet_d3"    # f_θ: any raydd student name; its head outputs the embedding
    width: int = 64                # convnet_dN encoders: channels per block (the students use 128)
    embed_dim: int = 128           # D
    tau: float = 0.07              # InfoNCE temperature, also σ(x̂) = softmax(x̂ / τ)
    lam: float = 0.1               # λ: weight of E KL(σ(x̂) ‖ Q_y) in J_VE (maximised)
    queue_size: int = 4096         # MoCo negatives (capped at half the train split)
    momentum: float = 0.99         # key-encoder EMA
    q_momentum: float = 0.9        # EMA of Q_y during training
    steps: int = 1000              # encoder steps
    cls_steps: int = 300           # classifier steps on the frozen encoder
    batch: int = 128
    lr: float = 1e-3               # AdamW, encoder
    cls_lr: float = 3e-3           # AdamW, classifier
    crop_scale_min: float = 0.5    # random_resized_crop_flip scale (min, 1)
    flip: bool = False             # horizontal flips in the two views (off for digits)
    seed: int = 0
    draws: str = "epochs"          # batches: epochs of the shuffled split (raydd.data.endless_batches), no longer
                                   # i.i.d. picks of a held split (part of the cache key: older VEs are not reused)


def ve_config(data_cfg: DataConfig, **fields) -> dict:
    """The VE job's JSON-able config (also its cache key)."""
    return asdict(VETrainConfig(data=asdict(data_cfg), **fields))


def _views(x: torch.Tensor, gen: torch.Generator, cfg: VETrainConfig) -> torch.Tensor:
    from raydd.protocols import random_resized_crop_flip

    return random_resized_crop_flip(x, gen, scale=(cfg.crop_scale_min, 1.0), flip_p=0.5 if cfg.flip else 0.0)


def ve_train_loop(config: dict, hooks: TrainHooks) -> None:
    """Phase 1 (`steps`): encoder with L = InfoNCE(q, k+, queue) − λ·E KL(σ(q) ‖ Q_y); phase 2
    (`cls_steps`): classifier on the frozen encoder. Then Q_y exactly on the train split, the
    estimates on train/val, and the checkpoint (ve.safetensors + ve.json + curve.json).
    The splits are held, or streamed from the store (the job's datasets "train" and "val": no worker holds
    them); training draws epoch after epoch (raydd.data.endless_batches)."""
    from raydd.data import endless_batches, load_real
    from raydd.jobs import real_split, real_train
    from raydd.protocols import to_float

    cfg = VETrainConfig(**config)
    dcfg = DataConfig(**cfg.data)
    torch.manual_seed(cfg.seed)
    data = load_real(dcfg, train=hooks.dataset("train") is None)
    train, val = real_train(dcfg, hooks, data), real_split(dcfg, hooks, data, "val", "val")
    N, C, D = len(train), data.num_classes, cfg.embed_dim
    ve = VariationalEstimator(cfg.encoder, D, C, dcfg.channels, dcfg.image_size, cfg.tau, cfg.width)
    key_encoder = copy.deepcopy(ve.encoder).requires_grad_(False)                   # f_θ' (momentum)
    K = max(cfg.batch, min(cfg.queue_size, N // 2) // cfg.batch * cfg.batch)        # a multiple of the batch
    queue = F.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(cfg.seed)), dim=1)  # [K, D]
    q_ema = torch.full((C, D), 1.0 / D)                                             # Q_y during training
    opt_f = torch.optim.AdamW(ve.encoder.parameters(), lr=cfg.lr, weight_decay=1e-4)
    opt_g = torch.optim.AdamW(ve.classifier.parameters(), lr=cfg.cls_lr, weight_decay=1e-4)
    total = cfg.steps + cfg.cls_steps                       # a log row and a checkpoint at the phase boundary too
    loop = TrainLoop(hooks, "ve", total, {"ve": ve, "key": key_encoder, "opt_f": opt_f, "opt_g": opt_g},
                     curve_file=VE_CURVE, breaks=(cfg.steps,))
    ptr = 0
    if loop.saved:                                                                  # resumed: the rest of the state
        queue, q_ema, ptr = loop.saved["queue"], loop.saved["q_ema"], int(loop.saved["ptr"])
    device = hooks.device
    encoder = hooks.prepare_model(ve.encoder)                                       # DDP when world_size > 1
    classifier = hooks.prepare_model(ve.classifier)
    ve.to(device), key_encoder.to(device)
    queue, q_ema = queue.to(device), q_ema.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + hooks.world_rank + loop.start)
    batches = endless_batches(train, cfg.batch, gen)

    def final(d: str) -> dict:
        batches.close()                                                 # its stream ends before _finish reads again
        return _finish(ve, train, val, data.class_names, cfg, d, device)

    for step in loop.steps():
        images, labels = next(batches)
        x, y = to_float(images).to(device), labels.to(device)                      # [B,C,H,W] in [-1,1], [B]
        if step < cfg.steps:                                                        # phase 1: f_θ
            encoder.train()
            q = F.normalize(encoder(_views(x, gen, cfg)), dim=1)                    # queries [B, D]
            with torch.no_grad():
                for pk, pq in zip(key_encoder.parameters(), ve.encoder.parameters()):
                    pk.mul_(cfg.momentum).add_(pq.detach(), alpha=1 - cfg.momentum)
                k = F.normalize(key_encoder(_views(x, gen, cfg)), dim=1)            # keys [B, D]
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / cfg.tau  # [B, 1 + K]
            nce = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=device))
            log_sigma = F.log_softmax(q / cfg.tau, dim=1)                           # log σ(x̂) [B, D]
            kl = kl_to_class_mean(log_sigma, q_ema, y).mean()
            loss = nce - cfg.lam * kl
            opt_f.zero_grad(set_to_none=True)
            loss.backward()
            opt_f.step()
            with torch.no_grad():
                queue[ptr:ptr + len(k)] = k                                         # enqueue, oldest out
                ptr = (ptr + len(k)) % K
                counts = torch.bincount(y, minlength=C).float()                    # [C]
                sums = torch.zeros_like(q_ema).index_add_(0, y, log_sigma.detach().exp())  # [C, D]
                seen = counts > 0                                                   # batch class means -> EMA
                q_ema[seen] = cfg.q_momentum * q_ema[seen] + (1 - cfg.q_momentum) * sums[seen] / counts[seen, None]
            row = {"nce": nce.item(), "kl": kl.item(), "loss": loss.item()}
        else:                                                                       # phase 2: g_ψ
            with torch.no_grad():
                x_hat = F.normalize(ve.encoder.eval()(_views(x, gen, cfg)), dim=1)
            logits = classifier(x_hat)
            ce = F.cross_entropy(logits, y)
            opt_g.zero_grad(set_to_none=True)
            ce.backward()
            opt_g.step()
            row = {"ce": ce.item(), "cls_acc": float((logits.argmax(1) == y).float().mean())}
        loop.end_step(step, len(y), metrics=lambda: {"phase": 1 if step < cfg.steps else 2, **row},
                      final=final,
                      extra=lambda: {"queue": queue.cpu(), "q_ema": q_ema.cpu(), "ptr": ptr})


@torch.no_grad()
def _finish(ve: VariationalEstimator, train, val, class_names: list[str], cfg: VETrainConfig, out_dir: str,
            device) -> dict:
    """Q_y = class mean of σ(x̂) on the (unaugmented) train split, one pass; estimates on train and val; save.
    train, val: raydd.data.Split or StreamedSplit."""
    from raydd.data import StreamedSplit
    from raydd.protocols import to_float

    ve.eval()
    C = len(class_names)
    sums, counts = torch.zeros(C, cfg.embed_dim), torch.zeros(C)                       # Σ σ(x̂) per class [C, D]
    for xb, yb in train.ordered(256):
        sums.index_add_(0, yb, ve(to_float(xb).to(device))[1].exp().cpu())
        counts += torch.bincount(yb, minlength=C)
    ve.q_y.copy_((sums / counts[:, None]).to(device))
    est = {name: estimate(ve, split, device=device) for name, split in (("train", train), ("val", val)) if len(split)}
    save_ve(ve, out_dir, {"class_names": class_names, "estimates": est, "train_config": asdict(cfg),
                          "uniform_bound": {"I_XY_max": math.log(C), "H_X_given_Y_max": math.log(cfg.embed_dim)}})
    return {"streamed": isinstance(train, StreamedSplit)}
