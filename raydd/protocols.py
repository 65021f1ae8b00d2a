"""Student evaluation protocols for distilled sets (plain PyTorch; no Ray, no MLflow here).

Two protocols (those of the reference repositories):

* hard-label (IDC / Minimax): train a fresh student on the distilled images with their class
  labels; SGD + MultiStepLR, RandomResizedCrop + flip + CutMix on every batch, λ-mixed CE.
* soft-label (RDED): a frozen teacher relabels every augmented + CutMix'ed batch; the student
  matches the teacher's temperature-softened distribution with a KL loss; AdamW + cosine.

Top-1 accuracy on the evaluation split is measured every few epochs; the best and the final
accuracy are reported (fractions in [0, 1]). DD-Ranking's HLR / IOR / LRS summarise a set
against the real-data and random-subset references (`dd_ranking`).

Images travel as uint8 [N, C, H, W]; `to_float` is the single normalisation that every raydd
classifier (students, teachers, selectors) is trained and evaluated with.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydd.config import EvalConfig
from raydd.data import Split, StreamedSplit, epoch_starts
from raydd.students import create_student

# uint8 -> [-1, 1]: (x / 255 - NORM_MEAN) / NORM_STD, identical for every channel
NORM_MEAN = 0.5
NORM_STD = 0.5


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """THE raydd classifier normalisation: uint8 [N, C, H, W] in [0, 255] -> float32 in [-1, 1].

    Students, teachers and selectors all see images through this function, so a classifier
    trained in one place can score images produced in another.
    """
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {x_uint8.dtype}")
    return (x_uint8.float() / 255.0 - NORM_MEAN) / NORM_STD


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def epochs_for(ipc: int, cfg: EvalConfig, soft: bool = False) -> int:
    """Training epochs for a distilled set with `ipc` images per class.

    `cfg.epochs > 0` overrides everything; the soft protocol uses `cfg.soft_epochs`; otherwise the
    first row [max_ipc, epochs] of `cfg.epochs_by_ipc` (ascending max_ipc) with ipc <= max_ipc,
    or the last row when ipc exceeds every max_ipc.
    """
    if cfg.epochs > 0:
        return int(cfg.epochs)
    if soft:
        return int(cfg.soft_epochs)
    rows = sorted(([int(r[0]), int(r[1])] for r in cfg.epochs_by_ipc), key=lambda r: r[0])
    if not rows:
        raise ValueError("eval.epochs_by_ipc is empty and eval.epochs is 0: no epoch count to use")
    for max_ipc, epochs in rows:
        if ipc <= max_ipc:
            return epochs
    return rows[-1][1]


def eval_epochs(epochs: int, eval_every: int) -> list[int]:
    """Epochs (1-based) after which the student is evaluated; always includes the last one.

    eval_every > 0: every `eval_every` epochs; 0: about 20 evaluations spread evenly over the run.
    """
    if eval_every > 0:
        marks = set(range(eval_every, epochs + 1, eval_every))
    else:
        marks = {max(1, round(k * epochs / 20)) for k in range(1, 21)}
    marks.add(epochs)
    return sorted(m for m in marks if 1 <= m <= epochs)


def cosine_factor(step: int, total_steps: int, half_quirk: bool) -> float:
    """LR multiplier of the soft protocol's per-step cosine schedule.

    Standard: 0.5 (1 + cos(π t / T)), 1 -> 0. The RDED reference code divides the phase by a
    further 2, 0.5 (1 + cos(π t / 2T)), so the schedule only decays to half the lr; `half_quirk`
    reproduces that.
    """
    period = total_steps * (2 if half_quirk else 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, period)))


# --------------------------------------------------------------------------------------------
# Batched augmentation (whole batch at once, driven by a torch.Generator)
# --------------------------------------------------------------------------------------------
def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator,
                             scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             flip_p: float = 0.5) -> torch.Tensor:
    """RandomResizedCrop (output size = input size) + random horizontal flip for a whole batch.

    Per image: crop area fraction a ~ U(scale), aspect ratio r = w/h log-uniform in `ratio`,
    crop side fractions w = sqrt(a r), h = sqrt(a / r) (clamped to 1 where they overflow, instead
    of torchvision's rejection loop), crop centre uniform such that the crop stays inside the
    image; flipped with probability flip_p. One affine grid per image, one grid_sample per batch.
    The random numbers come from `generator` (a CPU generator), so a fixed seed gives fixed crops.

    x: float [B, C, H, W] -> float [B, C, H, W]
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator, device=generator.device)           # [B, 5]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]                              # [B]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)                                                           # [B]
    w = torch.sqrt(area * r).clamp(max=1.0)    # crop width, fraction of the image width
    h = torch.sqrt(area / r).clamp(max=1.0)    # crop height, fraction of the image height
    # in affine_grid's normalised coordinates the image spans [-1, 1]: the crop's half-extent is
    # w (resp. h), so its centre may move within [-(1 - w), 1 - w]
    cx = (1.0 - w) * (2.0 * u[:, 2] - 1.0)
    cy = (1.0 - h) * (2.0 * u[:, 3] - 1.0)
    sign = 1.0 - 2.0 * (u[:, 4] < flip_p).float()   # -1 mirrors the x axis (horizontal flip)
    theta = torch.zeros(b, 2, 3, device=u.device)                                  # [B, 2, 3]
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    # align_corners=False: output pixel centres map onto input pixel centres, so the identity crop
    # (a = r = 1) reproduces x exactly and sign = -1 reproduces torch.flip(x, dims=[3])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)                # [B, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def shuffle_patches(x: torch.Tensor, generator: torch.Generator, k: int) -> torch.Tensor:
    """RDED's ShufflePatches(k): cut each image into k strips along its width and put them back in a random order,
    then the same along its height. x: float [B, C, H, W] -> [B, C, H, W]."""
    out = x.clone()
    for dim in (3, 2):                                                  # width, then height
        edges = [round(j * x.shape[dim] / k) for j in range(k + 1)]
        for b in range(len(x)):
            order = torch.randperm(k, generator=generator).tolist()
            strips = [out[b].narrow(dim - 1, edges[j], edges[j + 1] - edges[j]) for j in order]
            out[b] = torch.cat(strips, dim=dim - 1)
    return out


