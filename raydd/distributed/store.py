"""The Ray Data pipeline that fills a real-data store (raydd.prepare decides what and where)."""
from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np
import ray
from ray.data.datasource import FileBasedDatasource

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


def write_digits_split(d, dest: str) -> None:
    """scikit-learn's digits of data.classes, as the data config asks for them (raydd.data.digits_images) -> parquet
    under `dest`, the rows of write_folder_split in class order: index = the image's place in its class in
    scikit-learn's order, so each split of the store holds the images of the held split, in class order."""
    import pyarrow as pa

    from raydd.data import class_offsets, digits_images

    x, y, _ = digits_images(d)
    order = np.argsort(y.numpy(), kind="stable")                                   # class order
    labels = y.numpy()[order]
    index = np.arange(len(order)) - class_offsets(np.bincount(labels).tolist())[labels]
    ray.data.from_arrow(pa.table({
        "label": labels, "index": index, "path": [f"digits:{i}" for i in order.tolist()],
        "image": [x[i].numpy().tobytes() for i in order.tolist()], "error": [""] * len(order),
    })).write_parquet(dest)


IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")                        # a WebDataset sample's image, by suffix
LABEL_NAME = {"webdataset": ".cls", "huggingface": "label"}           # where a sample's integer label is


def _is_label_member(name: str) -> bool:
    """read_webdataset's fileselect for the first pass: only each sample's label (.cls) is read into a row."""
    return name.lower().endswith(".cls")


def _present(value) -> bool:
    """Whether a sample has this member or value: a missing one is None or NaN in a batch's column."""
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def _wds_rows(batch: dict, files: list[str], light: bool) -> dict:
    """map_batches: read_webdataset's raw samples -> rows id (b"<shard number>\t<key>": keys are unique within a
    shard), name (shard:key), src (the .cls integer; -1: none) and, unless light, data (the image's bytes; b"":
    none)."""
    number = {posixpath.basename(f): i for i, f in enumerate(files)}
    urls, keys = batch["__url__"], batch["__key__"]
    labels = batch.get("cls", np.full(len(keys), None))
    rows = {"id": np.array([f"{number[posixpath.basename(u)]:07d}\t{k}".encode() for u, k in zip(urls, keys)]),
            "name": np.array([f"{u}:{k}" for u, k in zip(urls, keys)], dtype=object),
            "src": np.array([int(v) if _present(v) else -1 for v in labels], dtype=np.int64)}
    if not light:
        images = [batch[c] for c in batch if c.lower() in IMAGE_MEMBERS]
        rows["data"] = np.array([next((m[i] for m in images if _present(m[i])), b"") for i in range(len(keys))],
                                dtype=object)
    return rows


def _hf_rows(batch: dict, files: list[str], light: bool) -> dict:
    """map_batches: a Hugging Face dataset's rows (label, image {bytes, path}; the reader's path and row_hash, which
    with the file orders its rows) -> the rows _wds_rows gives."""
    number = {posixpath.basename(f): i for i, f in enumerate(files)}
    paths, hashes = batch["path"], batch["row_hash"]
    rows = {"id": np.array([f"{number[posixpath.basename(p)]:07d}\t{h:020d}".encode() for p, h in zip(paths, hashes)]),
            "name": np.array([f"{p}:row-hash-{h}" for p, h in zip(paths, hashes)], dtype=object),
            "src": np.array([int(v) if _present(v) and v >= 0 else -1 for v in batch["label"]], dtype=np.int64)}
    if not light:
        rows["data"] = np.array([(im or {}).get("bytes") or b"" for im in batch["image"]], dtype=object)
    return rows


class ArrowStreams(FileBasedDatasource):
    """Arrow IPC stream files (datasets.save_to_disk's data-*.arrow), read by Ray Data's file-based reader, one read
    task per file; Ray 2.60 has no reader for them (read_parquet reads the hub's layout). Rows as read_parquet's with
    include_row_hash: the file's columns (`columns` only), path and row_hash, here the row's place in its file."""

    _FILE_EXTENSIONS = ["arrow"]

    def __init__(self, paths: list[str], columns: list[str] | None = None):
        super().__init__(paths, include_paths=True)
        self.columns = columns

    def _read_stream(self, f, path: str):
        import pyarrow as pa

        start = 0
        for batch in pa.ipc.open_stream(f):
            table = pa.Table.from_batches([batch.select(self.columns) if self.columns else batch])
            yield table.append_column("row_hash", pa.array(np.arange(start, start + len(table)), pa.int64()))
            start += len(table)


