"""Turning rows (class, slot, seed) into samples: the plain-PyTorch core of the sharded sampler.

`SampleBatches` is a callable class with the shape Ray Data's `map_batches` wants (constructor loads
the backbone and guidance models once; __call__ maps a dict of numpy columns to a dict of numpy
columns), but it imports no Ray: the same object runs in-process in unit tests.

Rows carry a `unit` id. A unit is the set of rows always denoised together in one batch (a fixed
chunk of `batch_size` rows for slot-wise sampling, a whole class for CGS). Because a unit's
composition is fixed by the driver, the output is bit-identical whatever the number of actors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from raydd.config import BackboneConfig, SamplerConfig
from raydd.data import DataError
from raydd.sampling import Guidance, sample, sample_seed, to_uint8


@dataclass
class DistilledSet:
    images: torch.Tensor                 # uint8 [N, C, H, W]
    labels: torch.Tensor                 # int64 [N] (position in the preset's class list)
    slots: torch.Tensor                  # int64 [N] (index within the class)
    latents: torch.Tensor | None = None  # float16 [N, c, h, w] (the DiT's space) or None (real images)
    scores: torch.Tensor | None = None   # float32 [N] (last guidance objective; NaN if unguided)

    def __len__(self) -> int:
        return len(self.labels)

    def sorted(self) -> "DistilledSet":
        """Canonical order: by (label, slot)."""
        order = np.lexsort((self.slots.numpy(), self.labels.numpy()))
        return self.take(torch.from_numpy(order))

    def take(self, idx: torch.Tensor) -> "DistilledSet":
        return DistilledSet(self.images[idx], self.labels[idx], self.slots[idx],
                            None if self.latents is None else self.latents[idx],
                            None if self.scores is None else self.scores[idx])


def make_rows(num_classes: int, per_class: int, run_seed: int, unit_size: int, by_class: bool = False,
              stream: str = "", classes: list[int] | None = None) -> dict[str, np.ndarray]:
    """Rows for `per_class` samples of each class, class-major. Units: consecutive chunks of
    `unit_size` rows (batches mix classes), or one unit per class when by_class."""
    classes = list(range(num_classes)) if classes is None else classes
    cls = np.repeat(np.array(classes, dtype=np.int64), per_class)
    slot = np.tile(np.arange(per_class, dtype=np.int64), len(classes))
    seed = np.array([sample_seed(run_seed, int(c), int(s), stream) for c, s in zip(cls, slot)], dtype=np.int64)
    unit = cls.copy() if by_class else np.arange(len(cls), dtype=np.int64) // unit_size
    return {"class_idx": cls, "slot": slot, "seed": seed, "unit": unit}


def map_units(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
              batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply fn to each unit's rows of a batch (a unit is always processed whole) and concatenate."""
    outs = [fn({k: v[batch["unit"] == u] for k, v in batch.items()}) for u in np.unique(batch["unit"])]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@dataclass
class BackboneSpec:
    """Everything an actor needs to load the frozen backbone by itself (picklable, small)."""
    cfg: BackboneConfig
    num_classes: int
    channels: int
    image_size: int
    class_ids: list[int] = field(default_factory=list)  # label -> backbone class id

    def load(self, device: str | torch.device = "cpu"):
        from raydd.backbone import load_backbone

        model = load_backbone(self.cfg, num_classes=self.num_classes, channels=self.channels,
                              image_size=self.image_size, device=device)
        model.eval().requires_grad_(False)
        return model


