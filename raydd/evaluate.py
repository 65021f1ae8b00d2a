"""python -m raydd.evaluate <imagefolder> [--preset digits] [--smoke] [--redundancy K] [key=value ...]

Evaluate any distilled ImageFolder (<dir>/<class>/*.png, ours or another repo's) against a preset's
real data with the same protocols as `raydd.distill`: students x seeds, DD-Ranking references, one
MLflow run. Class folders are the preset's class names (wnids, or 0..9 for digits) or indices. A set on a
storage URI (s3://, gs://, file://) is read as raydd's output there (its parquet and manifest.json).
With --redundancy K: LGD's redundancy diagnostic instead (K x K cross-increment accuracy, raydd.redundancy).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from raydd.config import load_config, run_params
from raydd.data import DataError, store_manifest
from raydd.prepare import load_data
from raydd.distill import build_parser, log, log_curves, run_cli, summary_metrics


def evaluate_folder(folder: str, cfg) -> dict:
    from raydd.distributed.cluster import cluster_cpus, init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.jobs import evaluate_set, set_source
    from raydd.outputs import image_grid, read_distilled
    from raydd.tracking import Tracker, check_reachable

    uri = "://" in folder
    check_reachable(cfg.tracking)
    data = load_data(cfg)
    with as_output(folder, cfg, data.class_names) as out:
        counts = output_counts(out, data.class_names)
        cfg.ipc = max(counts)
        log(f"evaluating {folder}: {sum(counts)} images, IPC {cfg.ipc} (per class {min(counts)}..{max(counts)})")
        shown = read_distilled(out, classes=list(range(20)), per_class=10)   # the grid's images, no more
        init_ray(cfg.compute)
        tracker = Tracker(cfg.tracking, f"eval-{posixpath.basename(folder.rstrip('/'))}",
                          tags={"raydd_eval": str(folder), "kind": "evaluate", "split": cfg.eval.split,
                                "preset": cfg.preset, "ipc": str(cfg.ipc), "smoke": str(cfg.smoke).lower()})
        try:
            tracker.log_params(run_params(cfg) | {"folder": folder if uri else str(Path(folder).resolve())})
            tracker.log_images("distilled_grid", image_grid(shown.images, shown.labels, names=data.class_names))
            t0 = time.time()
            runner = RayRunner(cfg, None)   # no scratch dir: nothing is written next to the user's folder
            max_workers = int(cluster_cpus() // max(cfg.compute.cpus_per_worker, 1e-9))
            summary = evaluate_set(cfg, set_source(out), runner, max_workers)   # (large: streamed to them)
            metrics = {"time_eval_s": time.time() - t0} | summary_metrics(summary)
            tracker.log_metrics(metrics)
            log_curves(tracker, summary)
            tracker.log_dict({"folder": str(folder), "summary": summary}, "result.json")
            tracker.end("FINISHED")
        except BaseException as e:
            tracker.end_after(e)
            raise
    for s, r in summary["students"].items():
        log(f"  {s:16s} {r['protocol']}-label acc {100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} "
            f"({len(r['accs'])} seeds)  " + "  ".join(f"{k}={v:.3f}" for k, v in summary["ranking"].get(s, {}).items()))
    return {"run_id": tracker.run_id, "summary": summary, "metrics": metrics}


@contextlib.contextmanager
def as_output(folder: str, cfg, class_names: list[str]) -> Iterator[str]:
    """Our output for the set a user names: a URI or a local dir with our manifest.json is our output itself; any
    other dir is an ImageFolder, read a class at a time into our output format (parquet, no PNGs) under the cache's
    work dir for the `with` block, so no process holds more than a class of it (or more than a set that travels
    inline; a larger one streams to the workers from there). Unreadable files fail here, before Ray starts."""
    from raydd.outputs import FolderSet, write_distilled

    if "://" in folder or Path(folder, "manifest.json").exists():
        yield folder
        return
    scratch = str(cfg.resolved_cache_dir() / "work" / f"eval-{uuid.uuid4().hex[:12]}")
    try:
        write_distilled(FolderSet(folder, class_names, cfg.data.image_size, cfg.data.channels), scratch, class_names,
                        pngs=False)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def output_counts(uri: str, class_names: list[str]) -> list[int]:
    """The images per class of raydd's output on a storage URI, from its manifest, whose classes must be the
    preset's (its parquet's labels are positions in that list)."""
    try:
        manifest = store_manifest(uri)
    except (FileNotFoundError, OSError):
        raise DataError(f"distilled set {uri}: no manifest.json there; a set on a URI is read as raydd's output "
                        f"(parquet + manifest.json), an ImageFolder from a local directory") from None
    if (classes := manifest["classes"]) != class_names:
        raise DataError(f"distilled set {uri} has classes {classes[:5]}..., not the preset's {class_names[:5]}...")
    return manifest["counts"]


def evaluate_redundancy(folder: str, cfg, k: int) -> dict:
    """The redundancy diagnostic (raydd.redundancy) on a distilled set: per student, the K x K
    cross-increment accuracy matrix (mean over eval.seeds) and its off-diagonal mean, logged to MLflow
    as metrics and a heatmap figure. The set goes to the workers as to the students (raydd.jobs.set_source:
    inline when small, else streamed); the driver reads its labels and slots."""
    from raydd.distributed.cluster import cluster_cpus, init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.jobs import set_source, streamed_set
    from raydd.outputs import written_set
    from raydd.redundancy import (matrices_from_results, off_diagonal_mean, redundancy_figure, redundancy_loop,
                                  report_lines, split_increments)
    from raydd.tracking import Tracker, check_reachable

    check_reachable(cfg.tracking)
    data = load_data(cfg)
    with as_output(folder, cfg, data.class_names) as out:
        rows = written_set(out).sorted()                               # labels and slots, in (class, slot) order
        parts = split_increments(rows.labels, rows.slots, k)           # too few images per class fails here
        log(f"redundancy of {folder}: {len(rows)} images, K={k} increments, "
            f"{cfg.eval.students} x {cfg.eval.seeds} seed(s)")
        root = Path(folder.rstrip("/"))
        name = root.parent.name if root.name == "images" else root.name    # our <out>/images -> <out>'s name
        init_ray(cfg.compute)
        tracker = Tracker(cfg.tracking, f"redundancy-{name}", tags={"raydd_redundancy": str(folder), "preset": cfg.preset})
        try:
            tracker.log_params(run_params(cfg) | {"folder": folder if "://" in folder else str(root.resolve()),
                                                  "redundancy_k": k})
            jobs = [{"student": s, "a": a, "seed": r}                 # train on increment a, seed r
                    for s in cfg.eval.students for a in range(k) for r in range(cfg.eval.seeds)]
            source, datasets = streamed_set(set_source(out))
            config = {"source": source, "parts": [p.tolist() for p in parts], "num_classes": data.num_classes,
                      "data": dataclasses.asdict(cfg.data), "eval": dataclasses.asdict(cfg.eval), "jobs": jobs}
            p, most = cfg.compute.parallel_jobs, int(cluster_cpus() // max(cfg.compute.cpus_per_worker, 1e-9))
            workers = max(1, min(len(jobs), most if p <= 0 else p))
            if datasets and p <= 0:                                    # as evaluate_set: leave the stream a CPU
                workers = max(1, min(workers, most - 1))
            result = RayRunner(cfg, None).train(redundancy_loop, config, name=f"redundancy-{name}",
                                                num_workers=workers, datasets=datasets)
            results = json.loads(Path(result.checkpoint_dir, "results.json").read_text())
            matrices = matrices_from_results(results, k)
            metrics = {}
            for s, r in matrices.items():
                metrics[f"redundancy/{s}"] = off_diagonal_mean(r)
                metrics |= {f"redundancy_{a}_{b}/{s}": float(r[a, b]) for a in range(k) for b in range(k)}
                tracker.log_figure(redundancy_figure(r, f"{name} ({s})"), f"redundancy_{s}.png")
            tracker.log_metrics(metrics)
            tracker.log_dict({"folder": str(folder), "k": k, "matrices": {s: r.tolist() for s, r in matrices.items()},
                              "jobs": results}, "redundancy.json")
            tracker.end("FINISHED")
        except BaseException as e:
            tracker.end_after(e)
            raise
    for s, r in matrices.items():
        report_lines(r, s, log)
    return {"run_id": tracker.run_id, "matrices": matrices, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    p = build_parser("python -m raydd.evaluate", __doc__.split("\n\n")[1])
    p.add_argument("folder", help="distilled ImageFolder: <folder>/<class>/*.png")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--redundancy", type=int, default=0, metavar="K",
                   help="instead of the accuracy protocol: the LGD redundancy diagnostic with K increments "
                        "(folder may also be our output dir; see raydd.redundancy)")
    args = p.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.preset, args.overrides, smoke=args.smoke, method="evaluate")
        if "://" not in args.folder and not Path(args.folder).is_dir():     # before MLflow, the data and Ray
            raise DataError(f"distilled set {args.folder} is not a directory")
        if args.redundancy:
            evaluate_redundancy(args.folder, cfg, args.redundancy)
        else:
            evaluate_folder(args.folder, cfg)
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
