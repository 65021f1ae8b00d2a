"""Writing and reading a distilled set.

Layout of <out>/ (written to <out>.partial-<pid>/ first, then renamed: a set that exists is complete):
  parquet/class_idx=<c>/part-0.parquet   columns slot, seed?, image (raw uint8 bytes), image_shape,
                                         latent (raw float16 bytes, may be null), latent_shape, score
  images/<class_name>/<slot>.png         the ImageFolder every reference repo's evaluation reads
  manifest.json                          classes, ipc, counts — written last
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from raydd.generate import DistilledSet, StagedSet


def to_pil(img: np.ndarray) -> Image.Image:
    """uint8 [C,H,W] -> PIL image (L or RGB)."""
    return Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(np.transpose(img, (1, 2, 0)))


def write_distilled(ds: DistilledSet | StagedSet, out: str | Path, class_names: list[str],
                    extra: dict | None = None) -> Path:
    """A class at a time (`classes()`): of a StagedSet, one class's images and the unit files they are in are held,
    and every unit file is read once."""
    out = Path(out)
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for c, part in ds.classes():                                       # this class's rows, in slot order
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
        part_dir = tmp / "parquet" / f"class_idx={c}"
        part_dir.mkdir(parents=True)
        pq.write_table(pa.table(cols), part_dir / "part-0.parquet")
        img_dir = tmp / "images" / class_names[c]
        img_dir.mkdir(parents=True)
        for img, slot in zip(images, part.slots.tolist()):
            to_pil(img).save(img_dir / f"{slot}.png")
    counts = torch.bincount(ds.labels, minlength=len(class_names)).tolist()
    manifest = {"classes": class_names, "counts": counts, "num_images": len(ds), **(extra or {})}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_distilled(out: str | Path, classes: list[int] | None = None, per_class: int = 0) -> DistilledSet:
    """Read back what write_distilled wrote (canonical (label, slot) order): every class, or only `classes` (their
    files alone are read), and of each all rows or the `per_class` lowest slots (a figure's few images of a large
    set)."""
    root = Path(out) / "parquet"
    if not (Path(out) / "manifest.json").exists():
        raise FileNotFoundError(f"{out} is not a complete distilled set (no manifest.json)")
    imgs, labels, slots, lats, scores = [], [], [], [], []
    for part in sorted(root.glob("class_idx=*"), key=lambda p: int(p.name.split("=")[1])):
        c = int(part.name.split("=")[1])
        if classes is not None and c not in classes:
            continue
        t = pq.read_table(part / "part-0.parquet").to_pydict()
        for k in sorted(range(len(t["slot"])), key=lambda k: t["slot"][k])[:per_class or None]:
            imgs.append(np.frombuffer(t["image"][k], np.uint8).reshape(t["image_shape"][k]))
            if "latent" in t and t["latent"][k] is not None:
                lats.append(np.frombuffer(t["latent"][k], np.float16).reshape(t["latent_shape"][k]))
            labels.append(c)
            slots.append(t["slot"][k])
            scores.append(t["score"][k])
    ds = DistilledSet(torch.from_numpy(np.stack(imgs)), torch.tensor(labels), torch.tensor(slots),
                      torch.from_numpy(np.stack(lats)) if len(lats) == len(imgs) else None,
                      torch.tensor(scores, dtype=torch.float32))
    return ds.sorted()


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
