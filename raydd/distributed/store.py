"""The Ray Data pipeline that fills a real-data store (raydd.prepare decides what and where)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from raydd.data import DataError, list_image_files, read_image


def _class_files(item: dict) -> list[dict]:
    """flat_map: one class folder -> its image files (file-name order, the first `cap` when cap > 0)."""
    files = list_image_files(Path(item["folder"]))
    return [{"label": item["label"], "path": str(f)} for f in (files[:item["cap"]] if item["cap"] > 0 else files)]


def _decode(batch: dict, size: int, channels: int) -> dict:
    """map_batches: paths -> uint8 [C, size, size] bytes (raydd.data.read_image), or why the file is unreadable."""
    images, errors = [], []
    for p in batch["path"]:
        try:
            images.append(read_image(Path(p), size, channels).numpy().tobytes())
            errors.append("")
        except DataError as e:
            images.append(b"")
            errors.append(str(e))
    return {"label": batch["label"], "path": batch["path"], "image": np.array(images, dtype=object),
            "error": np.array(errors, dtype=object)}


def write_folder_split(folders: list[str], cap: int, size: int, channels: int, dest: str) -> None:
    """Class folders (label = position) -> parquet shards under `dest` (a path or URI): one listing task per
    folder, decoding and resizing in batches of 64 across the cluster. Rows: label, path, image, error."""
    items = [{"label": i, "folder": f, "cap": cap} for i, f in enumerate(folders)]
    (ray.data.from_items(items, override_num_blocks=len(items))
     .flat_map(_class_files)
     .map_batches(_decode, fn_kwargs={"size": size, "channels": channels}, batch_size=64)
     .write_parquet(dest))