GuidanceFactory = Callable[[Any, torch.device], Guidance]  # (backbone, device) -> Guidance
# (backbone, device) -> post_step(i, x_prev, x0_hat, y, abar_prev) -> x_prev' (see raydd.sampling.sample), built once per
# actor like a Guidance; batch-level updates (CGS) see a whole unit, e.g. one class's IPC samples
PostStepFactory = Callable[[Any, torch.device], Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 matmuls run about twice as fast as
    fp32; elsewhere torch emulates bf16 and it is slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_for(precision: str, device: torch.device) -> torch.dtype | None:
    """compute.precision -> the dtype the backbone runs in under autocast (None: fp32).
    "bf16" on CUDA, and on CPUs with native bf16 (the tiny DiT at batch 64: 1.3-1.9x the fp32 rate across runs
    here, `python -m raydd.bench --only batching`); on other CPUs it stays fp32, with a warning."""
    if precision != "bf16":
        return None
    if device.type == "cpu" and not cpu_has_bf16():
        warnings.warn("compute.precision=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 "
                      "is slower than fp32; sampling in fp32")
        return None
    return torch.bfloat16


class SampleBatches:
    """rows -> samples. Constructor: load backbone (+ guidance models) once. Call: denoise each unit."""

    def __init__(self, spec: BackboneSpec, sampler: SamplerConfig, guidance_factory: GuidanceFactory | None = None,
                 gpus: float = 0.0, threads: int = 0, precision: str = "fp32",
                 post_step_factory: PostStepFactory | None = None):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = pick_device(gpus)
        self.spec, self.sampler = spec, sampler
        self.backbone = spec.load(self.device)
        self.guidance = guidance_factory(self.backbone, self.device) if guidance_factory else None
        self.post_step = post_step_factory(self.backbone, self.device) if post_step_factory else None
        self.autocast = autocast_for(precision, self.device)
        self.class_ids = torch.tensor(spec.class_ids or list(range(spec.num_classes)), dtype=torch.long)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return map_units(self.run_unit, batch)

    def run_unit(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = torch.from_numpy(rows["class_idx"])
        y = self.class_ids[labels]                                   # backbone class ids [B]
        out = sample(self.backbone, y, rows["seed"].tolist(), self.sampler, self.guidance,
                     device=self.device, autocast_dtype=self.autocast, post_step=self.post_step)
        with torch.no_grad():
            images = to_uint8(self.backbone.vae.decode(out["z0"]))   # uint8 [B,C,H,W]
        return {
            "class_idx": rows["class_idx"], "slot": rows["slot"], "seed": rows["seed"], "unit": rows["unit"],
            "image": images.cpu().numpy(),                           # uint8: 4x less to ship than float32
            "latent": out["z0"].to(torch.float16).cpu().numpy(),
            "score": out["J"].cpu().numpy().astype(np.float32),
        }


def rows_to_set(cols: dict[str, np.ndarray]) -> DistilledSet:
    """Output columns (any row order) -> DistilledSet in canonical (label, slot) order."""
    s = DistilledSet(
        images=torch.from_numpy(np.ascontiguousarray(np.stack(cols["image"]))),
        labels=torch.from_numpy(np.asarray(cols["class_idx"], dtype=np.int64)),
        slots=torch.from_numpy(np.asarray(cols["slot"], dtype=np.int64)),
        latents=torch.from_numpy(np.ascontiguousarray(np.stack(cols["latent"]))) if "latent" in cols else None,
        scores=torch.from_numpy(np.asarray(cols["score"], dtype=np.float32)) if "score" in cols else None,
    )
    return s.sorted()


def generate_local(spec: BackboneSpec, sampler: SamplerConfig, rows: dict[str, np.ndarray],
                   guidance_factory: GuidanceFactory | None = None,
                   post_step_factory: PostStepFactory | None = None) -> DistilledSet:
    """The in-process path (tests, benchmarks): same code as one actor, units in order."""
    fn = SampleBatches(spec, sampler, guidance_factory, post_step_factory=post_step_factory)
    return rows_to_set(fn(rows))


def random_picks(y: torch.Tensor, ipc: int, seed: int) -> torch.Tensor:
    """Positions of `ipc` images per class among labels y [N], class by class, a function of (seed, class) only:
    the `random` baseline and DD-Ranking's reference (held or streamed splits pick the same)."""
    counts = torch.bincount(y)
    if int(counts.min()) < ipc:
        raise DataError(f"ipc={ipc} is larger than the real pool: class {int(counts.argmin())} has only "
                        f"{int(counts.min())} training images")
    picks = []
    for c in range(len(counts)):
        idx = torch.nonzero(y == c).flatten()
        g = torch.Generator().manual_seed(sample_seed(seed, c, 0, "random"))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    return torch.cat(picks)                                                        # [C * ipc]


def random_subset(train, ipc: int, seed: int) -> DistilledSet:
    """`ipc` real images per class (raydd.generate.random_picks) from a split: held, streamed (one pass) or a
    store's (raydd.data.StoredPart: only the picked rows are read)."""
    picked = train.take(random_picks(train.y, ipc, seed))
    return DistilledSet(images=picked.x, labels=picked.y, slots=torch.arange(ipc).repeat(len(picked) // ipc))
