"""python -m raydd.evaluate <imagefolder> [--preset digits] [--smoke] [key=value ...]

Evaluate any distilled ImageFolder (<dir>/<class>/*.png, ours or another repo's) against a preset's
real data with the same protocols as `raydd.distill`: students x seeds, DD-Ranking references, one
MLflow run. Class folders are the preset's class names (wnids, or 0..9 for digits) or indices.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from raydd.config import ConfigError, flatten, load_config
from raydd.data import DataError, load_distilled_folder, load_real
from raydd.distill import build_parser, log


def evaluate_folder(folder: str, cfg) -> dict:
    from raydd.distributed.cluster import cluster_cpus, init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.eval_jobs import evaluate_set
    from raydd.outputs import image_grid
    from raydd.tracking import Tracker, check_reachable

    check_reachable(cfg.tracking)
    data = load_real(cfg.data)
    syn = load_distilled_folder(folder, data.class_names, cfg.data.image_size, cfg.data.channels)  # bad files fail here
    counts = [int((syn.y == c).sum()) for c in range(data.num_classes)]
    cfg.ipc = max(counts)
    log(f"evaluating {folder}: {len(syn.y)} images, IPC {cfg.ipc} (per class {min(counts)}..{max(counts)})")
    tracker = Tracker(cfg.tracking, f"eval-{Path(folder).name}", tags={"raydd_eval": str(folder), "preset": cfg.preset})
    try:
        tracker.log_params(flatten(dataclasses.asdict(cfg)) | {"folder": str(Path(folder).resolve())})
        tracker.log_images("distilled_grid", image_grid(syn.x, syn.y))
        init_ray(cfg.compute)
        t0 = time.time()
        runner = RayRunner(cfg, Path(folder))
        max_workers = int(cluster_cpus() // max(cfg.compute.cpus_per_worker, 1e-9))
        summary = evaluate_set(cfg, {"kind": "folder", "path": str(Path(folder).resolve())}, runner, max_workers)
        metrics = {"time_eval_s": time.time() - t0}
        for s, r in summary["students"].items():
            metrics |= {f"acc_mean/{s}": r["acc_mean"], f"acc_std/{s}": r["acc_std"]}
            metrics |= {f"{k}/{s}": v for k, v in summary["ranking"].get(s, {}).items()}
        tracker.log_metrics(metrics)
        tracker.log_dict({"folder": str(folder), "summary": summary}, "result.json")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    for s, r in summary["students"].items():
        log(f"  {s:16s} {r['protocol']}-label acc {100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} "
            f"({len(r['accs'])} seeds)  " + "  ".join(f"{k}={v:.3f}" for k, v in summary["ranking"].get(s, {}).items()))
    return {"run_id": tracker.run_id, "summary": summary, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    p = build_parser("python -m raydd.evaluate", __doc__.split("\n\n")[1])
    p.add_argument("folder", help="distilled ImageFolder: <folder>/<class>/*.png")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides, smoke=args.smoke, method="evaluate")
        evaluate_folder(args.folder, cfg)
    except (ConfigError, DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"raydd: error: {e}", file=sys.stderr)
        return 2
    finally:
        from raydd.distributed.cluster import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
