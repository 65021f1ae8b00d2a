"""The Ray Data pipeline that fills a real-data store (raydd.prepare decides what and where)."""
from __future__ import annotations

import posixpath
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


IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")                        # a WebDataset sample's image, by suffix


def _is_label_member(name: str) -> bool:
    """read_webdataset's fileselect for the first pass: only each sample's label (.cls) is read into a row."""
    return name.lower().endswith(".cls")


def _sample_ids(urls, keys, shards: list[str]) -> np.ndarray:
    """A sample's id, b"<shard number>\t<key>" (bytes [N]): WebDataset keys are unique within a shard."""
    number = {name: i for i, name in enumerate(shards)}
    return np.array([f"{number[posixpath.basename(u)]:07d}\t{k}".encode() for u, k in zip(urls, keys)], dtype=bytes)


def _order_samples(files: list[str], source_names: list[str], classes: list[str], cap: int) -> dict[str, np.ndarray]:
    """First pass: each sample's shard, key and .cls label (the reader streams past the images: none is kept or
    decoded) -> the rows the store keeps, as
    {"id": sorted sample ids, "label": [N], "index": [N]}: index = the sample's place in its class in (shard, key)
    order, the first `cap` of each class when cap > 0 (so only those are decoded). Samples of classes not in
    `classes` are left out; a sample without a .cls member is reported by the second pass."""
    label_of = np.full(len(source_names), -1)                             # .cls integer -> label (-1: not kept)
    label_of[[source_names.index(c) for c in classes]] = np.arange(len(classes))
    shards = [posixpath.basename(f) for f in files]
    ids, labels = [], []
    for b in ray.data.read_webdataset(files, decoder=None, fileselect=_is_label_member).iter_batches(
            batch_size=4096, batch_format="numpy"):
        src = np.array([int(v) for v in b["cls"]])
        if (bad := (src < 0) | (src >= len(source_names))).any():
            raise DataError(f"{int(bad.sum())} sample(s) have a .cls label outside data.source_classes (labels 0.."
                            f"{len(source_names) - 1}), e.g. {b['__url__'][bad][0]}:{b['__key__'][bad][0]} = {src[bad][0]}")
        kept = label_of[src] >= 0
        ids.append(_sample_ids(b["__url__"][kept], b["__key__"][kept], shards))
        labels.append(label_of[src][kept])
    ids, labels = np.concatenate(ids or [np.zeros(0, bytes)]), np.concatenate(labels or [np.zeros(0, int)])
    order = np.lexsort((ids, labels))                                     # by class, then (shard, key)
    ids, labels = ids[order], labels[order]
    if len(dup := ids[1:][ids[1:] == ids[:-1]]):
        raise DataError(f"{len(dup)} WebDataset key(s) appear twice in one shard, e.g. {dup[0].decode()!r}")
    index = np.arange(len(ids)) - np.searchsorted(labels, labels)          # place in its class
    keep = index < cap if cap > 0 else np.ones(len(ids), dtype=bool)
    by_id = np.argsort(ids[keep])
    return {"id": ids[keep][by_id], "label": labels[keep][by_id], "index": index[keep][by_id]}


def _present(member) -> bool:
    """Whether a sample has this member: a sample without it holds None or NaN in the batch's column."""
    return isinstance(member, bytes)


def _decode_samples(batch: dict, order, shards: list[str], size: int, channels: int) -> dict:
    """map_batches, second pass: WebDataset samples (raw bytes) -> the store's rows for the samples the first pass
    kept (others are skipped undecoded); a sample without a label or an image is an error row."""
    order = ray.get(order)                                               # zero-copy from the object store
    ids = _sample_ids(batch["__url__"], batch["__key__"], shards)
    at = np.minimum(np.searchsorted(order["id"], ids), len(order["id"]) - 1)
    found = order["id"][at] == ids
    no_label = np.array([not _present(v) for v in batch["cls"]]) if "cls" in batch else np.ones(len(ids), dtype=bool)
    image_cols = [c for c in batch if c.lower() in IMAGE_MEMBERS]
    rows = {"label": [], "index": [], "path": [], "image": [], "error": []}
    for i in np.flatnonzero(found | no_label):
        name = f"{batch['__url__'][i]}:{batch['__key__'][i]}"
        data = next((batch[c][i] for c in image_cols if _present(batch[c][i])), None)
        image, error = b"", ""
        if no_label[i]:
            error = f"sample {name} has no .cls label"
        elif data is None:
            error = f"sample {name} has no image member ({', '.join(IMAGE_MEMBERS)})"
        else:
            try:
                image = read_image(name, size, channels, data=data).numpy().tobytes()
            except DataError as e:
                error = str(e)
        for k, v in zip(rows, (order["label"][at[i]] if found[i] else -1, order["index"][at[i]] if found[i] else -1,
                               name, image, error)):
            rows[k].append(v)
    return {"label": np.array(rows["label"], dtype=np.int64), "index": np.array(rows["index"], dtype=np.int64),
            "path": np.array(rows["path"], dtype=object), "image": np.array(rows["image"], dtype=object),
            "error": np.array(rows["error"], dtype=object)}


def write_webdataset_split(folder: str, source_names: list[str], classes: list[str], cap: int, size: int,
                           channels: int, dest: str) -> None:
    """WebDataset shards (folder/*.tar, a path or URI; each sample an image and its .cls integer, an index into
    `source_names`) -> the same parquet rows as write_folder_split, through Ray Data's WebDataset reader, twice:
    the first pass reads only the labels and orders the samples (_order_samples), the second decodes and resizes
    the kept ones in batches of 64 across the cluster."""
    from raydd.data import shard_files

    files = shard_files(folder)
    order = ray.put(_order_samples(files, source_names, classes, cap))
    (ray.data.read_webdataset(files, decoder=None)
     .map_batches(_decode_samples, fn_kwargs={"order": order, "shards": [posixpath.basename(f) for f in files],
                                              "size": size, "channels": channels}, batch_size=64)
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
