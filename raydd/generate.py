"""Turning rows (class, slot, seed) into samples: the plain-PyTorch core of the sharded sampler.

`SampleBatches` is a callable class, the shape every stage's work has (constructor loads the backbone and
guidance models once; __call__ maps a dict of numpy columns to a dict of numpy columns). It imports no Ray:
the actor pool (raydd.distributed.pool) builds it in each actor, and the same object runs in-process in unit
tests.

Rows carry a `unit` id. A unit is the set of rows always denoised together in one batch (a fixed
chunk of `batch_size` rows for slot-wise sampling, a whole class for CGS). Because a unit's
composition is fixed by the driver, the output is bit-identical whatever the number of actors.

Given a stage directory, an actor writes each finished unit there itself (`<stage>/unit-<u>.npz`) and returns
only its light columns; the driver then holds a `StagedSet` (labels, slots, scores and where each row lives) and
reads images only for the rows it takes. Selection steps score on the actors (`image_columns`, `images_of`) and
fetch what they keep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import posixpath
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.fs as pafs
import torch

from raydd.config import BackboneConfig, SamplerConfig
from raydd.data import DataError, store_filesystem
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

    def subset(self, idx, slots: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> "DistilledSet":
        """Rows idx (new slots / scores for them, if given), as StagedSet.subset."""
        s = self.take(torch.as_tensor(np.asarray(idx, dtype=np.int64)))
        return DistilledSet(s.images, s.labels, s.slots if slots is None else slots, s.latents,
                            s.scores if scores is None else scores)

    def classes(self) -> Iterator[tuple[int, "DistilledSet"]]:
        """(label, that class's rows in slot order), in label order."""
        s = self.sorted()
        for c in s.labels.unique().tolist():
            yield c, s.take(torch.nonzero(s.labels == c).flatten())

    def columns(self, key: str) -> dict[str, np.ndarray]:
        """The columns a map UDF reads this set's `key` ("image" or "latent") from (raydd.generate.heavy_column): the
        arrays themselves ({} for latents a set does not have)."""
        value = self.images if key == "image" else self.latents
        return {} if value is None else {key: value.numpy()}

    def image_columns(self) -> dict[str, np.ndarray]:
        return self.columns("image")

    def latent_std(self) -> float | None:
        return None if self.latents is None else float(self.latents.float().std())


HEAVY = ("image", "latent")   # the columns a unit file keeps and a staged stage does not send to the driver


# --- unit files: <stage>/unit-<u>.npz, the stage a path or a pyarrow URI (file://, s3://, gs://, ...) ------------
@functools.lru_cache(maxsize=32)
def stage_filesystem(stage: str):
    """(pyarrow FileSystem, the stage's path on it), made once per stage and process: one S3 client, not one a file."""
    return store_filesystem(stage)


def unit_file(stage: str | Path, u: int) -> str:
    return f"{stage}/unit-{int(u)}.npz"


@contextlib.contextmanager
def open_unit(file: str):
    """np.load of a unit file, wherever its stage is (members load one by one, when read); a written set's class
    file (.parquet, raydd.outputs.ClassFile) reads as one too."""
    fs, root = stage_filesystem(posixpath.dirname(str(file)))
    with fs.open_input_file(f"{root}/{posixpath.basename(str(file))}") as fh:
        if str(file).endswith(".parquet"):
            from raydd.outputs import ClassFile, class_of_file

            yield ClassFile(fh, class_of_file(file))
            return
        with np.load(fh, allow_pickle=False) as z:
            yield z


def unit_exists(stage: str, u: int) -> bool:
    """Whether the stage holds unit u's whole file (an actor wrote it)."""
    fs, root = stage_filesystem(str(stage))
    return fs.get_file_info(f"{root}/unit-{int(u)}.npz").type != pafs.FileType.NotFound


def stage_units(stage: str) -> list[int]:
    """The units whose files a stage holds (whole files only: temp files are hidden); none if it does not exist."""
    fs, root = stage_filesystem(str(stage))
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
    return sorted(int(m.group(1)) for m in map(re.compile(r"unit-(\d+)\.npz").fullmatch, names) if m)


def remove_stale_temps(stage: str, older_than_s: float = 3600.0) -> list[str]:
    """Delete the temp files of unit writes that never finished (a writer killed mid-write; save_unit) when they are
    over an hour old, and return their names. Only old ones: a live write takes seconds, and a URI stage can be in
    use by a driver on another machine, whose lock this process does not see."""
    import time

    fs, root = stage_filesystem(str(stage))
    stale = [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if re.fullmatch(r"\.unit-\d+\.\d+\.tmp\.npz", i.base_name)
             and i.mtime is not None and time.time() - i.mtime.timestamp() > older_than_s]
    for info in stale:
        fs.delete_file(info.path)
    return [i.base_name for i in stale]


def save_unit(stage_dir: str | Path, cols: dict[str, np.ndarray]) -> None:
    """One unit's columns -> <stage_dir>/unit-<u>.npz, atomically (a temp name, then a rename; on an object store
    the object appears whole): a file that exists is whole, and a unit that is run twice (a retried task) writes the
    same bytes. Column names are np.savez's keywords: "file" and "allow_pickle" cannot be columns."""
    u = int(cols["unit"][0])
    fs, root = stage_filesystem(str(stage_dir))
    buf = io.BytesIO()
    np.savez(buf, **cols)
    tmp = f"{root}/.unit-{u}.{os.getpid()}.tmp.npz"                     # hidden: stage_units lists whole files
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(buf.getbuffer())
    fs.move(tmp, f"{root}/unit-{u}.npz")


def read_rows(files: np.ndarray, pos: np.ndarray, keys: tuple[str, ...], like: str = "") -> dict[str, np.ndarray]:
    """Columns `keys` of the rows at `pos` in unit `files` (a file per row), in the given order; each file is opened
    once. A key the files do not have is left out (real images carry no latent). No rows: empty columns, shaped
    as in the unit file `like`."""
    files, pos = np.asarray(files).astype(str), np.asarray(pos, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for f in np.unique(files) if len(files) else [like] * bool(like):
        m = files == f
        with open_unit(f) as z:
            for key in set(keys) & set(z.files):
                part = z[key][pos[m]]
                if key not in out:
                    out[key] = np.empty((len(files),) + part.shape[1:], part.dtype)
                out[key][m] = part
    return out


def heavy_column(batch: dict[str, np.ndarray], key: str) -> np.ndarray | None:
    """Column `key` ("image" / "latent") of a map UDF's batch: its own, or read from the rows its "unit_file"/"pos"
    columns point at (a StagedSet's columns(key)), here on the actor instead of being shipped from the driver; None
    when the rows have none (real images carry no latent)."""
    if key in batch:
        return np.array(batch[key])                                      # a writable copy
    if "unit_file" not in batch:
        return None
    return read_rows(batch["unit_file"], batch["pos"], (key,)).get(key)


def images_of(batch: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 [N,C,H,W] of a map UDF's batch (heavy_column)."""
    return heavy_column(batch, "image")


@dataclass
class StagedSet:
    """A sampled set whose images and latents stay in the files the sampling actors wrote (a stage's unit files, or
    a written set's class files, raydd.outputs.written_set): the driver holds labels, slots, scores and where each
    row is (about 30 bytes a row) and reads a row's image only when it takes it. Same interface as DistilledSet;
    `images` / `latents` read every row (for steps that need them all)."""
    paths: list[str]                      # the files rows live in: <stage>/unit-<u>.npz (or a written set's parquet)
    units: np.ndarray                     # int64 [N]: the file holding each row (an index into paths)
    pos: np.ndarray                       # int64 [N]: the row's place in it
    labels: torch.Tensor
    slots: torch.Tensor
    scores: torch.Tensor | None = None

    @classmethod
    def read(cls, stage_dir: str | Path, units: np.ndarray) -> "StagedSet":
        """The light columns of a stage's unit files, in canonical (label, slot) order."""
        return cls.of_files([unit_file(stage_dir, u) for u in units])

    @classmethod
    def of_files(cls, paths: list[str]) -> "StagedSet":
        """The light columns (class_idx, slot, score) of the files, in canonical (label, slot) order."""
        unit, pos, labels, slots, scores = [], [], [], [], []
        for k, path in enumerate(paths):
            with open_unit(path) as z:                                       # the images stay unread
                labels.append(z["class_idx"])
                slots.append(z["slot"])
                scores.append(z["score"])
            unit.append(np.full(len(labels[-1]), k, np.int64))
            pos.append(np.arange(len(labels[-1])))
        return cls(list(paths), np.concatenate(unit), np.concatenate(pos),
                   torch.from_numpy(np.concatenate(labels).astype(np.int64)),
                   torch.from_numpy(np.concatenate(slots).astype(np.int64)),
                   torch.from_numpy(np.concatenate(scores).astype(np.float32))).sorted()

    def __len__(self) -> int:
        return len(self.labels)

    def files(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """str [N]: the file of each row (of rows idx)."""
        return np.array([self.paths[u] for u in self.units[idx].tolist()])

    def subset(self, idx, slots: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> "StagedSet":
        """Rows idx, nothing read (new slots / scores for them, if given)."""
        idx = np.asarray(idx, dtype=np.int64)
        return StagedSet(self.paths, self.units[idx], self.pos[idx], self.labels[idx],
                         self.slots[idx] if slots is None else slots,
                         (None if self.scores is None else self.scores[idx]) if scores is None else scores)

    def sorted(self) -> "StagedSet":
        return self.subset(np.lexsort((self.slots.numpy(), self.labels.numpy())))

    def read_columns(self, idx: np.ndarray | slice, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Columns `keys` of rows idx, from their files (raydd.generate.read_rows)."""
        like = self.paths[int(self.units[0])] if len(self.units) else ""
        return read_rows(self.files(idx), self.pos[idx], keys, like=like)

    def take(self, idx: torch.Tensor) -> DistilledSet:
        """Rows idx, read from their files (only those rows are kept in memory)."""
        idx = np.asarray(idx, dtype=np.int64)
        cols = self.read_columns(idx, HEAVY)
        return DistilledSet(torch.from_numpy(cols["image"]), self.labels[idx], self.slots[idx],
                            torch.from_numpy(cols["latent"]) if "latent" in cols else None,
                            None if self.scores is None else self.scores[idx])

    def classes(self) -> Iterator[tuple[int, DistilledSet]]:
        """(label, that class's rows in slot order), in label order, reading every file once: a unit holds
        consecutive classes' rows, so a file is kept only until the last class with rows in it is out (the driver
        holds about a unit and a class, not the set)."""
        s = self.sorted()
        labels = s.labels.numpy()
        last = {u: k for k, u in enumerate(s.units.tolist())}                # file -> its last row in s
        held: dict[int, dict[str, np.ndarray]] = {}
        for c in np.unique(labels).tolist():
            rows = np.flatnonzero(labels == c)
            for u in np.unique(s.units[rows]).tolist():
                if u not in held:
                    with open_unit(s.paths[u]) as z:
                        held[u] = {k: z[k] for k in HEAVY if k in z.files}
            cols = {k: np.stack([held[u][k][p] for u, p in zip(s.units[rows].tolist(), s.pos[rows].tolist())])
                    for k in set.intersection(*(set(held[u]) for u in np.unique(s.units[rows]).tolist()))}
            yield c, DistilledSet(torch.from_numpy(cols["image"]), s.labels[rows], s.slots[rows],
                                  torch.from_numpy(cols["latent"]) if "latent" in cols else None,
                                  None if s.scores is None else s.scores[rows])
            held = {u: v for u, v in held.items() if last[u] > rows[-1]}

    @property
    def images(self) -> torch.Tensor:
        return torch.from_numpy(self.read_columns(slice(None), ("image",))["image"])

    @property
    def latents(self) -> torch.Tensor | None:
        lat = self.read_columns(slice(None), ("latent",)).get("latent")
        return None if lat is None else torch.from_numpy(lat)

    def columns(self, key: str = "image") -> dict[str, np.ndarray]:
        """Where a map UDF reads each row's image or latent (raydd.generate.heavy_column): none crosses the driver."""
        return {"unit_file": self.files(), "pos": self.pos}

    def image_columns(self) -> dict[str, np.ndarray]:
        return self.columns("image")

    def latent_std(self) -> float | None:
        """std of every latent value (as torch.std: n - 1), a file at a time."""
        n = total = sq = 0.0
        for u in np.unique(self.units):
            with open_unit(self.paths[u]) as z:
                if "latent" not in z.files:
                    return None
                lat = z["latent"][self.pos[self.units == u]].astype(np.float64)
            n, total, sq = n + lat.size, total + lat.sum(), sq + np.square(lat).sum()
        return float(np.sqrt(max(sq - total * total / n, 0.0) / max(n - 1, 1))) if n else None


@dataclass
class SetUnion:
    """a ∪ b (DistilledSets, StagedSets or unions), read a class at a time: what write_distilled and a per-class
    pass need (labels, classes()), without holding either set. Latents are kept only where both sides have them."""
    a: Any
    b: Any

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([self.a.labels, self.b.labels])

    @property
    def scores(self) -> torch.Tensor | None:
        return None if self.a.scores is None or self.b.scores is None else torch.cat([self.a.scores, self.b.scores])

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def classes(self) -> Iterator[tuple[int, DistilledSet]]:
        """(label, the class's rows of a and b together, in slot order), in label order: a merge of the two sides'
        class-by-class reads."""
        sides = [self.a.classes(), self.b.classes()]
        heads = [next(side, None) for side in sides]                      # (label, DistilledSet) or None
        while any(heads):
            c = min(h[0] for h in heads if h)
            mine = [h[1] for h in heads if h and h[0] == c]
            latents = [m.latents for m in mine]
            scores = [torch.full((len(m),), float("nan")) if m.scores is None else m.scores for m in mine]
            yield c, DistilledSet(torch.cat([m.images for m in mine]), torch.cat([m.labels for m in mine]),
                                  torch.cat([m.slots for m in mine]),
                                  None if any(z is None for z in latents) else torch.cat([z.half() for z in latents]),
                                  torch.cat(scores)).sorted()
            heads = [next(side, None) if h and h[0] == c else h for side, h in zip(sides, heads)]


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


def own_stage(stage_dir: str, stage_host: str) -> str:
    """The stage a map UDF writes its finished units to itself: stage_dir when it is a URI (every node reaches it)
    or the actor runs on stage_host (the driver's machine: a plain path is not shared between machines); else ""
    (the units' columns go back whole and the driver writes them, raydd.distributed.data.map_ray)."""
    return stage_dir if stage_dir and ("://" in stage_dir or stage_host == socket.gethostname()) else ""


def keep_units(stage_dir: str, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A map UDF's answer: without a stage, its columns whole; with one, each unit saved there (save_unit) and the
    columns other than HEAVY only."""
    if not stage_dir:
        return out
    for u in np.unique(out["unit"]):
        save_unit(stage_dir, {k: v[out["unit"] == u] for k, v in out.items()})
    return {k: v for k, v in out.items() if k not in HEAVY}


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
        """The frozen backbone on `device`. In a warm actor (keep_backbone) the last one loaded is kept, and the next
        stage's UDF with the same spec takes it instead of loading it again."""
        if _kept is None:
            return self.load_fresh(device)
        key = (repr(self), str(device))
        if key not in _kept:
            _kept.clear()                                  # one backbone at a time: the old one goes first
            _kept[key] = self.load_fresh(device)
        return _kept[key]

    def load_fresh(self, device: str | torch.device = "cpu"):
        from raydd.backbone import load_backbone

        model = load_backbone(self.cfg, num_classes=self.num_classes, channels=self.channels,
                              image_size=self.image_size, device=device)
        model.eval().requires_grad_(False)
        return model


# The backbone a warm actor keeps between stages (raydd.distributed.pool), by (spec, device); None in any other
# process, where every load is fresh. Stages share it read-only: it is frozen, and a fine-tune (a Train job) ends
# the pool before it runs.
_kept: dict | None = None


def keep_backbone() -> None:
    """From now on this process keeps the last backbone it loaded (a warm actor's constructor calls this)."""
    global _kept
    _kept = {} if _kept is None else _kept


GuidanceFactory = Callable[[Any, torch.device], Guidance]  # (backbone, device) -> Guidance
# (backbone, device) -> post_step(i, x_prev, x0_hat, y, abar_prev) -> x_prev' (see raydd.sampling.sample), built once per
# actor like a Guidance; batch-level updates (CGS) see a whole unit, e.g. one class's IPC samples
PostStepFactory = Callable[[Any, torch.device], Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def actor_device(gpus: float, threads: int = 0) -> torch.device:
    """A map UDF's device, chosen in its constructor: torch's CPU threads capped to the actor's CPUs (threads > 0),
    then CUDA if the actor holds a GPU."""
    if threads > 0:
        torch.set_num_threads(threads)
    return pick_device(gpus)


def rows_with(rows: dict[str, np.ndarray], **columns: np.ndarray) -> dict[str, np.ndarray]:
    """A map UDF's answer: the rows it was given, less their "image" column (the driver does not want images back),
    plus the UDF's own columns."""
    return {k: v for k, v in rows.items() if k != "image"} | columns


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
                 post_step_factory: PostStepFactory | None = None, stage_dir: str = "", stage_host: str = ""):
        """stage_dir: write each finished unit there and return its light columns only, when the stage is a URI
        (every node reaches it) or this actor runs on stage_host (the driver's machine: a plain path is not shared
        between machines). Elsewhere the unit's columns go back whole and the driver writes them."""
        self.stage_dir = own_stage(stage_dir, stage_host)
        self.device = actor_device(gpus, threads)
        self.spec, self.sampler = spec, sampler
        self.backbone = spec.load(self.device)
        self.guidance = guidance_factory(self.backbone, self.device) if guidance_factory else None
        self.post_step = post_step_factory(self.backbone, self.device) if post_step_factory else None
        self.autocast = autocast_for(precision, self.device)
        self.class_ids = torch.tensor(spec.class_ids or list(range(spec.num_classes)), dtype=torch.long)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return keep_units(self.stage_dir, map_units(self.run_unit, batch))

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


def stage_rows(part, idx: np.ndarray, slots: np.ndarray, stage_dir: str) -> StagedSet:
    """Rows idx of a real split (held, or a store's: raydd.data.StoredPart) with the given slots -> unit files under
    stage_dir, written in one pass over the split (take_batches) as a file per (batch, class), so the driver holds a
    batch and a later class-by-class read (write_distilled) a class -> a StagedSet over them (no latents, no
    scores)."""
    idx, slots = np.asarray(idx, dtype=np.int64), np.asarray(slots, dtype=np.int64)
    labels = part.y.numpy()[idx]
    per_batch, units = int(labels.max()) + 1, []                      # unit of (batch b, class c): b * per_batch + c
    for b, (k, images) in enumerate(part.take_batches(idx)):
        for c in np.unique(labels[k]).tolist():
            m = labels[k] == c
            units.append(b * per_batch + c)
            save_unit(stage_dir, {"unit": np.full(m.sum(), units[-1]), "class_idx": labels[k][m], "slot": slots[k][m],
                                  "image": images[m], "score": np.full(m.sum(), np.nan, np.float32)})
    return dataclasses.replace(StagedSet.read(stage_dir, np.array(units)), scores=None)


def real_set(part, idx, slots) -> DistilledSet:
    """Rows idx of a real split (held, streamed: one pass, or a store's: only those rows are read) as a set with
    the given slots, in memory."""
    picked = part.take(torch.as_tensor(idx))
    return DistilledSet(images=picked.x, labels=picked.y, slots=torch.as_tensor(slots))


def random_subset(train, ipc: int, seed: int) -> DistilledSet:
    """`ipc` real images per class (raydd.generate.random_picks) from a split, in memory (real_set)."""
    picks = random_picks(train.y, ipc, seed)
    return real_set(train, picks, torch.arange(ipc).repeat(len(picks) // ipc))
