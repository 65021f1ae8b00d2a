"""The Ray Data pipeline that fills a real-data store (raydd.prepare decides what and where)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from raydd.data import DataError, list_image_files, read_image


def _class_files(item: dict) -> list[dict]:
    """flat_map: one class folder -> its image files (file-name order, the first `cap` when cap > 0); index = the
    file's place in its class, which with the label gives the row's place in the split (raydd.data.part_positions)."""
    files = list_image_files(Path(item["folder"]))
    return [{"label": item["label"], "index": i, "path": str(f)}
            for i, f in enumerate(files[:item["cap"]] if item["cap"] > 0 else files)]


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
    return {"label": batch["label"], "index": batch["index"], "path": batch["path"], "image": np.array(images, dtype=object),
            "error": np.array(errors, dtype=object)}


def write_folder_split(folders: list[str], cap: int, size: int, channels: int, dest: str) -> None:
    """Class folders (label = position) -> parquet shards under `dest` (a path or URI): one listing task per
    folder, decoding and resizing in batches of 64 across the cluster. Rows: label, index, path, image, error."""
    items = [{"label": i, "folder": f, "cap": cap} for i, f in enumerate(folders)]
    (ray.data.from_items(items, override_num_blocks=len(items))
     .flat_map(_class_files)
     .map_batches(_decode, fn_kwargs={"size": size, "channels": channels}, batch_size=64)
     .write_parquet(dest))


def _keep_part(batch: dict, where: np.ndarray, offsets: np.ndarray) -> dict:
    """map_batches: the rows of one part, pos = a row's place in the part (-1 in `where`: not in it)."""
    pos = where[offsets[batch["label"]] + batch["index"]]
    mine = pos >= 0
    return {"label": batch["label"][mine], "pos": pos[mine], "image": batch["image"][mine]}


def part_dataset(cfg, spec: dict, seed: int = 0, per_class: int = 0) -> "ray.data.Dataset":
    """A split of a store (spec: raydd.data.stream_spec; a part of its train folder, or the root's own val/) as a
    Ray Dataset for Train jobs (their `datasets=`): rows label, pos, image. Each epoch reads the files in another
    order (seeded by `seed`), then the worker's local shuffle buffer mixes them (raydd.data.StreamedSplit);
    nothing is materialised (a block-order shuffle would hold the whole split in the object store). Nothing is
    read until a worker iterates. per_class > 0: only the first `per_class` rows of each class.

    Its tasks ask for no CPU, two at a time: the Train workers that read it hold the CPUs, and a stream whose
    tasks asked for one waited forever when they held them all (two 1-CPU nodes, two workers)."""
    from raydd.data import _complete_store, cap_per_class, class_labels, class_offsets, stored_rows

    folder, positions = stored_rows(spec["part"], spec["counts"], cfg, spec["has_val"])
    counts = spec["counts"][folder]
    positions = cap_per_class(positions, class_labels(counts), per_class)
    where = np.full(int(sum(counts)), -1, dtype=np.int32)           # [rows of the folder]: 4 B a row
    where[positions] = np.arange(len(positions))
    offsets = class_offsets(counts)
    light = {"num_cpus": 0, "concurrency": 2}
    return (ray.data.read_parquet(f"{_complete_store(cfg)}/{folder}", **light,
                                  shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True))
            .map_batches(_keep_part, fn_kwargs={"where": where, "offsets": offsets}, batch_format="numpy", **light))


def _class_rows(batch: dict, shape: tuple[int, int, int]) -> dict:
    """map_batches: stored rows -> the rows ctx.map's callables take: class_idx, unit (= the class), image uint8
    [N, C, H, W]."""
    from raydd.data import stored_images

    return {"class_idx": batch["label"], "unit": batch["label"], "image": stored_images(batch["image"], shape)}


def map_part(cfg, part: str, per_class: int, udf: type, udf_kwargs: dict) -> dict:
    """`udf` (a callable class, as for ctx.map) over the first `per_class` rows of each class of a store's part (0:
    all), streamed from the store through an actor pool (compute.num_actors, as sampling): no process holds the
    part. -> the udf's output columns, concatenated; they should be small (per-class sums, scores), as the driver
    holds them. Batches mix classes and arrive in any order: the udf must not depend on either (sums do not)."""
    from raydd.data import stream_spec

    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    c = cfg.compute
    ds = (part_dataset(cfg.data, stream_spec(cfg.data, part), per_class=per_class)
          .map_batches(_class_rows, fn_kwargs={"shape": shape}, batch_format="numpy", num_cpus=0, concurrency=2)
          .map_batches(udf, fn_constructor_kwargs=udf_kwargs, batch_size=256, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=c.num_actors), num_cpus=c.cpus_per_actor,
                       num_gpus=c.gpus_per_actor, memory=int(c.memory_per_actor_gib * 2**30) or None))
    outs = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