def _samples(dataset: str, files: list[str], light: bool) -> "ray.data.Dataset":
    """A shard source's samples through Ray Data's readers, as rows id, name, src (+ data unless light: the
    first pass reads no image into a row)."""
    kwargs = {"fn_kwargs": {"files": files, "light": light}, "batch_format": "numpy"}
    if dataset == "webdataset":
        ds = ray.data.read_webdataset(files, decoder=None, fileselect=_is_label_member if light else None)
        return ds.map_batches(_wds_rows, **kwargs)
    if files[0].endswith(".arrow"):                                         # source_files: one layout, not both
        ds = ray.data.read_datasource(ArrowStreams(files, columns=["label"] if light else None))
        return ds.map_batches(_hf_rows, **kwargs)
    ds = ray.data.read_parquet(files, include_paths=True, include_row_hash=True)
    return (ds.select_columns(["label", "path", "row_hash"]) if light else ds).map_batches(_hf_rows, **kwargs)


def _order_samples(dataset: str, files: list[str], source_names: list[str], classes: list[str],
                   cap: int) -> dict[str, np.ndarray]:
    """First pass: each sample's id and label, no image -> the rows the store keeps, as {"id": sorted sample ids,
    "label": [N], "index": [N]}: index = the sample's place in its class in id order (file, then key or row
    hash), the first `cap` of each class when cap > 0 (so only those are decoded). Samples of classes not in
    `classes` are left out; one without a label is reported by the second pass."""
    label_of = np.full(len(source_names), -1)                             # source label -> label (-1: not kept)
    label_of[[source_names.index(c) for c in classes]] = np.arange(len(classes))
    ids, labels = [np.zeros(0, bytes)], [np.zeros(0, np.int64)]
    for b in _samples(dataset, files, light=True).iter_batches(batch_size=4096, batch_format="numpy"):
        has, src = b["src"] >= 0, b["src"]
        if (bad := has & (src >= len(source_names))).any():
            raise DataError(f"{int(bad.sum())} sample(s) have a {LABEL_NAME[dataset]} label outside "
                            f"data.source_classes (labels 0..{len(source_names) - 1}), e.g. {b['name'][bad][0]} = "
                            f"{src[bad][0]}")
        kept = has & (label_of[np.where(has, src, 0)] >= 0)
        ids.append(b["id"][kept])
        labels.append(label_of[src[kept]])
    ids, labels = np.concatenate(ids), np.concatenate(labels)
    order = np.lexsort((ids, labels))                                     # by class, then id
    ids, labels = ids[order], labels[order]
    if len(dup := ids[1:][ids[1:] == ids[:-1]]):
        raise DataError(f"{len(dup)} sample id(s) appear twice in one file, e.g. {dup[0].decode()!r}")
    index = np.arange(len(ids)) - np.searchsorted(labels, labels)          # place in its class
    keep = index < cap if cap > 0 else np.ones(len(ids), dtype=bool)
    by_id = np.argsort(ids[keep])
    return {"id": ids[keep][by_id], "label": labels[keep][by_id], "index": index[keep][by_id]}


def _decode_samples(batch: dict, order, label_name: str, size: int, channels: int) -> dict:
    """map_batches, second pass: samples (_samples' rows) -> the store's rows for the samples the first pass kept
    (others are skipped undecoded); a sample without a label or an image is an error row."""
    order = ray.get(order)                                               # zero-copy from the object store
    at = np.minimum(np.searchsorted(order["id"], batch["id"]), max(len(order["id"]) - 1, 0))
    found = order["id"][at] == batch["id"] if len(order["id"]) else np.zeros(len(batch["id"]), dtype=bool)
    rows = {"label": [], "index": [], "path": [], "image": [], "error": []}
    for i in np.flatnonzero(found | (batch["src"] < 0)):
        name, data, image, error = batch["name"][i], batch["data"][i], b"", ""
        if batch["src"][i] < 0:
            error = f"sample {name} has no {label_name} label"
        elif not data:
            error = f"sample {name} has no image"
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


