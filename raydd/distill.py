"""python -m raydd.distill --method <name> [--preset digits] [--smoke] [key=value ...]

One distillation end to end:
  config -> checks (method, MLflow, data) -> Ray -> backbone (tiny: trained once, cached)
  -> method.run (sharded sampling on Ray Data, jobs on Ray Train) -> write parquet + ImageFolder
  -> evaluate students x seeds (Ray Train) -> one MLflow run with params, metrics, image grid, output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from raydd.config import Config, ConfigError, list_presets, load_config, make_method_config, run_params, run_tags
from raydd.data import RealData
from raydd.errors import RayddError
from raydd.context import log  # (the CLIs' "[raydd]" lines; evaluate and sweep import it from here)
from raydd.generate import BackboneSpec
from raydd.prepare import load_data


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------
def check_method(cfg: Config):
    """The method and its own settings, validated before anything heavy."""
    from raydd.methods import get_method, list_methods

    try:
        method = get_method(cfg.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    unknown = [m for m in cfg.methods if m not in list_methods()]
    if unknown:
        raise ConfigError(f"settings given for unknown method(s) {unknown}; methods: {', '.join(list_methods())}")
    mcfg = make_method_config(method.Config, cfg.methods.get(cfg.method, {}), cfg.method)
    if method.check is not None:                                   # allowed values and ranges
        method.check(mcfg, cfg)
    return method, mcfg


def check_backbone(cfg: Config) -> None:
    """A user's backbone (hub id, dir, weight file) must be there before Ray starts actors that load it."""
    from raydd.backbone import check_sources

    check_sources(cfg.backbone)


def ensure_backbone(cfg: Config, data: RealData, runner) -> BackboneSpec:
    """The frozen backbone's spec. 'tiny' (the DiT, and the VAE of digits-latent): trained with Ray Train on
    first use, cached by config hash; the VAE first, since the DiT learns its latents."""
    from raydd.context import train_cached
    from raydd.finetune import tiny_backbone_config, train_tiny_backbone
    from raydd.jobs import real_datasets

    b = cfg.backbone
    if b.vae == "tiny":
        from raydd.autoencoder import tiny_vae_config, train_tiny_vae

        path = train_cached(runner, cfg.resolved_cache_dir(), "vaes", train_tiny_vae, tiny_vae_config(b, cfg.data),
                            cpus_per_worker=runner.max_cpus_per_worker(), log=log, datasets=lambda: real_datasets(cfg, "train"))
        scale = json.loads((path / "vae" / "config.json").read_text())["scaling_factor"]
        b = dataclasses.replace(b, vae=str(path / "vae"), vae_scale=float(scale))
    class_ids = data.backbone_class_ids()                  # a pretrained DiT: ImageNet's 1000 classes
    if b.source == "tiny":
        path = train_cached(runner, cfg.resolved_cache_dir(), "backbones", train_tiny_backbone,
                            tiny_backbone_config(b, cfg.sampler, cfg.data, seed=0), log=log,
                            cpus_per_worker=runner.max_cpus_per_worker(),       # one job: all of a node
                            datasets=lambda: real_datasets(cfg, "train"))
        b = dataclasses.replace(b, source=str(path / "transformer"))
        class_ids = data.backbone_class_ids(data.num_classes)  # trained on these classes: the labels themselves
    return BackboneSpec(b, num_classes=data.num_classes, channels=cfg.data.channels,
                        image_size=cfg.data.image_size, class_ids=class_ids)


def prepare_method(cfg: Config, data: RealData, runner) -> None:
    """Train the method's cached jobs that do not depend on a sweep's searched values (its `prepare`)."""
    from raydd.context import Context

    method, mcfg = check_method(cfg)
    if method.prepare is not None:
        method.prepare(Context(cfg=cfg, data=data, backbone=lambda: ensure_backbone(cfg, data, runner),
                               runner=runner), mcfg)


