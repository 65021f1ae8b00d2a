"""Real data: scikit-learn digits (built in, offline) and ImageFolder roots with ImageNet subsets.

Everything is held as uint8 tensors [N, C, H, W] at `image_size`, with int64 labels whose order is
the class list's order (ImageNet subsets: the order of the files in raydd/imagenet/, not sorted).
"""
from __future__ import annotations

import functools
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from raydd.config import DataConfig
from raydd.errors import RayddError

SUBSET_DIR = Path(__file__).parent / "imagenet"
SUBSETS = ("imagenette", "imagewoof", "imageidc", "imagenet100", "imagenet1k")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


class DataError(RayddError, ValueError):
    """Bad data input: unknown/duplicate classes, unreadable images (named by path), empty splits."""


def epoch_starts(n: int, batch_size: int) -> list[int]:
    """Where an epoch's batches start; a trailing batch of one image is dropped (BatchNorm students cannot
    train on a single image, and one image is noise for a batch statistic anyway)."""
    return [s for s in range(0, n, batch_size) if not (n - s == 1 and s > 0)]


@dataclass
class Split:
    x: torch.Tensor   # uint8 [N, C, H, W]
    y: torch.Tensor   # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])                               # (C, H, W)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch in a random order drawn from `generator`: (uint8 [b, C, H, W], int64 [b]) on x's device."""
        perm = torch.randperm(len(self), generator=generator).to(self.x.device)           # [N]
        for s in epoch_starts(len(self), batch_size):
            idx = perm[s:s + batch_size]
            yield self.x[idx], self.y[idx]

    def ordered(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(self), batch_size):
            yield self.x[s:s + batch_size], self.y[s:s + batch_size]

    def take(self, idx) -> "Split":
        return Split(self.x[idx], self.y[idx])

    def subset(self, positions: np.ndarray) -> "Split":
        """The rows at `positions`, held (as StreamedSplit.subset streams them)."""
        return self.take(torch.as_tensor(np.asarray(positions, dtype=np.int64)))

    def take_batches(self, idx: np.ndarray, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows idx a batch at a time, as a store's (StoredPart.take_batches): (their places in idx [b], their
        images uint8 [b, C, H, W])."""
        idx = np.asarray(idx, dtype=np.int64)
        for s in range(0, len(idx), batch_size):
            k = np.arange(s, min(s + batch_size, len(idx)))
            yield k, self.x[torch.from_numpy(idx[k])].numpy()


def stored_images(column, shape: tuple[int, int, int], dtype: str = "uint8") -> np.ndarray:
    """A store's image column (each row uint8 [C, H, W] as bytes) -> uint8 [N, C, H, W], writable; or its latent
    column (dtype float16: [c, h, w] each) -> float16 [N, c, h, w]."""
    return np.frombuffer(b"".join(column), dtype=dtype).reshape(-1, *shape).copy()


class StreamedSplit:
    """A split streamed from Ray Data (a Train worker's dataset shard, raydd.distributed.store.part_dataset),
    rows: label, pos (the row's place in the split), image (uint8 [C, H, W] bytes), or with column="latent",
    dtype="float16" the split's stored latents (float16 [c, h, w] bytes, yielded as such). It holds its labels and
    one shuffle buffer of at most `buffer_bytes`, never the images. An epoch's order: the dataset's file order
    (shuffled anew each epoch) through a local shuffle buffer seeded from the caller's generator. keep: the rows
    (positions) of a subset streamed on its own (subset)."""

    def __init__(self, source, labels: np.ndarray, shape: tuple[int, int, int], buffer_bytes: int = 512 * 2**20,
                 keep: np.ndarray | None = None, column: str = "image", dtype: str = "uint8"):
        self.source, self.labels, self.shape, self.buffer_bytes = source, labels, tuple(shape), buffer_bytes
        self.keep, self.column, self.dtype = keep, column, dtype

    def subset(self, positions: np.ndarray) -> "StreamedSplit":
        """The rows at `positions`, still streamed (each epoch passes over the whole stream and keeps them): a
        subset too large to hold, e.g. DD-Ranking's random reference at a large IPC."""
        positions = np.asarray(positions, dtype=np.int64)
        return StreamedSplit(self.source, self.labels[positions], self.shape, self.buffer_bytes, keep=positions,
                             column=self.column, dtype=self.dtype)

    def _kept(self, stream: Iterator[dict], batch_size: int) -> Iterator[dict]:
        """The stream's batches; of a subset, only its rows, gathered again into batches of batch_size."""
        if self.keep is None:
            yield from stream
            return
        held: dict | None = None
        for b in stream:
            m = np.isin(b["pos"], self.keep)
            mine = {k: v[m] for k, v in b.items()}
            held = mine if held is None else {k: np.concatenate([held[k], mine[k]]) for k in held}
            while len(held["pos"]) >= batch_size:
                yield {k: v[:batch_size] for k, v in held.items()}
                held = {k: v[batch_size:] for k, v in held.items()}
        if held is not None and len(held["pos"]):
            yield held

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def y(self) -> torch.Tensor:                                     # int64 [N], by pos
        return torch.from_numpy(self.labels.astype(np.int64))

    def _tensors(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = stored_images(batch[self.column], self.shape, self.dtype)
        return torch.from_numpy(x), torch.from_numpy(batch["label"].astype(np.int64))

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        rows = len(self) if self.keep is None else math.inf           # a subset's stream has more rows than it
        row_bytes = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        buffer = max(batch_size, min(rows, self.buffer_bytes // row_bytes))
        stream = self.source.iter_batches(batch_size=batch_size, batch_format="numpy",
                                          local_shuffle_buffer_size=buffer, local_shuffle_seed=seed)
        for k, b in enumerate(self._kept(stream, batch_size)):
            if len(b["label"]) > 1 or k == 0:                      # as epoch_starts: no trailing batch of one
                yield self._tensors(b)

    def ordered(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in self._kept(self.source.iter_batches(batch_size=batch_size, batch_format="numpy"), batch_size):
            yield self._tensors(b)

    def take(self, positions: np.ndarray) -> Split:
        """The rows at `positions` (of this split), in that order, from one pass over the stream."""
        positions = np.asarray(positions)
        where = {int(p): i for i, p in enumerate(positions)}
        x = torch.from_numpy(np.empty((len(positions), *self.shape), dtype=self.dtype))
        for b in self.source.iter_batches(batch_size=1024, batch_format="numpy"):
            mine = np.flatnonzero(np.isin(b["pos"], positions))
            rows = torch.from_numpy(stored_images(b[self.column][mine], self.shape, self.dtype))
            x[torch.tensor([where[int(p)] for p in b["pos"][mine]], dtype=torch.long)] = rows
        return Split(x, torch.from_numpy(self.labels[positions].astype(np.int64)))


def endless_batches(split: Split | StreamedSplit, batch_size: int,
                    generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for a loop counted in steps (the DiT trainings, the tiny VAE, IGDS's estimator): epoch after epoch
    of split.batches, each epoch in a new order from `generator`, held or streamed alike, as DiT's train.py draws
    (a shuffling sampler, epoch after epoch). An epoch's last, short batch is skipped, unless the split is smaller
    than a batch: every step then sees batch_size rows (or the whole split). uint8 [b, C, H, W], int64 [b]."""
    if len(split) == 0:
        raise DataError("the train split is empty: nothing to train on (check data.max_train_per_class and "
                        "data.val_fraction / data.test_fraction)")
    full = min(batch_size, len(split))
    while True:
        for x, y in split.batches(batch_size, generator):
            if len(y) == full:
                yield x, y


class RealData:
    """The real splits (uint8 images and labels) and the class list. From a prepared store (`store`), a split is
    read when first used: a process that never touches the train split (the driver of most methods, the
    evaluation of a set) never holds it, and `part` reads a split's labels or a few of its rows only."""

    def __init__(self, train: Split | None, val: Split | None, test: Split | None, class_names: list[str],
                 store: StoreReader | None = None):
        self._splits = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}
        self.store, self.class_names = store, class_names

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = self.store.read(name)
        return self._splits[name]

    def part(self, name: str) -> Split | StoredPart:
        """Split `name` when held, else a handle on it in the store (its labels and `take`, no image read yet)."""
        return self._splits[name] if name in self._splits or self.store is None else StoredPart(self.store, name)

    train = property(lambda self: self.split("train"))
    val = property(lambda self: self.split("val"))
    test = property(lambda self: self.split("test"))

    def describe(self) -> str:
        """The split sizes, without reading a split that was not read yet."""
        if len(self._splits) < 3:
            return f"splits read when used (so far: {', '.join(sorted(self._splits)) or 'none'})"
        return f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test images"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def backbone_class_ids(self, backbone_classes: int = 1000) -> list[int]:
        """Label -> the class id of a DiT with `backbone_classes` classes. A DiT trained on these classes (the
        tiny DiT and its fine-tunes: as many classes as the data) takes the labels themselves; ImageNet's
        1000-class DiT takes a wnid's index in the sorted 1000-wnid list (imagenette label 1 is DiT class 217);
        any other class list maps to 0..C-1."""
        wnids = subset_classes("imagenet1k")
        if backbone_classes != self.num_classes and all(c in wnids for c in self.class_names):
            index = {w: i for i, w in enumerate(wnids)}
            return [index[c] for c in self.class_names]
        return list(range(self.num_classes))


def subset_classes(name: str) -> list[str]:
    """wnids of an ImageNet subset, in label order."""
    file = "imagenet1k_wnids" if name == "imagenet1k" else name
    if name not in SUBSETS:
        raise DataError(f"unknown class subset {name!r}; allowed: {', '.join(SUBSETS)}")
    return (SUBSET_DIR / f"{file}.txt").read_text().split()


def resolve_classes(spec: str, available: list[str] | None = None, where: str = "found as directories") -> list[str]:
    """'' -> all available (sorted); a subset name; or a comma list. Unknown/duplicate -> DataError."""
    if not spec:
        if available is None:
            raise DataError("data.classes is empty and there is no directory to list classes from")
        return sorted(available)
    names = class_list(spec)
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise DataError(f"data.classes has duplicate classes: {dupes}")
    if available is not None:
        missing = [c for c in names if c not in available]
        if missing:
            raise DataError(f"data.classes names {len(missing)} class(es) not {where}: "
                            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; available: "
                            f"{sorted(available)[:20]}{' ...' if len(available) > 20 else ''}")
    return names


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N,C,h,w] -> uint8 [N,C,size,size] (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=x.shape[-1] > size)
    return y.round().clamp(0, 255).to(torch.uint8)


def stratified_split(y: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Per class: shuffle with `seed`, first val_fraction -> val, next test_fraction -> test, rest train.
    Returns index arrays (train, val, test), each sorted."""
    rng = np.random.RandomState(seed)
    val_f, test_f = fractions
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_val, n_test = int(round(val_f * len(idx))), int(round(test_f * len(idx)))
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val:n_val + n_test])
        parts[0].extend(idx[n_val + n_test:])
    return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)


def class_labels(counts: list[int]) -> np.ndarray:
    """The labels of rows in class order, counts[c] of class c: [0]*counts[0] + [1]*counts[1] + ..."""
    return np.repeat(np.arange(len(counts)), counts)


def class_offsets(counts: list[int]) -> np.ndarray:
    """int64 [C]: the first row of each class in class order; + a file's index in its class = its row."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def cap_per_class(idx: np.ndarray, y: np.ndarray, cap: int) -> np.ndarray:
    """The first `cap` of each class among the sorted positions `idx` (labels y[idx]); all when cap <= 0."""
    if cap <= 0:
        return idx
    keep = np.concatenate([idx[np.flatnonzero(y[idx] == c)[:cap]] for c in np.unique(y[idx])])
    return np.sort(keep)


def part_positions(counts: list[int], cfg: DataConfig, has_val: bool) -> dict[str, np.ndarray]:
    """A train folder's rows in (class, file-name) order, counts[c] of class c -> the sorted positions of each
    part: "train" (capped at data.max_train_per_class), its "val" hold-out, and "test" when the root has no val/
    of its own. The one definition of the split, whether the rows are decoded or read from a store."""
    y = class_labels(counts)
    tr, va, te = stratified_split(y, (cfg.val_fraction, 0.0 if has_val else cfg.test_fraction), cfg.split_seed)
    return {"train": cap_per_class(tr, y, cfg.max_train_per_class), "val": va} | ({} if has_val else {"test": te})


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float [1797, 8, 8] in 0..16 and labels int [1797], as load_digits() gives
    them. Read from the CSV that scikit-learn ships (one row per image: 64 pixels, then the label), without
    importing sklearn: its import costs about 1.4 s and 140 MB in every process that loads the data (the
    driver, each evaluation worker). Falls back to load_digits() if that file is not where it has been."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if csv is None or not csv.exists():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    rows = np.loadtxt(csv, delimiter=",")                                          # [1797, 65]
    return rows[:, :64].reshape(-1, 8, 8), rows[:, 64].astype(int)


def digits_classes(cfg: DataConfig) -> list[str]:
    """data.classes among the digits' "0".."9" (all ten by default)."""
    return resolve_classes(cfg.classes, [str(i) for i in range(10)]) if cfg.classes else [str(i) for i in range(10)]


def digits_images(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The digits of data.classes, as the data config asks for them: uint8 [N, C, size, size], labels int64 [N]
    (the position in the class list), in scikit-learn's order; and the class list."""
    images, target = digits_arrays()
    x = torch.from_numpy(np.round(images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # [1797,1,8,8]
    x = resize_uint8(x, cfg.image_size)
    if cfg.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    names = digits_classes(cfg)
    keep = np.isin(target, [int(n) for n in names])
    x, target = x[torch.from_numpy(keep)], target[keep]
    y = torch.from_numpy(np.array([names.index(str(t)) for t in target], dtype=np.int64))  # label = list position
    return x, y, names


def load_digits_data(cfg: DataConfig) -> RealData:
    """Held in memory (without data.store; with it, the digits are read from their store like any source)."""
    x, y, names = digits_images(cfg)
    tr, va, te = stratified_split(y.numpy(), (cfg.val_fraction, cfg.test_fraction), cfg.split_seed)
    tr = cap_per_class(tr, y.numpy(), cfg.max_train_per_class)
    return RealData(Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), names)


def read_image(path: Path | str, size: int, channels: int, data: bytes | None = None) -> torch.Tensor:
    """One image file (or its bytes `data`, read from an archive; `path` then names it) -> uint8 [C, size, size]
    (short side resized, centre crop). DataError on failure."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).reshape(size, size, channels).permute(2, 0, 1)


def list_image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.suffix in IMAGE_EXTS or p.suffix.lower() in IMAGE_EXTS)


def load_image_folder(root: Path, class_names: list[str], size: int, channels: int, cap: int = 0,
                      folder_names: list[str] | None = None) -> Split:
    """root/<folder>/<images> -> Split with label = position in class_names. Every unreadable file
    is collected and reported together (by path) before anything else happens."""
    xs, ys, bad = [], [], []
    for label, folder in enumerate(folder_names or class_names):
        files = list_image_files(root / folder)
        if cap > 0:
            files = files[:cap]
        for f in files:
            try:
                xs.append(read_image(f, size, channels))
                ys.append(label)
            except DataError as e:
                bad.append(str(e))
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s) under {root}:\n  " + "\n  ".join(bad[:20]))
    if not xs:
        raise DataError(f"no images found under {root} for classes {class_names[:5]}...")
    return Split(torch.stack(xs), torch.tensor(ys, dtype=torch.int64))


def folder_classes(cfg: DataConfig) -> tuple[Path, list[str], bool]:
    """An ImageFolder's root, its classes (data.classes resolved against the class folders) and whether it has
    its own val/ (the ImageNet convention: val/ is the held-out test split)."""
    root = Path(cfg.root).expanduser().resolve()
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not train_dir.is_dir():
        raise DataError(f"data.root {root} is not a directory")
    available = [p.name for p in train_dir.iterdir() if p.is_dir()]
    return root, resolve_classes(cfg.classes, available), (root / "val").is_dir()


# data.dataset -> its files' extensions: a Hugging Face dataset as the hub lays it out (parquet) or as
# datasets.save_to_disk writes it (Arrow IPC stream files, data-00000-of-00001.arrow)
SHARD_SOURCES = {"webdataset": (".tar",), "huggingface": (".parquet", ".arrow")}
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val"}


@functools.lru_cache(maxsize=None)
def source_files(dataset: str, root: str) -> dict[str, list[str]]:
    """Listed once per process (the store's key needs it, and every store_location and stream_spec asks; callers
    must not change the answer). A shard source's files under `root` (a path or URI) per split, sorted: "train", and "val" when it has one (the
    held-out test split, as an ImageFolder's val/). A file's split is the first word of its path under root (folders,
    then its name split at - _ .) that names one: train/0000.tar, val/0000.tar, imagenet1k-validation-0001.tar
    (timm's ImageNet WebDataset), data/train-00000-of-00294.parquet (a Hugging Face dataset's parquet files as the
    hub lays them out), train/data-00000-of-00004.arrow (datasets.save_to_disk's). Files no split names are train
    when none is named train (a folder of shards); others (test) are left out. One layout per root: parquet and
    arrow files together are an error."""
    import re

    from pyarrow import fs as pafs

    fs, path = store_filesystem(root)
    ext, base = SHARD_SOURCES[dataset], root.rstrip("/") if "://" in root else path
    split, unnamed = {"train": [], "val": []}, []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        rel = info.path[len(path.rstrip("/")):].lstrip("/")
        if info.type != pafs.FileType.File or not rel.endswith(ext) or info.base_name.startswith("."):
            continue
        words = rel.split("/")[:-1] + re.split(r"[-_.]", info.base_name)
        named = next((SPLIT_NAMES[w] for w in words if w in SPLIT_NAMES), None)
        (split[named] if named else unnamed).append(f"{base}/{rel}")
    if not split["train"]:
        split["train"] = unnamed
    if not split["train"]:
        raise DataError(f"data.root {root} has no {dataset} files ({' or '.join('*' + e for e in ext)}) for a train "
                        f"split")
    if len(kinds := {posixpath.splitext(f)[1] for v in split.values() for f in v}) > 1:
        raise DataError(f"data.root {root} mixes {' and '.join(sorted(kinds))} files: give one layout's folder")
    return {k: sorted(v) for k, v in split.items() if v}


def source_classes(cfg: DataConfig) -> tuple[str, list[str], bool]:
    """A file source's root, its classes (data.classes resolved against the classes it has) and whether it has its
    own val split. An ImageFolder's classes are its class folders; a shard source's are data.source_classes, the
    names of its integer labels (a WebDataset sample's .cls, a Hugging Face dataset's label column)."""
    if cfg.dataset == "digits":                                # built in: one train folder, no val of its own
        return "sklearn-digits", digits_classes(cfg), False
    if cfg.dataset in SHARD_SOURCES:
        root = cfg.root if "://" in cfg.root else str(Path(cfg.root).expanduser().resolve())
        has_val = "val" in source_files(cfg.dataset, root)
        return root, resolve_classes(cfg.classes, class_list(cfg.source_classes), "in data.source_classes"), has_val
    root, classes, has_val = folder_classes(cfg)
    return str(root), classes, has_val


def class_list(spec: str) -> list[str]:
    """A class list as data.classes and data.source_classes give it -> the names in order: a subset's wnids
    (imagenet1k: the 1000 wnids sorted, ImageNet's usual label order) or a comma list."""
    return subset_classes(spec) if spec in SUBSETS else [c.strip() for c in spec.split(",") if c.strip()]


def decode_cap(cfg: DataConfig, has_val: bool) -> int:
    """Files decoded per train class (0 = all). data.max_train_per_class bounds what is decoded, not only what
    trains: the first files of each class (file-name order), enough that the hold-out leaves the cap for train."""
    if cfg.dataset == "digits":               # all 1,797 are stored: the cap then applies to train, as when held
        return 0
    kept = 1.0 - cfg.val_fraction - (0.0 if has_val else cfg.test_fraction)
    return math.ceil(cfg.max_train_per_class / kept) + 2 if cfg.max_train_per_class > 0 else 0


def store_filesystem(location: str):
    """A store location (absolute path or URI) -> (pyarrow FileSystem, path on it)."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(location if "://" in location else str(Path(location).expanduser().resolve()))


def store_manifest(location: str) -> dict:
    """A prepared store's manifest.json: root, classes, image_size, channels, counts {split: [files per class]}."""
    import json

    fs, path = store_filesystem(location)
    with fs.open_input_stream(f"{path}/manifest.json") as f:
        return json.loads(f.read())


def store_batches(location: str, split: str, size: int, channels: int, positions: np.ndarray | None = None,
                  batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A prepared store's split (raydd.prepare) in one pass, batch by batch in stored order: (the rows' places in
    the split [b], their images uint8 [b, C, H, W]), of every row or only of `positions`; nothing beyond a batch
    is held."""
    import pyarrow.dataset as pads

    fs, path = store_filesystem(location)
    counts = store_manifest(location)["counts"][split]
    offsets = class_offsets(counts)                                                  # [C]
    keep = np.zeros(sum(counts), dtype=bool)
    keep[slice(None) if positions is None else positions] = True
    for batch in pads.dataset(f"{path}/{split}", filesystem=fs, format="parquet").to_batches(
            columns=["label", "index", "image"], batch_size=batch_size):
        p = offsets[batch.column("label").to_numpy()] + batch.column("index").to_numpy()   # [b] row of the split
        mine = np.flatnonzero(keep[p])
        if len(mine):
            yield p[mine], stored_images(batch.column("image").take(mine).to_pylist(), (channels, size, size))


def read_store_split(location: str, split: str, size: int, channels: int,
                     positions: np.ndarray | None = None) -> Split:
    """A prepared store's split -> Split in (class, file-name) order, as load_image_folder decodes it; with
    `positions` (raydd.data.part_positions) only those rows (store_batches), so reading a part (the val hold-out)
    holds that part and one batch, not the whole split."""
    counts = store_manifest(location)["counts"][split]
    want = np.arange(sum(counts)) if positions is None else np.unique(positions)        # sorted
    x = np.empty((len(want), channels, size, size), np.uint8)
    for p, images in store_batches(location, split, size, channels, positions):
        x[np.searchsorted(want, p)] = images
    return Split(torch.from_numpy(x), torch.from_numpy(class_labels(counts)[want].astype(np.int64)))


def _complete_store(cfg: DataConfig) -> str:
    from raydd.prepare import is_complete, store_location

    location = store_location(cfg)
    if not is_complete(location):
        raise DataError(f"data.store: {location} is not prepared; run python -m raydd.prepare with the same "
                        f"data.* settings (distill, sweep, evaluate and compare prepare it themselves)")
    return location


class StoreReader:
    """A prepared store's splits as RealData reads them: test (the root's own val/, stored as "val") or a part of
    the train folder (raydd.data.part_positions), whole or some of its rows, or only its labels."""

    def __init__(self, cfg: DataConfig, has_val: bool):
        self.cfg, self.has_val, self.location = cfg, has_val, _complete_store(cfg)
        self.counts = store_manifest(self.location)["counts"]

    def _where(self, name: str) -> tuple[str, np.ndarray]:
        return stored_rows(name, self.counts, self.cfg, self.has_val)

    def labels(self, name: str) -> torch.Tensor:
        stored, positions = self._where(name)
        return torch.from_numpy(class_labels(self.counts[stored])[positions])

    def read(self, name: str, idx: torch.Tensor | None = None) -> Split:
        """Split `name`, or its rows idx in that order, read batch by batch (read_store_split)."""
        stored, positions = self._where(name)
        want = positions if idx is None else positions[np.asarray(idx)]
        rows = read_store_split(self.location, stored, self.cfg.image_size, self.cfg.channels, want)  # sorted
        return rows if idx is None else rows.take(torch.from_numpy(np.argsort(np.argsort(want))))

    def take_batches(self, name: str, idx: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows idx of split `name` in one pass over the store, a batch at a time in stored order: (their places
        in idx [b], their images uint8 [b, C, H, W])."""
        stored, positions = self._where(name)
        want = positions[np.asarray(idx)]
        order = np.argsort(want)
        for p, images in store_batches(self.location, stored, self.cfg.image_size, self.cfg.channels, want):
            yield order[np.searchsorted(want[order], p)], images


@dataclass
class StoredPart:
    """A split still in its store: labels y (from the manifest) and take(idx), which reads those rows only."""
    store: StoreReader
    name: str

    @property
    def y(self) -> torch.Tensor:
        return self.store.labels(self.name)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor) -> Split:
        return self.store.read(self.name, idx)

    def take_batches(self, idx: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows idx, a batch at a time in one pass over the store (StoreReader.take_batches)."""
        return self.store.take_batches(self.name, idx)


def stored_rows(part: str, counts: dict[str, list[int]], cfg: DataConfig, has_val: bool) -> tuple[str, np.ndarray]:
    """Where split `part` lives in a store whose folders hold counts[folder][c] files of class c: (the stored
    folder, the part's rows there, sorted). "test" is the root's own val/, whole, when it has one; every other
    part is a part of the train folder (part_positions)."""
    if part == "test" and has_val:
        return "val", np.arange(sum(counts["val"]))
    return "train", part_positions(counts["train"], cfg, has_val)[part]


def stream_spec(cfg: DataConfig, part: str = "train") -> dict:
    """What a Train worker needs, besides its Ray Data shard, to stream a split of a store
    (raydd.distributed.store.part_dataset): the split, the files per class of each stored folder and whether the
    root has its own val/."""
    _, _, has_val = source_classes(cfg)
    return {"part": part, "counts": store_manifest(_complete_store(cfg))["counts"], "has_val": has_val}


def streamed_split(source, spec: dict, cfg: DataConfig, latent_shape: tuple[int, int, int] | None = None) -> StreamedSplit:
    """A worker's StreamedSplit of the split in `spec` (stream_spec), its labels computed, not read; with
    latent_shape [c, h, w], of the split's stored latents (a part_dataset with latents=)."""
    folder, positions = stored_rows(spec["part"], spec["counts"], cfg, spec["has_val"])
    labels = class_labels(spec["counts"][folder])[positions]
    if latent_shape:
        return StreamedSplit(source, labels, latent_shape, column="latent", dtype="float16")
    return StreamedSplit(source, labels, (cfg.channels, cfg.image_size, cfg.image_size))


def load_imagefolder_data(cfg: DataConfig, train: bool = True) -> RealData:
    if cfg.store:                         # prepared once (raydd.prepare.load_data): a split is read when used
        _, classes, has_val = source_classes(cfg)
        return RealData(None, None, None, classes, store=StoreReader(cfg, has_val))
    root, classes, has_val = folder_classes(cfg)
    read = functools.partial(_imagefolder_splits, cfg, root, classes, has_val)
    if not train and has_val:             # only the test split (val/): train and its hold-out stay empty
        test = read("test")["test"]
        empty = Split(test.x[:0], test.y[:0])
        return RealData(empty, empty, test, classes)
    splits = read("train")
    return RealData(**(splits if "test" in splits else splits | read("test")), class_names=classes)


def _imagefolder_splits(cfg: DataConfig, root: Path, classes: list[str], has_val: bool, name: str) -> dict[str, Split]:
    """Decoded: the split `name` and those that come with it: with its own val/ (the ImageNet convention), val/ is
    the test split and is read alone; train/ gives train and its val hold-out (and test too when there is no val/),
    the parts of raydd.data.part_positions. (From a store: StoreReader.)"""
    train_dir = root / "train" if (root / "train").is_dir() else root
    if name == "test" and has_val:
        return {"test": load_image_folder(root / "val", classes, cfg.image_size, cfg.channels)}
    full = load_image_folder(train_dir, classes, cfg.image_size, cfg.channels, cap=decode_cap(cfg, has_val))
    parts = part_positions(torch.bincount(full.y, minlength=len(classes)).tolist(), cfg, has_val)
    return {k: Split(full.x[p], full.y[p]) for k, p in parts.items()}


def load_real(cfg: DataConfig, train: bool = True) -> RealData:
    """The real data. train=False: a process that needs only the test split (evaluating a set on an ImageFolder
    with its own val/) does not read or hold the train split; elsewhere every split is read."""
    if cfg.dataset == "digits" and not cfg.store:
        return load_digits_data(cfg)
    return load_imagefolder_data(cfg, train)       # a shard source always has a store (config.validate)