# AlexNet's PCA of ImageNet RGB pixels (eigenvalues, eigenvectors as columns), as IDC/Minimax's Lighting uses them
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def color_jitter_lighting(x01: torch.Tensor, generator: torch.Generator, jitter: float, lighting: float) -> torch.Tensor:
    """Minimax/IMS3's colour augmentation on images in [0, 1], per image: brightness, contrast and saturation factors
    ~ U(1 − jitter, 1 + jitter) (in that fixed order; torchvision draws a random order), then AlexNet's PCA
    lighting noise, α ~ N(0, lighting) per component (RGB only). x01: float [B, C, H, W] -> [B, C, H, W]."""
    b, c = x01.shape[:2]

    def gray(z):                                                        # [B, 1, H, W]
        return z if c == 1 else (z * torch.tensor([0.299, 0.587, 0.114], device=z.device).view(1, 3, 1, 1)).sum(1, True)

    if jitter > 0:
        f = (1 - jitter + 2 * jitter * torch.rand(b, 3, generator=generator)).clamp_min(0).to(x01.device)
        x01 = (x01 * f[:, 0].view(b, 1, 1, 1)).clamp(0, 1)                                       # brightness
        m = gray(x01).mean((1, 2, 3), keepdim=True)
        x01 = ((x01 - m) * f[:, 1].view(b, 1, 1, 1) + m).clamp(0, 1)                             # contrast
        if c == 3:
            g = gray(x01)
            x01 = ((x01 - g) * f[:, 2].view(b, 1, 1, 1) + g).clamp(0, 1)                         # saturation
    if lighting > 0 and c == 3:
        alpha = torch.randn(b, 3, generator=generator) * lighting                                # [B, 3]
        rgb = (alpha * _PCA_EIGVAL) @ _PCA_EIGVEC.T                                               # [B, 3]
        x01 = x01 + rgb.to(x01.device).view(b, 3, 1, 1)
    return x01


