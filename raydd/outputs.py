"""Writing and reading a distilled set, at a local path or a pyarrow filesystem URI (s3://, gs://, file://).

Layout of <out>/ (manifest.json is removed first and written last: a set whose manifest exists is complete; on an
object store a directory cannot be renamed whole, so the set is written in place):
  parquet/class_idx=<c>/part-0.parquet   columns slot, seed?, image (raw uint8 bytes), image_shape,
                                         latent (raw float16 bytes, may be null), latent_shape, score
  images/<class_name>/<slot>.png         the ImageFolder every reference repo's evaluation reads
  manifest.json                          classes, ipc, counts — written last
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from raydd.data import DataError, list_image_files, read_image, store_filesystem
from raydd.generate import DistilledSet, StagedSet


def to_pil(img: np.ndarray) -> Image.Image:
    """uint8 [C,H,W] -> PIL image (L or RGB)."""
    return Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(np.transpose(img, (1, 2, 0)))


def write_distilled(ds: DistilledSet | StagedSet | FolderSet, out: str | Path, class_names: list[str],
                    extra: dict | None = None, pngs: bool = True) -> str | Path:
    """The set -> <out>/ (a path or a URI), a class at a time (`classes()`): of a StagedSet, one class's images and
    the unit files they are in are held, and every unit file is read once; of a FolderSet, one class's images.
    pngs=False leaves out images/ (a set converted from an ImageFolder has its PNGs already). Returns out (a Path
    for a local path)."""
    fs, root = store_filesystem(str(out))
    if fs.get_file_info(f"{root}/manifest.json").type != pafs.FileType.NotFound:
        fs.delete_file(f"{root}/manifest.json")                            # first: the old set is incomplete now
    fs.create_dir(root, recursive=True)
    fs.delete_dir_contents(root, missing_dir_ok=True)

    def put(path: str, data: bytes) -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    counts = [0] * len(class_names)
    for c, part in ds.classes():                                       # this class's rows, in slot order
        counts[c] = len(part)
        fs.create_dir(f"{root}/parquet/class_idx={c}", recursive=True)
        images = part.images.numpy()
        cols = {
            "slot": pa.array(part.slots.numpy()),
            "image": pa.array([img.tobytes() for img in images], type=pa.binary()),
            "image_shape": pa.array([list(img.shape) for img in images]),
            "score": pa.array(part.scores.numpy() if part.scores is not None
                              else np.full(len(part), np.nan, np.float32)),
        }
        if part.latents is not None:
            lat = part.latents.numpy()
            cols["latent"] = pa.array([z.tobytes() for z in lat], type=pa.binary())
            cols["latent_shape"] = pa.array([list(z.shape) for z in lat])
        table = io.BytesIO()
        pq.write_table(pa.table(cols), table)
        put(f"{root}/parquet/class_idx={c}/part-0.parquet", table.getvalue())
        if not pngs:
            continue
        fs.create_dir(f"{root}/images/{class_names[c]}", recursive=True)
        for img, slot in zip(images, part.slots.tolist()):
            png = io.BytesIO()
            to_pil(img).save(png, format="PNG")
            put(f"{root}/images/{class_names[c]}/{slot}.png", png.getvalue())
    manifest = {"classes": class_names, "counts": counts, "num_images": sum(counts), **(extra or {})}
    put(f"{root}/manifest.json", json.dumps(manifest, indent=1).encode())   # last: the set is complete
    return out if "://" in str(out) else Path(root)


def class_of_file(path: str) -> int:
    """The class of a written set's class file (or folder): the <c> of its parquet/class_idx=<c>."""
    return int(re.search(r"class_idx=(\d+)", str(path)).group(1))


def class_files(out: str | Path) -> dict[int, str]:
    """A complete written set's class files {class: path}, paths as `out` is given (a URI stays a URI);
    FileNotFoundError when the set is not complete."""
    fs, root = store_filesystem(str(out))
    if fs.get_file_info(f"{root}/manifest.json").type != pafs.FileType.File:
        raise FileNotFoundError(f"{out} is not a complete distilled set (no manifest.json)")
    base = str(out).rstrip("/") if "://" in str(out) else root
    return {class_of_file(i.base_name): f"{base}/parquet/{i.base_name}/part-0.parquet"
            for i in fs.get_file_info(pafs.FileSelector(f"{root}/parquet")) if i.base_name.startswith("class_idx=")}