def write_shard_split(dataset: str, files: list[str], source_names: list[str], classes: list[str], cap: int,
                      size: int, channels: int, dest: str) -> None:
    """A shard source's files (data.dataset webdataset: tar shards, each sample an image and its .cls integer;
    huggingface: parquet files with an image {bytes, path} and a label column; integers index `source_names`) ->
    the same parquet rows as write_folder_split, read twice by Ray Data's own reader: the first pass reads only
    the labels and orders the samples (_order_samples), the second decodes and resizes the kept ones in batches of
    64 across the cluster."""
    names = [posixpath.basename(f) for f in files]
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"data.root has files of one split with the same name in different folders ({dups[:5]}): a "
                        f"split's files are told apart by name; point data.root at one configuration's folder")
    order = ray.put(_order_samples(dataset, files, source_names, classes, cap))
    (_samples(dataset, files, light=False)
     .map_batches(_decode_samples, fn_kwargs={"order": order, "label_name": LABEL_NAME[dataset], "size": size,
                                              "channels": channels}, batch_size=64, batch_format="numpy")
     .write_parquet(dest))


class EncodeLatents:
    """map_batches actor: a store's image rows -> rows label, index, latent (the VAE's posterior mean x scale,
    fp16 [c, h, w] bytes). Loads the VAE once, on the actor's GPU when it holds one."""

    def __init__(self, vae: str, vae_scale: float, shape: tuple[int, int, int], gpus: float = 0.0, batch: int = 64):
        from raydd.backbone import load_vae
        from raydd.generate import actor_device

        self.device, self.shape, self.batch = actor_device(gpus), shape, batch
        self.vae = load_vae(vae, vae_scale).to(self.device).eval()

    def __call__(self, rows: dict) -> dict:
        import torch

        from raydd.data import stored_images
        from raydd.protocols import to_float

        x = torch.from_numpy(stored_images(rows["image"], self.shape))                  # uint8 [b, C, H, W]
        with torch.no_grad():
            z = torch.cat([self.vae.encode(to_float(b).to(self.device)).half().cpu() for b in x.split(self.batch)])
        return {"label": rows["label"], "index": rows["index"],
                "latent": np.array([r.numpy().tobytes() for r in z], dtype=object)}


def write_latent_split(cfg, src: str, dest: str, vae: str, vae_scale: float) -> None:
    """A store's image folder `src` -> its latents under `dest` (raydd.prepare.prepare_latents), encoded by
    compute.num_actors actors as the images stream past."""
    d, c = cfg.data, cfg.compute
    (ray.data.read_parquet(src).select_columns(["label", "index", "image"])
     .map_batches(EncodeLatents, fn_constructor_kwargs={"vae": vae, "vae_scale": vae_scale,
                                                        "shape": (d.channels, d.image_size, d.image_size),
                                                        "gpus": c.gpus_per_actor},
                  batch_size=256, batch_format="numpy", **actor_pool(c))
     .write_parquet(dest))


def actor_pool(c) -> dict:
    """map_batches' arguments for a pool of compute.num_actors actors sized as the sampling actors."""
    return {"compute": ray.data.ActorPoolStrategy(size=c.num_actors), "num_cpus": c.cpus_per_actor,
            "num_gpus": c.gpus_per_actor, "memory": int(c.memory_per_actor_gib * 2**30) or None}


def _keep_part(batch: dict, where: np.ndarray, offsets: np.ndarray, column: str) -> dict:
    """map_batches: the rows of one part, pos = a row's place in the part (-1 in `where`: not in it)."""
    pos = where[offsets[batch["label"]] + batch["index"]]
    mine = pos >= 0
    return {"label": batch["label"][mine], "pos": pos[mine], column: batch[column][mine]}


def part_dataset(cfg, spec: dict, seed: int = 0, per_class: int = 0, latents: str = "") -> "ray.data.Dataset":
    """A split of a store (spec: raydd.data.stream_spec; a part of its train folder, or the root's own val/) as a
    Ray Dataset for Train jobs (their `datasets=`): rows label, pos, image. Each epoch reads the files in another
    order (seeded by `seed`), then the worker's local shuffle buffer mixes them (raydd.data.StreamedSplit);
    nothing is materialised (a block-order shuffle would hold the whole split in the object store). Nothing is
    read until a worker iterates. per_class > 0: only the first `per_class` rows of each class. latents: the
    location of the train split's latents (raydd.prepare.prepare_latents): rows label, pos, latent instead.

    Its tasks ask for no CPU, two at a time: the Train workers that read it hold the CPUs, and a stream whose
    tasks asked for one waited forever when they held them all (two 1-CPU nodes, two workers)."""
    from raydd.data import _complete_store, cap_per_class, class_labels, class_offsets, stored_rows

    folder, positions = stored_rows(spec["part"], spec["counts"], cfg, spec["has_val"])
    if latents and folder != "train":
        raise ValueError(f"latents are kept for the store's train folder only, not for {spec['part']} ({folder}/)")
    counts = spec["counts"][folder]
    positions = cap_per_class(positions, class_labels(counts), per_class)
    where = np.full(int(sum(counts)), -1, dtype=np.int32)           # [rows of the folder]: 4 B a row
    where[positions] = np.arange(len(positions))
    offsets = class_offsets(counts)
    light = {"num_cpus": 0, "concurrency": 2}
    column = "latent" if latents else "image"
    return (ray.data.read_parquet(f"{latents or _complete_store(cfg)}/{folder}", **light,
                                  shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True))
            .select_columns(["label", "index", column])                  # pushed into the read
            .map_batches(_keep_part, fn_kwargs={"where": where, "offsets": offsets, "column": column},
                         batch_format="numpy", **light))