def augment(x: torch.Tensor, generator: torch.Generator, cfg: EvalConfig, soft: bool) -> torch.Tensor:
    """A training batch's augmentation before CutMix, in the reference code's order: ShufflePatches (RDED, soft
    protocol only: its teachers are trained without it) -> RandomResizedCrop + flip -> RandAugment(n, m) (IMS3) ->
    colour jitter + PCA lighting (Minimax/IMS3). x: float [B, C, H, W] in [-1, 1] (to_float) -> float [B, C, H, W].
    Every option but the crop is off in the shared protocol; the recipes (raydd/recipes/) turn on their papers'."""
    if soft and cfg.shuffle_patches > 1:
        x = shuffle_patches(x, generator, cfg.shuffle_patches)
    x = random_resized_crop_flip(x, generator, scale=(cfg.rrc_scale_min, 1.0), flip_p=0.5 if cfg.flip else 0.0)
    n_ops, magnitude = cfg.randaugment
    if n_ops > 0 or cfg.color_jitter > 0 or cfg.lighting > 0:
        x01 = (x * NORM_STD + NORM_MEAN).clamp(0, 1)
        if n_ops > 0:     # torchvision's per-image RandAugment; it draws from torch's (seeded, forked) global RNG
            from torchvision.transforms import v2

            ra = v2.RandAugment(num_ops=int(n_ops), magnitude=int(magnitude))
            x01 = torch.stack([ra(img) for img in x01])
        x = (color_jitter_lighting(x01, generator, cfg.color_jitter, cfg.lighting) - NORM_MEAN) / NORM_STD
    return x


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, beta: float = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019) on a whole batch: one box, one λ, a random pairing.

    λ ~ Beta(beta, beta); a box of side fractions sqrt(1 - λ) centred uniformly (clipped at the
    border) is pasted from the permuted batch; λ is then recomputed from the clipped box area.
    beta <= 0 disables mixing (λ = 1).

    x: [B, C, H, W], y: [B] -> (mixed x [B, C, H, W], y_a = y [B], y_b = y[perm] [B], λ)
    so that the target is λ·y_a + (1 − λ)·y_b.
    """
    b, _, hgt, wid = x.shape
    if beta <= 0:
        return x, y, y, 1.0
    # torch has no generator-driven Beta sampler: seed a numpy generator from the torch one
    np_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    lam = float(np.random.default_rng(np_seed).beta(beta, beta))
    perm = torch.randperm(b, generator=generator, device=generator.device).to(x.device)   # [B]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(hgt * cut), int(wid * cut)
    cyx = torch.rand(2, generator=generator, device=generator.device)
    cy, cx = int(cyx[0] * hgt), int(cyx[1] * wid)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, hgt)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, wid)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(hgt * wid)
    return mixed, y, y[perm], lam


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
def predict_batch_size(shape: tuple[int, ...]) -> int:
    """Images per batch when only predicting: 512, fewer for large images (about 4 M input values a batch, 21
    at 3x256x256), so that a convnet's activations stay near a GiB (512 at 256 px: 512x128x256x256x4 B = 17 GiB for
    one convnet_d1 layer's output, by arithmetic; Ray's memory monitor killed that run)."""
    return max(1, min(512, 2**22 // math.prod(shape)))


def accuracy(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 0,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy (fraction in [0, 1]) of `model` on uint8 images [N, C, H, W] with labels [N]."""
    return split_accuracy(model, Split(x_uint8, y), batch_size, device)