def produce(cfg: Config, data: RealData, runner, tracker, scratch: Path) -> tuple[str, int, dict]:
    """method.run -> the distilled set written to cfg.output_dir() (parquet + ImageFolder) and its
    grid logged. Returns (output dir, number of images, timings)."""
    from raydd.context import Context
    from raydd.outputs import grid_rows, image_grid, write_distilled

    method, mcfg = check_method(cfg)
    timer = {"backbone": 0.0}

    def backbone() -> BackboneSpec:
        t = time.time()
        spec = ensure_backbone(cfg, data, runner)
        timer["backbone"] = time.time() - t
        return spec

    ctx = Context(cfg=cfg, data=data, backbone=backbone, runner=runner, tracker=tracker, scratch=scratch)
    log(f"distilling with {cfg.method} ({cfg.compute.num_actors} sampling actor(s)) ...")
    t0 = time.time()
    distilled = method.run(ctx, mcfg)
    t_distill = time.time() - t0 - timer["backbone"]
    if len(distilled) != cfg.ipc * data.num_classes:
        raise RuntimeError(f"{cfg.method} returned {len(distilled)} images, expected {cfg.ipc} x {data.num_classes}")
    out_dir = cfg.output_dir()
    write_distilled(distilled, out_dir, data.class_names,
                    extra={"method": cfg.method, "ipc": cfg.ipc, "seed": cfg.seed, "preset": cfg.preset})
    log(f"wrote {len(distilled)} images to {out_dir} in {t_distill:.1f}s")
    shown = distilled.take(grid_rows(distilled.labels))                 # only the grid's images are read
    tracker.log_images("distilled_grid", image_grid(shown.images, shown.labels, names=data.class_names))
    diagnostics = set_diagnostics(cfg, data, runner, distilled)
    log("set diagnostics: " + "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in diagnostics.items()))
    return out_dir, len(distilled), {"time_backbone_s": timer["backbone"], "time_distill_s": t_distill,
                                     "images_per_s": len(distilled) / max(t_distill, 1e-9)} | diagnostics


def set_diagnostics(cfg: Config, data: RealData, runner, distilled) -> dict:
    """distilled/teacher_acc, distilled/diversity, distilled/latent_std (raydd.diagnostics): the real-data
    teacher scores the set on the actor pool (a class is a unit), which reads a StagedSet's images itself."""
    from raydd.diagnostics import TeacherScores, summarise
    from raydd.jobs import teacher_encoder

    labels = distilled.labels.numpy()
    scores = runner.map(TeacherScores, {"encoder": teacher_encoder(cfg, data, runner),
                                        "gpus": cfg.compute.gpus_per_actor},
                        {"class_idx": labels, "unit": labels, **distilled.image_columns()})
    return summarise(scores, distilled.latent_std())


def summary_metrics(summary: dict) -> dict:
    """Flatten evaluate_set's summary into MLflow metrics: acc_mean/<student>, HLR/<student>, ..., and `acc`:
    the mean over students, the one accuracy name every kind of raydd run has (its split is the run's tag)."""
    students = summary["students"].values()
    metrics = {"acc": sum(r["acc_mean"] for r in students) / len(students)}
    for s, r in summary["students"].items():
        metrics |= {f"acc_mean/{s}": r["acc_mean"], f"acc_std/{s}": r["acc_std"], f"acc_final/{s}": r["final_mean"],
                    f"student_images_per_s/{s}": r["images_per_s"]}
        metrics |= {f"{k}/{s}": v for k, v in summary["ranking"].get(s, {}).items()}
    return metrics


def log_curves(tracker, summary: dict) -> None:
    """Each student's test accuracy over its epochs, as step metrics curve/<student>/<protocol>/seed<k> (step =
    epoch), so a run's charts show learning curves."""
    for job in summary["jobs"]:
        if job["kind"] == "syn" and job.get("curve"):
            tracker.log_curve(f"curve/{job['student']}/{job['protocol']}/seed{job['seed']}", job["curve"])


def distill(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Run one distillation; returns the summary that is also logged to MLflow."""
    from raydd.distributed.cluster import cluster_cpus, init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.jobs import evaluate_set, set_source
    from raydd.tracking import Tracker, check_reachable, find_run

    t_start = time.time()
    _, mcfg = check_method(cfg)
    check_reachable(cfg.tracking)                                  # fail in seconds, not after sampling
    data = load_data(cfg)                    # unknown classes / corrupt images fail here (a store: prepared)
    check_backbone(cfg)                                            # missing weights fail here
    log(f"{cfg.method} on {cfg.preset}: {data.num_classes} classes, {data.describe()}, IPC {cfg.ipc}")
    scratch = cfg.scratch_dir()
    scratch.mkdir(parents=True, exist_ok=True)

    init_ray(cfg.compute)                                          # resources no node has fail here
    run_name = cfg.resolved_run_name()
    tracker = Tracker(cfg.tracking, run_name, run_id=find_run(cfg.tracking, run_name), parent_run_id=parent_run_id,
                      tags={"raydd_run": run_name, "kind": "distill", "split": cfg.eval.split} | run_tags(cfg))
    try:
        tracker.log_params(run_params(cfg, mcfg))
        runner = RayRunner(cfg, scratch)
        out_dir, n_images, metrics = produce(cfg, data, runner, tracker, scratch)

        log(f"evaluating: {cfg.eval.students} x {cfg.eval.seeds} seed(s), {cfg.eval.protocol}-label protocol "
            f"on the {cfg.eval.split} split ...")
        t0 = time.time()
        max_workers = int(cluster_cpus() // max(cfg.compute.cpus_per_worker, 1e-9))
        summary = evaluate_set(cfg, set_source(out_dir), runner, max_workers=max_workers)
        metrics |= {"time_eval_s": time.time() - t0, "time_total_s": time.time() - t_start,
                    "driver_peak_rss_mb": peak_rss_mb()} | summary_metrics(summary)
        tracker.log_metrics(metrics)
        log_curves(tracker, summary)
        tracker.set_tags({"output_dir": out_dir})
        tracker.log_dict({"output_dir": out_dir, "summary": summary, "metrics": metrics}, "result.json")
        tracker.end("FINISHED")
    except BaseException as e:
        tracker.end_after(e)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    result = {"run_id": tracker.run_id, "output_dir": out_dir, "summary": summary, "metrics": metrics}
    report(cfg, result)
    return result


def report(cfg: Config, result: dict) -> None:
    log(f"done: output {result['output_dir']}  (MLflow run {result['run_id']})")
    for s, r in result["summary"]["students"].items():
        rk = result["summary"]["ranking"].get(s, {})
        extra = "  ".join(f"{k}={v:.3f}" for k, v in rk.items())
        log(f"  {s:16s} {r['protocol']}-label acc {100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} "
            f"({len(r['accs'])} seeds)  {extra}")
    m = result["metrics"]
    log(f"  time {m['time_total_s']:.0f}s (backbone {m['time_backbone_s']:.0f}s, distill {m['time_distill_s']:.0f}s, "
        f"eval {m['time_eval_s']:.0f}s), {m['images_per_s']:.1f} images/s, driver peak RSS {m['driver_peak_rss_mb']:.0f} MB")


# --------------------------------------------------------------------------------------------
def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from raydd.methods import list_methods

    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: key=value of the typed config, e.g. ipc=1 eval.seeds=5 "
                                       "sampler.cfg_scale=2.0 compute.num_actors=2 data.root=/data/imagenet; "
                                       "a method's own fields as <method>.<field>=value.\n"
                                       f"methods: {', '.join(list_methods())}\npresets: {', '.join(list_presets())}")
    p.add_argument("--preset", default="digits", help="preset YAML (default: digits, built in)")
    p.add_argument("--smoke", action="store_true", help="the same code path shrunk to finish in about a minute")
    return p


def run_cli(body) -> int:
    """Run a CLI's body: a bad input (a RayddError, or a path that does not exist) ends with one clear line and
    exit code 2; anything else is a bug and keeps its traceback (exit 1). Ray is shut down either way."""
    try:
        body()
    except (RayddError, FileNotFoundError) as e:
        print(f"raydd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"raydd: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        from raydd.distributed.cluster import shutdown

        shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    from raydd.methods import list_methods

    p = build_parser("python -m raydd.distill", __doc__.split("\n\n")[1])
    p.add_argument("--method", required=True, help=f"one of: {', '.join(list_methods())}")
    p.add_argument("--parent-run-id", default="", help="log the run as a child of this MLflow run (raydd.compare)")
    p.add_argument("--result-json", default="", help="also write run_id, output_dir and metrics to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.preset, args.overrides, smoke=args.smoke, method=args.method)
        check_method(cfg)
        result = distill(cfg, parent_run_id=args.parent_run_id or None)
        if args.result_json:
            tmp = Path(args.result_json).with_suffix(".tmp")
            tmp.write_text(json.dumps({k: result[k] for k in ("run_id", "output_dir", "metrics")}, default=str))
            tmp.replace(args.result_json)
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
