"""python -m raydd.prepare --preset P data.root=DIR data.store=DIR_OR_URI [key=value ...]

The real data's store: an ImageFolder, WebDataset shards or a Hugging Face dataset's parquet files
(data.dataset=imagefolder / webdataset / huggingface) decoded once, resized to data.image_size, as parquet shards
under `<data.store>/<key>/{train,val}/` (a local directory or any pyarrow filesystem URI: s3://, gs://, a shared
path), so that no process decodes JPEGs again. Ray Data does the work: each class folder is listed by its own task
(no process lists 1.28 M files), or Ray Data's WebDataset or parquet reader reads the shards; images are decoded
and resized in map_batches tasks across the cluster and written with write_parquet. The key is the data that
decides the rows (root, classes, size, channels, the decode cap of data.max_train_per_class; a shard source's
dataset and source_classes). Unreadable files are named and fail the store; it is complete only when its
manifest.json exists, which is written last. distill / sweep / evaluate / compare prepare a missing store
themselves when data.store is set (`load_data`).

With data.latents=true and a latent backbone.vae (a hub id or a diffusers dir), the train split is also encoded
by that VAE on the actor pool into <data.store>/<key>/latents/<VAE key>/ (prepare_latents), which fine-tunes and
RSM's class means then read instead of encoding every batch.

Rows: label (position in the class list), index (the file's place in its class: file-name order; in a shard
source, (file, WebDataset key or parquet row hash) order), path (the file, or file:key, for error messages), image
(uint8 [C, H, W] bytes), error ("" or why the file could not be read). Read by `raydd.data.read_store_split`
in index order per class, so a stored ImageFolder equals the decoded one exactly, and streamed to Train jobs by
`raydd.distributed.store.part_dataset`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from raydd.config import Config, DataConfig, config_hash, load_config
from raydd.data import (SHARD_SOURCES, DataError, RealData, decode_cap, load_real, source_classes, source_files,
                        store_filesystem)


def store_location(d: DataConfig) -> str:
    """<data.store>/<key>: the store of this data config (an absolute path or a URI)."""
    root, classes, has_val = source_classes(d)
    source = () if d.dataset == "imagefolder" else (d.dataset, d.source_classes)   # ImageFolder keys stay as they were
    key = config_hash("store-v2", root, classes, d.image_size, d.channels, decode_cap(d, has_val), *source)
    base = d.store if "://" in d.store else str(Path(d.store).expanduser().resolve())
    return f"{base.rstrip('/')}/{key}"


def is_complete(location: str) -> bool:
    from pyarrow import fs as pafs

    fs, path = store_filesystem(location)
    return fs.get_file_info(f"{path}/manifest.json").type == pafs.FileType.File


def prepare_store(d: DataConfig) -> str:
    """Write the store of `d` unless it is complete; returns its location. Needs a running Ray."""
    return _unless_complete(store_location(d), lambda location: _write_store(d, location))


def _unless_complete(location: str, write) -> str:
    """write(location) unless `location` is complete (its manifest.json exists); returns the location. Two commands
    that write one local location take turns on a lock file (the second finds it complete)."""
    import contextlib

    from raydd.locks import file_lock

    local = "://" not in location
    if local:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"{location}.lock") if local else contextlib.nullcontext():
        if not is_complete(location):
            write(location)
    return location


def _emptied(location: str):
    """(filesystem, path) of `location`, created and emptied of what an interrupted write left."""
    fs, path = store_filesystem(location)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    return fs, path


def _complete(fs, path: str, manifest: dict) -> None:
    """Write manifest.json, last: what is under `path` is complete."""
    with fs.open_output_stream(f"{path}/manifest.json") as f:
        f.write(json.dumps(manifest, indent=1).encode())


def _write_store(d: DataConfig, location: str) -> str:
    import pyarrow.parquet as pq

    from raydd.data import class_list
    from raydd.distributed.store import write_digits_split, write_folder_split, write_shard_split

    root, classes, has_val = source_classes(d)
    fs, path = _emptied(location)
    shards = d.dataset in SHARD_SOURCES
    if d.dataset == "digits":
        sources = {"train": "scikit-learn's digits"}
    elif shards:
        sources = source_files(d.dataset, root)                          # {split: [files]}
    else:
        sources = {"train": f"{root}/train" if Path(root, "train").is_dir() else root} | (
            {"val": f"{root}/val"} if has_val else {})
    counts = {}
    for split, source in sources.items():
        cap, dest = decode_cap(d, has_val) if split == "train" else 0, f"{location}/{split}"
        where = f"{root} ({len(source)} {d.dataset} files)" if shards else source
        print(f"[raydd] prepare: {split} of {len(classes)} classes from {where} -> {dest}", flush=True)
        if d.dataset == "digits":
            write_digits_split(d, dest)
        elif shards:
            write_shard_split(d.dataset, source, class_list(d.source_classes), classes, cap, d.image_size,
                              d.channels, dest)
        else:
            write_folder_split([f"{source}/{c}" for c in classes], cap, d.image_size, d.channels, dest)
        meta = pq.read_table(f"{path}/{split}", filesystem=fs, columns=["label", "error"])
        errors = [e for e in meta.column("error").to_pylist() if e]
        if errors:
            raise DataError(f"{len(errors)} unreadable image(s) under {where}:\n  " + "\n  ".join(errors[:20]))
        counts[split] = np.bincount(meta.column("label").to_numpy(), minlength=len(classes)).tolist()
    manifest = {"root": str(root), "classes": classes, "image_size": d.image_size, "channels": d.channels,
                "counts": counts}
    _complete(fs, path, manifest)
    print(f"[raydd] prepare: done, {sum(map(sum, counts.values()))} images in {location}", flush=True)


def latent_location(d: DataConfig, vae: str, vae_scale: float) -> str:
    """<store location>/latents/<VAE key>: the train split's latents under this VAE (keyed by its files and
    scale), beside the images they were encoded from."""
    from raydd.backbone import vae_fingerprint

    return f"{store_location(d)}/latents/{config_hash('latents-v1', vae_fingerprint(vae), float(vae_scale))}"


def prepare_latents(cfg: Config, vae: str, vae_scale: float) -> str:
    """With data.latents: the store's train split encoded by the VAE `vae` (a resolved source: hub id or dir), written
    unless complete (as prepare_store: a lock file, the manifest last); returns its location, or "" when
    data.latents is off. The image store must be complete. On Ray (started unless running): the images stream from
    the store through compute.num_actors actors (compute.gpus_per_actor GPUs each), which write each row's
    posterior mean x scale as fp16 [c, h, w] bytes: rows label, index (as the image rows), latent."""
    from raydd.data import _complete_store
    from raydd.distributed.cluster import init_ray

    if not cfg.data.latents:
        return ""
    images = _complete_store(cfg.data)
    location = latent_location(cfg.data, vae, vae_scale)              # a missing VAE fails here, before Ray
    init_ray(cfg.compute)                                              # (a run's Ray is up already)
    return _unless_complete(location, lambda location: _write_latents(cfg, images, location, vae, vae_scale))


def _write_latents(cfg: Config, images: str, location: str, vae: str, vae_scale: float) -> None:
    from raydd.backbone import vae_latent_shape
    from raydd.distributed.store import write_latent_split

    fs, path = _emptied(location)
    print(f"[raydd] prepare: latents of {images}/train under VAE {vae} (scale {vae_scale}) -> {location}", flush=True)
    shape = vae_latent_shape(vae, cfg.data.image_size)
    write_latent_split(cfg, f"{images}/train", f"{location}/train", vae, vae_scale)
    _complete(fs, path, {"vae": vae, "vae_scale": float(vae_scale), "shape": list(shape), "dtype": "float16",
                         "images": images})


def load_data(cfg: Config) -> RealData:
    """The run's real data. With data.store set (files: an ImageFolder or a shard source), read from its store; a
    missing store is prepared first, which starts Ray (unknown classes and a missing root fail before that)."""
    d = cfg.data
    if d.store and not is_complete(store_location(d)):
        from raydd.distributed.cluster import init_ray

        init_ray(cfg.compute)
        prepare_store(d)
    return load_real(d)


def main(argv: list[str] | None = None) -> int:
    from raydd.distill import build_parser, run_cli

    p = build_parser("python -m raydd.prepare", __doc__.split("\n\n")[1])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.preset, args.overrides, smoke=args.smoke)
        if not cfg.data.store:
            raise DataError("raydd.prepare needs a store: data.store=DIR_OR_URI (and for files data.dataset="
                            "imagefolder (webdataset, huggingface) data.root=DIR, e.g. --preset imagenette)")
        data = load_data(cfg)
        print(f"{store_location(cfg.data)}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test "
              f"images of {data.num_classes} classes (read back)")
        if cfg.data.latents and cfg.backbone.vae == "tiny":
            print("[raydd] prepare: latents under backbone.vae=tiny are encoded by the first run, once it has "
                  "trained the tiny VAE")
        elif cfg.data.latents:
            print(f"latents: {prepare_latents(cfg, cfg.backbone.vae, cfg.backbone.vae_scale)}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