def image_nbytes(out: str | Path) -> int:
    """Bytes of a complete written set's images as uint8 arrays (every row's image_shape), no image read."""
    total = 0
    for path in class_files(out).values():
        fs, root = store_filesystem(path)
        with fs.open_input_file(root) as fh:
            shapes = pq.ParquetFile(fh).read(columns=["image_shape"]).column("image_shape").to_pylist()
        total += sum(int(np.prod(s)) for s in shapes)
    return total


def read_distilled(out: str | Path, classes: list[int] | None = None, per_class: int = 0) -> DistilledSet:
    """Read back what write_distilled wrote (canonical (label, slot) order): every class, or only `classes` (their
    files alone are read), and of each all rows or the `per_class` lowest slots (a figure's few images of a large
    set)."""
    from raydd.generate import open_unit

    parts = []
    for c, path in sorted(class_files(out).items()):
        if classes is not None and c not in classes:
            continue
        with open_unit(path) as z:                                     # a ClassFile
            rows = np.argsort(z["slot"], kind="stable")[:per_class or None]
            parts.append(DistilledSet(torch.from_numpy(z["image"][rows]), torch.full((len(rows),), c),
                                      torch.from_numpy(z["slot"][rows]),
                                      torch.from_numpy(z["latent"][rows]) if "latent" in z.files else None,
                                      torch.from_numpy(z["score"][rows].astype(np.float32))))
    both = all(p.latents is not None for p in parts)
    return DistilledSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                        torch.cat([p.slots for p in parts]),
                        torch.cat([p.latents for p in parts]) if both else None,
                        torch.cat([p.scores for p in parts])).sorted()


class ClassFile:
    """One class file of a written set (parquet/class_idx=<c>/part-0.parquet), read like a stage's unit file
    (raydd.generate.open_unit): `files` names its columns, and [key] reads one as numpy [rows] in the file's
    (slot) order: class_idx, slot, score, image uint8 [n, C, H, W], latent float16 [n, c, h, w] when it has one."""

    def __init__(self, source, class_idx: int):
        self.parquet, self.class_idx = pq.ParquetFile(source), class_idx
        names = self.parquet.schema_arrow.names
        self.files = ["class_idx", "slot", "score", "image"] + (["latent"] if "latent" in names else [])

    def __getitem__(self, key: str) -> np.ndarray:
        if key == "class_idx":
            return np.full(self.parquet.metadata.num_rows, self.class_idx, np.int64)
        if key in ("slot", "score"):
            return self.parquet.read(columns=[key]).column(key).to_numpy()
        t = self.parquet.read(columns=[key, f"{key}_shape"])
        shape = t.column(f"{key}_shape")[0].as_py()
        dtype = np.uint8 if key == "image" else np.float16
        return np.frombuffer(b"".join(t.column(key).to_pylist()), dtype).reshape(-1, *shape).copy()


