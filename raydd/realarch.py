"""python -m raydd.realarch [--methods dit,cao2,...] [--preset imagewoof] [--arch xl|s] [--gpu] [--out DIR]

The real architecture once, end to end, with random weights (nothing can be downloaded here):
  - DiT-XL/2 (hidden 1152, depth 28, 16 heads, patch 2, 4x32x32 latents, 1000 classes, learned sigma) saved
    as facebookresearch/DiT's original `.pt` (the layout of DiT-XL-2-256x256.pt);
  - the SD VAE (sd-vae-ft-* architecture: blocks 128/256/512/512, 8x down, 4 latent channels) saved as a
    diffusers AutoencoderKL directory;
  - a synthetic ImageNet-shaped ImageFolder: 2 classes of the preset's subset (their wnids), 256 px JPEGs
    under train/ and val/;
then, for every method, what a user runs (`--smoke` shrinks IPC to 1, 3 sampling steps, every fine-tune,
pool and teacher):
    python -m raydd.distill --method M --preset imagewoof --smoke data.root=... data.classes=w1,w2 \\
        backbone.source=<dir>/DiT-XL-2-256x256.pt backbone.vae=<dir>/sd-vae compute.gpus_per_actor=0 ...
Prints a Markdown table: exit code, wall time, peak memory (PSS and RSS summed over the driver and every Ray
process), the set diagnostics; each run's log is kept in <out>/logs/. Not part of the tests: on 2 CPU cores a
method takes minutes. --arch s builds DiT-S/2 (hidden 384, depth 12) instead, to check the script quickly;
--gpu keeps the preset's GPUs (run it on a CUDA machine at full size).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from raydd.bench import ARCHS, SD_VAE


def write_models(out: Path, arch: str, seed: int = 0) -> tuple[str, str]:
    """Random DiT (original .pt) and SD VAE (diffusers dir) -> (dit path, vae dir); reused when present."""
    import torch
    from diffusers import AutoencoderKL

    from raydd.backbone import _build_dit, to_original_dit

    dit, vae_dir = out / f"DiT-{arch.upper()}-2-256x256.pt", out / "sd-vae"
    torch.manual_seed(seed)
    if not dit.exists():
        model = _build_dit(num_classes=1000, in_channels=4, out_channels=8, sample_size=32, **ARCHS[arch])
        torch.save(to_original_dit(model), dit)
    if not (vae_dir / "config.json").exists():
        blocks = len(SD_VAE["block_out_channels"])
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                      latent_channels=4, sample_size=256, **SD_VAE).save_pretrained(str(vae_dir))
    return str(dit), str(vae_dir)


def write_imagefolder(root: Path, classes: list[str], train: int = 12, val: int = 4, size: int = 256) -> None:
    """root/{train,val}/<wnid>/<n>.JPEG: a class is a colour with noise, so a classifier can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, wnid in enumerate(classes):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            colour = np.array([255 * (k % 2), 128, 255 * (1 - k % 2)], dtype=np.float32)
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{wnid}_{i}.JPEG", quality=90)