def split_accuracy(model: nn.Module, split: Split | StreamedSplit, batch_size: int = 0,
                   device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of `model` on a split (held or streamed), without autograd; batch_size 0 = by image size
    (predict_batch_size)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in split.ordered(batch_size or predict_batch_size(split.shape)):
            pred = model(to_float(xb.to(device))).argmax(dim=1)   # [b]
            correct += int((pred.cpu() == yb.cpu()).sum())
    model.train(was_training)
    return correct / max(1, len(split))


def build_student(student: str | nn.Module, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """A fresh student from its name (see raydd.students.list_students), or a given module as is."""
    if isinstance(student, nn.Module):
        return student
    return create_student(student, num_classes=num_classes, in_chans=in_chans, image_size=image_size)


def train_student(train_x: torch.Tensor, train_y: torch.Tensor,
                  eval_x: torch.Tensor | None, eval_y: torch.Tensor | None, **kwargs) -> dict:
    """Train a fresh student on (train_x, train_y) and track top-1 on (eval_x, eval_y): `fit_student` on
    held tensors. train_x, eval_x: uint8 [N, C, H, W]; train_y, eval_y: int64 [N]; eval_x = None skips
    evaluation (best_acc / final_acc are then None)."""
    if train_x.dtype != torch.uint8 or train_x.dim() != 4:
        raise ValueError(f"train_x must be uint8 [N, C, H, W]; got {train_x.dtype} {tuple(train_x.shape)}")
    if len(train_x) != len(train_y):
        raise ValueError(f"train_x ({len(train_x)}) and train_y ({len(train_y)}) must be equally long and non-empty")
    if (eval_x is None) != (eval_y is None):
        raise ValueError("pass both eval_x and eval_y, or neither")
    return fit_student(Split(train_x, train_y), Split(eval_x, eval_y) if eval_x is not None else None, **kwargs)


def fit_student(train: Split | StreamedSplit, evaluation: Split | StreamedSplit | None, *,
                student: str | nn.Module, num_classes: int, cfg: EvalConfig, epochs: int, seed: int,
                protocol: str = "hard", teacher: nn.Module | None = None,
                device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
                return_model: bool = False) -> dict:
    """Train a fresh student on a split, held in memory or streamed from Ray Data (raydd.data.StreamedSplit),
    and track its top-1 on `evaluation` (None: no evaluation).

    `student` is a name from raydd.students.list_students() (or an nn.Module, used as is). protocol "hard" or
    "soft" (soft needs `teacher`, a classifier over the same classes in the same order, fed `to_float`
    images).

    Returns {"best_acc", "final_acc", "curve": [(epoch, acc), ...], "images_per_s", "epochs",
    "train_s"} plus "model" (in eval mode) when return_model. Deterministic for a seed on CPU:
    model init draws from torch's global RNG seeded with `seed` inside a forked RNG state (the
    caller's RNG is untouched); batch order, crops, flips and CutMix come from a seeded Generator
    (a streamed split's order also depends on how Ray Data splits its blocks).
    """
    if protocol not in ("hard", "soft"):
        raise ValueError(f"protocol={protocol!r}; allowed: hard, soft")
    if protocol == "soft" and teacher is None:
        raise ValueError("the soft protocol needs a teacher (a trained classifier over the same classes)")
    if len(train) == 0:
        raise ValueError("the training split is empty")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    in_chans, height, image_size = train.shape
    if height != image_size:
        raise ValueError(f"students expect square images; got {height}x{image_size}")
    device = torch.device(device)
    n = len(train)

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = build_student(student, num_classes, in_chans, image_size).to(device)
        model.train()
        gen = torch.Generator().manual_seed(seed)   # batch order + augmentation + CutMix
        if isinstance(train, Split):                # held: on the device once
            train = Split(train.x.to(device), train.y.to(device=device, dtype=torch.long))

        bs = min(cfg.batch_size, n)
        steps_per_epoch = len(epoch_starts(n, bs))

        if protocol == "hard":
            opt = (torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                   if cfg.optimizer == "sgd" else    # "adamw": IGD's train.py (lr 1e-3, wd 0.01 in its recipe)
                   torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
            # IDC: lr x0.2 at 2/3 and at 5/6 of the epochs (stepped once per epoch); a milestone of 0
            # would already apply at construction, hence max(1, .) for very short runs
            sched = torch.optim.lr_scheduler.MultiStepLR(
                opt, milestones=[max(1, 2 * epochs // 3), max(1, 5 * epochs // 6)], gamma=0.2)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.soft_lr, weight_decay=cfg.soft_weight_decay)
            total = epochs * steps_per_epoch
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: cosine_factor(step, total, cfg.cosine_half_quirk))   # stepped per batch
            teacher = teacher.to(device).eval()
        temp = float(cfg.temperature)

        marks = set(eval_epochs(epochs, cfg.eval_every))   # evaluation (or, without eval_x, log) epochs
        curve: list[tuple[int, float]] = []
        images_seen, train_s = 0, 0.0
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss_sum, steps = torch.zeros((), device=device), 0   # summed on device: no per-step sync
            for xb, yb in train.batches(bs, gen):
                xb, yb = to_float(xb.to(device)), yb.to(device)                  # [b, C, H, W], [b]
                xb = augment(xb, gen, cfg, soft=protocol == "soft")
                xb, ya, yb2, lam = cutmix(xb, yb, gen, cfg.cutmix_beta)
                logits = model(xb)                                               # [b, K]
                if protocol == "hard":
                    # CutMix target λ·onehot(y_a) + (1 − λ)·onehot(y_b) == λ-mixed CE
                    loss = lam * F.cross_entropy(logits, ya) + (1.0 - lam) * F.cross_entropy(logits, yb2)
                else:
                    with torch.no_grad():
                        t_logits = teacher(xb)                                   # [b, K]
                    if t_logits.shape[1] != num_classes:
                        raise ValueError(f"teacher outputs {t_logits.shape[1]} classes, student {num_classes}")
                    # RDED: KL(softmax(teacher/T) || softmax(student/T)), batch mean. No T² factor,
                    # as in the reference code: AdamW's update is (up to eps) invariant to a constant
                    # loss scale, so T² would only change the logged loss value.
                    loss = F.kl_div(F.log_softmax(logits / temp, dim=1), F.softmax(t_logits / temp, dim=1),
                                    reduction="batchmean")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if protocol == "soft":
                    sched.step()
                loss_sum += loss.detach()
                images_seen, steps = images_seen + len(yb), steps + 1
            if protocol == "hard":
                sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_s += time.perf_counter() - t0

            if epoch in marks:
                line = (f"[{protocol}] epoch {epoch}/{epochs} loss {float(loss_sum) / max(steps, 1):.4g} "
                        f"lr {opt.param_groups[0]['lr']:.2e}")
                if evaluation is not None:
                    acc = split_accuracy(model, evaluation, device=device)
                    curve.append((epoch, acc))
                    line += f" acc {acc:.4f}"
                if log is not None:
                    log(line)

    result = {
        "best_acc": max(a for _, a in curve) if curve else None,
        "final_acc": curve[-1][1] if curve else None,
        "curve": curve,
        "images_per_s": images_seen / max(train_s, 1e-9),
        "epochs": epochs,
        "train_s": train_s,
    }
    if return_model:
        result["model"] = model.eval()
    return result


def train_teacher(train: Split | StreamedSplit, *, arch: str, num_classes: int,
                  cfg: EvalConfig, epochs: int, seed: int, device: str | torch.device = "cpu",
                  log: Callable[[str], None] | None = None) -> nn.Module:
    """A hard-label classifier trained on real data (held or streamed; the soft protocol's teacher), frozen,
    eval mode. Same recipe as the hard protocol (SGD, MultiStepLR, RRC + flip + CutMix, λ-mixed CE).
    """
    res = fit_student(train, None, student=arch, num_classes=num_classes, cfg=cfg,
                      epochs=epochs, seed=seed, protocol="hard", device=device, log=log, return_model=True)
    model = res["model"].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if log is not None:
        log(f"[teacher] {arch}: train top-1 {split_accuracy(model, train, device=device):.4f} "
            f"after {epochs} epochs ({res['images_per_s']:.0f} img/s)")
    return model


# --------------------------------------------------------------------------------------------
# DD-Ranking
# --------------------------------------------------------------------------------------------
def dd_ranking(acc_real_hard: float, acc_syn_hard: float, acc_syn: float, acc_random: float) -> dict:
    """DD-Ranking scores from accuracies given as fractions in [0, 1].

    HLR = acc(real, hard) − acc(syn, hard)      (hard-label recovery: lower is better)
    IOR = acc(syn) − acc(random)                (improvement over random: higher is better)
    α   = ½·IOR − ½·HLR ∈ [−1, 1]
    LRS = (e^α − e^−1) / (e − e^−1) ∈ [0, 1]    (label-robust score)

    The DD-Ranking reference code feeds percentages (0–100) into the exponential, which makes
    LRS meaningless (e^±50); we insist on fractions and reject anything outside [0, 1].
    """
    accs = {"acc_real_hard": acc_real_hard, "acc_syn_hard": acc_syn_hard,
            "acc_syn": acc_syn, "acc_random": acc_random}
    for name, v in accs.items():
        if not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"dd_ranking: {name}={v} is outside [0, 1]; pass accuracies as fractions, "
                             f"not percentages")
    hlr = float(acc_real_hard) - float(acc_syn_hard)
    ior = float(acc_syn) - float(acc_random)
    alpha = 0.5 * ior - 0.5 * hlr
    lrs = (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))
    return {"HLR": hlr, "IOR": ior, "LRS": lrs}