def natural_key(name: str) -> list:
    """Sort key of a file name by its numbers' values: 2.png before 10.png (the order of our <slot>.png files)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class FolderSet:
    """A distilled ImageFolder (<root>/<class>/*.png, ours or another repo's) read a class at a time (`classes()`,
    as a StagedSet), so writing it as raydd's output (write_distilled) holds one class. Class folders are the
    preset's class names (wnids, or 0..9 for digits) or class indices (0, 1, ... / 00000); a class's slots are its
    file names in natural order (our images/<class>/<slot>.png keeps its slots). Every unreadable file is named,
    together, after the last class: a writer of the set never completes it."""

    def __init__(self, path: str | Path, class_names: list[str], size: int, channels: int):
        self.root, self.size, self.channels = Path(path).expanduser(), size, channels
        if not self.root.is_dir():
            raise DataError(f"distilled set {self.root} is not a directory")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"distilled set {self.root} has no class directories")
        if all(f in class_names for f in folders):
            labels = [class_names.index(f) for f in folders]
        elif all(f.isdigit() and int(f) < len(class_names) for f in folders):
            labels = [int(f) for f in folders]
        else:
            unknown = [f for f in folders if f not in class_names][:10]
            raise DataError(f"distilled set {self.root}: class folders {unknown} are neither the preset's class names "
                            f"({class_names[:10]}{' ...' if len(class_names) > 10 else ''}) nor class indices")
        if len(set(labels)) < len(labels):
            raise DataError(f"distilled set {self.root}: class folders {folders} name a class twice")
        self.folders = sorted(zip(labels, folders))                       # [(label, folder name)], label order

    def classes(self) -> Iterator[tuple[int, DistilledSet]]:
        """(label, the class's images [n, C, size, size] with slots 0..n-1 in file-name order), in label order."""
        bad, n = [], 0
        for c, folder in self.folders:
            images = []
            for f in sorted(list_image_files(self.root / folder), key=lambda f: natural_key(f.name)):
                try:
                    images.append(read_image(f, self.size, self.channels))
                except DataError as e:
                    bad.append(str(e))
            n += len(images)
            if images and not bad:
                yield c, DistilledSet(torch.stack(images), torch.full((len(images),), c), torch.arange(len(images)))
        if bad:
            raise DataError(f"{len(bad)} unreadable image(s) under {self.root}:\n  " + "\n  ".join(bad[:20]))
        if not n:
            raise DataError(f"no images found under {self.root} in {[f for _, f in self.folders][:5]}")

    def read(self) -> DistilledSet:
        """The whole set, held (small sets: a test, the redundancy diagnostic, LGD's seed set)."""
        parts = [part for _, part in self.classes()]
        return DistilledSet(*(torch.cat([getattr(p, k) for p in parts]) for k in ("images", "labels", "slots")))


def written_set(out: str | Path) -> StagedSet:
    """A written set (write_distilled) as a StagedSet: labels, slots and scores read, images left in its class
    files until a row is taken, so a step that goes on from a written set (LGD's next increment) holds none."""
    return StagedSet.of_files([path for _, path in sorted(class_files(out).items())])


def grid_rows(labels: torch.Tensor, per_class: int = 10, max_classes: int = 20) -> torch.Tensor:
    """The rows image_grid shows by default: the first `per_class` of each of the first `max_classes` classes
    (so a caller reads only those images)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()[:max_classes]])


def image_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = 10, scale: int = 0,
               names: list[str] | None = None, gap: int = 2) -> np.ndarray:
    """uint8 [N,C,H,W] -> one RGB grid: a row per class (at most 20) of up to `per_class` images (no more
    columns than the fullest class fills), `gap` white pixels between tiles, the class name (names[label])
    left of each row. scale 0 = auto: tiles of about 64 px (16 px digits x4, 256 px images stay 1:1)."""
    from PIL import Image, ImageDraw

    classes = labels.unique().tolist()[:20]
    cols = min(per_class, max(int((labels == c).sum()) for c in classes))
    c, h, w = images.shape[1:]
    scale = scale or max(1, 64 // h)
    th, tw, left = h * scale, w * scale, (6 * 14 if names else 0)
    grid = np.full((gap + len(classes) * (th + gap), left + gap + cols * (tw + gap), 3), 255, np.uint8)
    for r, cls in enumerate(classes):
        y = gap + r * (th + gap)
        for k, i in enumerate(torch.nonzero(labels == cls).flatten()[:cols].tolist()):
            img = np.transpose(images[i].numpy(), (1, 2, 0))
            img = np.repeat(img, 3, 2) if c == 1 else img
            x = left + gap + k * (tw + gap)
            grid[y:y + th, x:x + tw] = np.kron(img, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else img
    if names:
        canvas = Image.fromarray(grid)
        draw = ImageDraw.Draw(canvas)
        for r, cls in enumerate(classes):
            draw.text((2, gap + r * (th + gap) + th // 2 - 5), str(names[cls])[:13], fill=(0, 0, 0))
        grid = np.asarray(canvas)
    return grid