def _class_rows(batch: dict, column: str, shape: tuple[int, int, int], dtype: str) -> dict:
    """map_batches: stored rows -> the rows ctx.map's callables take: class_idx, unit (= the class), and image
    uint8 [N, C, H, W] or latent float16 [N, c, h, w]."""
    from raydd.data import stored_images

    return {"class_idx": batch["label"], "unit": batch["label"], column: stored_images(batch[column], shape, dtype)}


def map_part(cfg, part: str, per_class: int, udf: type, udf_kwargs: dict, latents: str = "") -> dict:
    """`udf` (a callable class, as for ctx.map) over the first `per_class` rows of each class of a store's part (0:
    all), streamed from the store through an actor pool (compute.num_actors, as sampling): no process holds the
    part. -> the udf's output columns, concatenated; they should be small (per-class sums, scores), as the driver
    holds them. Batches mix classes and arrive in any order: the udf must not depend on either (sums do not).
    latents: the train split's latents (raydd.prepare.prepare_latents) stream instead, as a column "latent"."""
    from raydd.data import store_manifest, stream_spec

    if latents:
        rows = {"column": "latent", "shape": tuple(store_manifest(latents)["shape"]), "dtype": "float16"}
    else:
        rows = {"column": "image", "shape": (cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                "dtype": "uint8"}
    ds = (part_dataset(cfg.data, stream_spec(cfg.data, part), per_class=per_class, latents=latents)
          .map_batches(_class_rows, fn_kwargs=rows, batch_format="numpy", num_cpus=0, concurrency=2)
          .map_batches(udf, fn_constructor_kwargs=udf_kwargs, batch_size=256, batch_format="numpy",
                       **actor_pool(cfg.compute)))
    outs = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def set_dataset(path: str) -> "ray.data.Dataset":
    """A written set (raydd.outputs, a path or a URI) as a Ray Dataset for a Train worker's raydd.data.StreamedSplit
    (the students, LGD's θ_{i−1}, the redundancy diagnostic): rows label (from the class file's name), pos (the row's
    place in the set's (class, slot) order, so a worker can stream a subset of it) and image (uint8 [C, H, W]
    bytes), read a class file at a time in another file order each epoch; nothing is read until a worker iterates
    (here only the slot columns are). Its tasks ask for no CPU, two at a time, as part_dataset's."""
    from raydd.data import class_offsets
    from raydd.generate import open_unit
    from raydd.outputs import class_files

    files = class_files(path)
    slots = {}                                                       # class -> its slots, sorted: [n_c]
    for c, f in files.items():
        with open_unit(f) as z:                                      # a ClassFile: reads the slot column alone
            slots[c] = np.sort(z["slot"])
    counts = [len(slots.get(c, [])) for c in range(max(files) + 1)]
    light = {"num_cpus": 0, "concurrency": 2}
    return (ray.data.read_parquet(sorted(files.values()), include_paths=True, partitioning=None, **light,
                                  shuffle=ray.data.FileShuffleConfig(seed=0, reseed_after_execution=True))
            .select_columns(["slot", "image", "path"])                   # pushed into the read: no latent read
            .map_batches(_set_rows, fn_kwargs={"slots": slots, "offsets": class_offsets(counts)},
                         batch_format="numpy", **light))


def _set_rows(batch: dict, slots: dict[int, np.ndarray], offsets: np.ndarray) -> dict:
    """map_batches: a written set's class-file rows -> the rows StreamedSplit reads (pos: the class's offset + the
    slot's rank in its class)."""
    from raydd.outputs import class_of_file

    label = np.array([class_of_file(p) for p in batch["path"]], dtype=np.int64)
    pos = np.array([offsets[c] + np.searchsorted(slots[c], s) for c, s in zip(label.tolist(), batch["slot"].tolist())],
                   dtype=np.int64)
    return {"label": label, "pos": pos, "image": batch["image"]}