def write_shards(folder: Path, out: Path, dataset: str, per_file: int = 256) -> None:
    """An ImageFolder's train/ and val/ (written by write_imagefolder) as a shard source of the same JPEG bytes,
    labels = the wnids' places in the sorted 1000 (data.source_classes=imagenet1k): "webdataset" as timm's ImageNet
    shards (out/imagenet1k-{train,validation}-NNNN.tar, samples <key>.jpg + <key>.cls), "huggingface" as a hub
    dataset's parquet files (out/data/{train,validation}-NNNNN-of-NNNNN.parquet, columns image {bytes, path},
    label). Samples in (class, file name) order, `per_file` a file."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydd.data import subset_classes

    label = {w: i for i, w in enumerate(subset_classes("imagenet1k"))}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((folder / split).glob("*/*.JPEG"), key=lambda f: (f.parent.name, f.name))
        parts = [files[i:i + per_file] for i in range(0, len(files), per_file)]
        for k, part in enumerate(parts):
            if dataset == "webdataset":
                out.mkdir(parents=True, exist_ok=True)
                with tarfile.open(out / f"imagenet1k-{name}-{k:04d}.tar", "w") as tar:
                    for f in part:
                        for member, data in ((f"{f.stem}.jpg", f.read_bytes()),
                                             (f"{f.stem}.cls", str(label[f.parent.name]).encode())):
                            info = tarfile.TarInfo(member)
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
            else:
                (out / "data").mkdir(parents=True, exist_ok=True)
                table = pa.table({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in part],
                                  "label": pa.array([label[f.parent.name] for f in part], pa.int64())})
                pq.write_table(table, out / "data" / f"{name}-{k:05d}-of-{len(parts):05d}.parquet")


def main(argv: list[str] | None = None) -> int:
    from raydd.bench import peak_tree_rss
    from raydd.data import subset_classes
    from raydd.methods import list_methods

    p = argparse.ArgumentParser(prog="python -m raydd.realarch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(list_methods()), help="comma list (default: every method)")
    p.add_argument("--preset", default="imagewoof")
    p.add_argument("--arch", choices=sorted(ARCHS), default="xl")
    p.add_argument("--gpu", action="store_true", help="keep the preset's GPU settings")
    p.add_argument("--out", default="realarch", help="models, data, caches, logs and the table go here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed on to every run")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in list_methods()]:
        p.error(f"unknown method(s) {unknown}; allowed: {', '.join(list_methods())}")

    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    classes = subset_classes(args.preset)[:2]
    dit, vae = write_models(out, args.arch)
    write_imagefolder(out / "data", classes)
    env = dict(os.environ, RAYDD_CACHE=str(out / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}")
    env.pop("RAY_ADDRESS", None)
    common = [f"data.root={out / 'data'}", f"data.classes={','.join(classes)}", f"backbone.source={dit}",
              f"backbone.vae={vae}", f"out_dir={out / 'outputs'}"]
    if not args.gpu:
        # a CPU machine: no GPUs, and no memory reservation (a laptop may not have the preset's 10 GiB per actor)
        common += ["compute.gpus_per_actor=0", "compute.gpus_per_worker=0", "compute.memory_per_actor_gib=0"]
    rows = []
    for method in methods:
        cmd = [sys.executable, "-m", "raydd.distill", "--method", method, "--preset", args.preset, "--smoke",
               *common, *args.overrides]
        print(f"[realarch] {method}: {' '.join(cmd[1:])}", flush=True)
        log = out / "logs" / f"{method}.log"
        rc, rss, pss, secs, _ = peak_tree_rss(cmd, env, str(out), output=str(log))
        text = log.read_text(errors="replace")
        diag = dict(kv.split(" ") for kv in next((ln.split("set diagnostics: ")[1] for ln in text.splitlines()
                                                  if "set diagnostics: " in ln), "").split("  ") if " " in kv)
        error = next((ln for ln in reversed(text.splitlines()) if ln.startswith(("raydd: error", "Traceback"))), "")
        rows.append({"method": method, "rc": rc, "wall_s": round(secs), "peak_pss_gib": round(pss, 2),
                     "peak_rss_gib": round(rss, 2), **diag, "error": error[:160]})
        print(f"[realarch] {method}: rc {rc}, {secs:.0f} s, peak PSS {pss:.2f} GiB", flush=True)
    header = ["method", "rc", "wall_s", "peak_pss_gib", "peak_rss_gib", "teacher_acc", "diversity", "latent_std", "error"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(r.get(h, "")) for h in header) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(table) + "\n")
    (out / "table.json").write_text(json.dumps({"arch": args.arch, "preset": args.preset, "classes": classes,
                                                "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))
    print("\n".join(table))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
