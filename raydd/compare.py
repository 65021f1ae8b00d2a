"""python -m raydd.compare [--methods dit,random,...] [--ipc 1,10] [--seeds 3] [--preset P] [--smoke]
                         [--from-sweep NAME] [--name NAME] [--parallel N] [key=value ...]

Compare methods under one protocol: one distillation per (method, IPC, distillation seed), every one
evaluated by the same students, and reused when the same resolved config was run before (a re-run only
fills in what is missing). Reports, per (IPC, student):
  * accuracy mean ± std over distillation seeds (each seed's value is the mean of its eval.seeds students:
    the spread of students over one set is not a seed spread). `acc` is each student's best of its ~20 test
    evaluations, the reference repos' number; `final acc`, its last one, is selected on nothing;
  * the paired difference to `dit` and to `random` (same distillation seeds), mean with a 95 % t-interval;
  * DD-Ranking's HLR / IOR / LRS, the set diagnostics, wall time and images/s (of what the run did: sampling
    stages shared with earlier runs by content are not redone; compute.share_stages=false to time methods);
printed and written to compare/<name>/leaderboard.{csv,md}, with accuracy_vs_ipc.png and grid.png (a few
images per class of every method next to real images), all logged to one MLflow parent run whose
children are the distillations. Defaults: every method, the preset's IPC, 3 seeds. --from-sweep NAME
starts each method from the best parameters of its sweep (the sweep named NAME or NAME-<method>).
The distillations run as `python -m raydd.distill` processes joined to this Ray cluster, --parallel at once
(default: as many as the cluster's GPUs, or CPUs, hold one distillation's sampling actors).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
import sys
from pathlib import Path

from raydd.config import ConfigError, config_hash, load_config
from raydd.distill import build_parser, check_method, log, run_cli

COLUMNS = ["acc", "acc_final", "HLR", "IOR", "LRS", "distilled/teacher_acc", "distilled/diversity", "distilled/latent_std",
           "time_total_s", "images_per_s"]


def parse_list(text: str, what: str, allowed: list[str] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or len(set(items)) != len(items):
        raise ConfigError(f"--{what} {text!r}: give a comma list without repeats")
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise ConfigError(f"--{what}: unknown {bad}; allowed: {', '.join(allowed)}")
    return items


def parse_ipcs(text: str) -> list[int]:
    items = parse_list(text, "ipc")
    if not all(x.isdigit() and int(x) >= 1 for x in items):
        raise ConfigError(f"--ipc {text!r}: IPCs are integers >= 1, e.g. --ipc 1,10")
    return [int(x) for x in items]


def run_key(cfg) -> str:
    """What a distillation's result depends on: the config without where it is written or logged."""
    method_cfg = check_method(cfg)[1]
    plain = dataclasses.replace(cfg, tracking=None, out_dir="", run_name="", cache_dir="")
    return config_hash(plain, dataclasses.asdict(method_cfg))


# --------------------------------------------------------------------------------------------
# Statistics over distillation seeds
# --------------------------------------------------------------------------------------------
def t_interval(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval); the half-width is NaN for fewer than 2 values."""
    from scipy.stats import t

    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, float(t.ppf(0.975, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))


def leaderboard(records: list[dict]) -> list[dict]:
    """records: one per (method, ipc, seed, student) with the COLUMNS -> one row per (ipc, student, method):
    n, mean and std (over distillation seeds) of each column, and the paired difference of acc to dit and
    to random over the seeds both have (d_s = acc_method,s - acc_ref,s; mean ± 95 % half-width)."""
    rows = []
    groups = sorted({(r["ipc"], r["student"], r["method"]) for r in records})
    for ipc, student, method in groups:
        mine = {r["seed"]: r for r in records if (r["ipc"], r["student"], r["method"]) == (ipc, student, method)}
        row = {"ipc": ipc, "student": student, "method": method, "n": len(mine)}
        for c in COLUMNS:
            xs = [r[c] for r in mine.values() if r.get(c) is not None and math.isfinite(r[c])]
            row[c] = statistics.mean(xs) if xs else math.nan
            row[f"{c}_std"] = statistics.stdev(xs) if len(xs) > 1 else math.nan
        for ref in ("dit", "random"):
            other = {r["seed"]: r["acc"] for r in records if (r["ipc"], r["student"], r["method"]) == (ipc, student, ref)}
            d = [mine[s]["acc"] - other[s] for s in sorted(mine) if s in other]
            row[f"vs_{ref}"], row[f"vs_{ref}_ci95"] = t_interval(d) if d and method != ref else (math.nan, math.nan)
        rows.append(row)
    return rows


def fmt(v: float, pct: bool = False) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}" if pct else f"{v:.3g}"


def markdown(rows: list[dict]) -> str:
    head = ["IPC", "student", "method", "n", "acc % (± std)", "vs dit (95 % CI)", "vs random (95 % CI)",
            "final acc %", "HLR", "IOR", "LRS", "teacher_acc", "diversity", "latent_std", "time s", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["ipc"], r["student"], -r["acc"] if math.isfinite(r["acc"]) else 0)):
        diff = [f"{fmt(r[f'vs_{k}'], True)} ± {fmt(r[f'vs_{k}_ci95'], True)}" if math.isfinite(r[f"vs_{k}"]) else "–"
                for k in ("dit", "random")]
        cells = [r["ipc"], r["student"], r["method"], r["n"], f"{fmt(r['acc'], True)} ± {fmt(r['acc_std'], True)}",
                 *diff, fmt(r["acc_final"], True), *(fmt(r[c]) for c in COLUMNS[2:])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def accuracy_vs_ipc(rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = sorted({r["student"] for r in rows})
    fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 4), squeeze=False)
    for ax, s in zip(axes[0], students):
        for m in sorted({r["method"] for r in rows}):
            pts = sorted((r["ipc"], r["acc"], r["acc_std"]) for r in rows if r["student"] == s and r["method"] == m)
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts],
                        yerr=[100 * p[2] if math.isfinite(p[2]) else 0 for p in pts], marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="images per class (IPC)", ylabel="test accuracy (%)", title=s)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def grid_figure(sets: dict, real, class_names: list[str], per_class: int = 4):
    """sets: method -> DistilledSet; real: (images uint8 [N,C,H,W], labels [N]). A row per class (at most
    10), a block of `per_class` images per method, real images first; titles and class names as labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from raydd.outputs import image_grid

    blocks = {"real": real} | {m: (s.images, s.labels) for m, s in sets.items()}
    classes = sorted(set(real[1].tolist()))[:10]
    fig, axes = plt.subplots(1, len(blocks), figsize=(1.1 * per_class * len(blocks) + 1, 0.9 * len(classes) + 1),
                             squeeze=False)
    for ax, (name, (images, labels)) in zip(axes[0], blocks.items()):
        keep = np.isin(labels.numpy(), classes)
        gap = 2
        ax.imshow(image_grid(images[keep], labels[keep], per_class=per_class, scale=1, gap=gap),
                  interpolation="nearest")
        h = images.shape[-2]
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([gap + k * (h + gap) + h / 2 for k in range(len(classes))],   # the middle of each row
                      [class_names[c] for c in classes] if name == "real" else [], fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------
def sweep_params(cfg, name: str, methods: list[str]) -> dict[str, list[str]]:
    """method -> the best parameters of its sweep named NAME or NAME-<method>, as key=value overrides
    ([] = none found: the method keeps its defaults, and says so)."""
    from raydd.tracking import best_params_of_sweep, check_reachable

    check_reachable(cfg.tracking)
    found = {m: best_params_of_sweep(cfg.tracking, [name, f"{name}-{m}"], m) for m in methods}
    if not any(found.values()):
        raise ConfigError(f"--from-sweep {name}: no finished sweep named {name!r} or {name!r}-<method> for any of "
                          f"{', '.join(methods)} in the MLflow experiment {cfg.tracking.experiment!r}")
    for m, p in found.items():
        log(f"{m}: " + (f"best parameters of its sweep: {p}" if p else f"no sweep {name!r}: its defaults"))
    return {m: [f"{k}={v}" for k, v in (p or {}).items()] for m, p in found.items()}


def plan(args) -> list:
    """Every (method, IPC, seed) config, resolved and validated before Ray or MLflow start."""
    from raydd.methods import list_methods

    methods = parse_list(args.methods, "methods", list_methods()) if args.methods else list_methods()
    base = load_config(args.preset, args.overrides, smoke=args.smoke)
    ipcs = parse_ipcs(args.ipc) if args.ipc else [base.ipc]
    if args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds} must be >= 1 (3 or more for an interval)")
    if args.parallel < 0:        # (a negative count never started a distillation and waited forever)
        raise ConfigError(f"--parallel={args.parallel} must be >= 0 (0 = as many as the cluster holds)")
    out = Path(args.out or f"compare/{args.name or default_name(args)}")
    tuned_by_method = sweep_params(base, args.from_sweep, methods) if args.from_sweep else {}
    cfgs = []
    for m in methods:
        tuned = tuned_by_method.get(m, [])
        for ipc in ipcs:
            for seed in range(args.seeds):
                overrides = tuned + args.overrides + [f"ipc={ipc}", f"seed={seed}"]
                cfg = load_config(args.preset, overrides, smoke=args.smoke, method=m)
                check_method(cfg)
                key = run_key(cfg)
                cfg.out_dir, cfg.run_name = str(out.resolve() / "sets"), f"{cfg.resolved_run_name()}-{key[:8]}"
                cfgs.append((cfg, key, bool(tuned), overrides + [f"out_dir={cfg.out_dir}", f"run_name={cfg.run_name}"]))
    return cfgs


def default_parallel(cfg) -> int:
    """Distillations the running Ray cluster holds at once: its GPUs (or CPUs) over one distillation's
    sampling actors' (its Train jobs queue for what is free), and no more than this machine's CPUs, where
    their driver processes run."""
    import os

    from raydd.distributed.cluster import cluster_resources

    c, res = cfg.compute, cluster_resources()
    if c.gpus_per_actor > 0:
        fits = int(res.get("GPU", 0) // (c.num_actors * c.gpus_per_actor))
    else:
        fits = int(res.get("CPU", 0) // (c.num_actors * max(c.cpus_per_actor, 1e-9)))
    return max(1, min(fits, os.cpu_count() or 1))


def run_distillations(todo: list, args, parent_run_id: str, out: Path, parallel: int) -> None:
    """Each (cfg, key, tuned, overrides) as `python -m raydd.distill` joined to this Ray cluster, `parallel` at once
    (separate processes: no state of one distillation can reach another). A finished one's record is saved
    atomically to runs/<key>.json at once, so an interrupted comparison keeps it. Logs: logs/<run name>.log
    (the console when one at a time)."""
    import subprocess
    import time

    from raydd.distributed.cluster import cluster_address
    from raydd.errors import RayddError

    (out / "logs").mkdir(exist_ok=True)
    address = cluster_address()
    waiting, running, failed = list(enumerate(todo, start=1)), {}, []
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                k, (cfg, key, tuned, overrides) = waiting.pop(0)
                result = out / "runs" / f"{key}.result.json"
                cmd = [sys.executable, "-m", "raydd.distill", "--method", cfg.method, "--preset", args.preset,
                       *(["--smoke"] if args.smoke else []), "--parent-run-id", parent_run_id,
                       "--result-json", str(result), *overrides, f"compute.ray_address={address}"]
                logf = out / "logs" / f"{cfg.run_name}.log"
                sink = None if parallel == 1 else open(logf, "w")
                log(f"[{k}/{len(todo)}] {cfg.method} IPC {cfg.ipc} seed {cfg.seed} started"
                    + (f" (log: {logf})" if sink else ""))
                proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT if sink else None)
                running[proc] = (k, cfg, key, tuned, result, sink, logf)
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                k, cfg, key, tuned, result, sink, logf = running.pop(proc)
                if sink:
                    sink.close()
                if proc.returncode != 0 or not result.exists():
                    failed.append(f"{cfg.method} IPC {cfg.ipc} seed {cfg.seed} (exit {proc.returncode}; {logf})")
                    continue
                r = json.loads(result.read_text())
                rec = {"method": cfg.method, "ipc": cfg.ipc, "seed": cfg.seed, "key": key, "tuned": tuned,
                       "run_id": r["run_id"], "output_dir": r["output_dir"], "metrics": r["metrics"]}
                tmp = out / "runs" / f"{key}.tmp"
                tmp.write_text(json.dumps(rec, indent=1))
                tmp.replace(out / "runs" / f"{key}.json")                # a record that exists is complete
                result.unlink()
                log(f"[{k}/{len(todo)}] {cfg.method} IPC {cfg.ipc} seed {cfg.seed} done")
    finally:
        for proc in running:                                          # interrupted: stop the others too
            proc.terminate()
    if failed:
        raise RayddError(f"{len(failed)} distillation(s) failed (the finished ones are kept; a rerun fills in the "
                         f"rest): " + "; ".join(failed))


def default_name(args) -> str:
    return f"{args.preset}{'-smoke' if args.smoke else ''}"


def compare(args) -> dict:
    from raydd.distributed.cluster import init_ray
    from raydd.tracking import Tracker, check_reachable, find_run

    cfgs = plan(args)
    first = cfgs[0][0]
    check_reachable(first.tracking)
    out = Path(cfgs[0][0].out_dir).parent
    name = args.name or out.name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(c.method for c, _, _, _ in cfgs))
    ipcs = sorted({c.ipc for c, _, _, _ in cfgs})
    parent = Tracker(first.tracking, name, run_id=find_run(first.tracking, name),
                     tags={"raydd_run": name, "raydd_compare": ",".join(methods), "preset": first.preset,
                           "ipc": ",".join(map(str, ipcs)), "seeds": args.seeds, "smoke": first.smoke})
    try:
        parent.log_params({"methods": ",".join(methods), "ipcs": ",".join(map(str, ipcs)), "seeds": args.seeds,
                           "preset": first.preset, "smoke": first.smoke, "overrides": " ".join(args.overrides),
                           "from_sweep": args.from_sweep or "", "students": ",".join(first.eval.students)})
        saved = {key: out / "runs" / f"{key}.json" for _, key, _, _ in cfgs}
        todo = [c for c in cfgs if not saved[c[1]].exists()]
        log(f"{len(cfgs) - len(todo)} of {len(cfgs)} distillations reused from {out / 'runs'}")
        if todo:
            init_ray(first.compute)
            parallel = args.parallel or default_parallel(first)
            log(f"running {len(todo)} distillation(s), {min(parallel, len(todo))} at once")
            run_distillations(todo, args, parent.run_id, out, parallel)
        results = [json.loads(saved[key].read_text()) for _, key, _, _ in cfgs]
        records = [{"method": r["method"], "ipc": r["ipc"], "seed": r["seed"], "student": s,
                    "acc": r["metrics"][f"acc_mean/{s}"],
                    **{c: r["metrics"].get(f"{c}/{s}", r["metrics"].get(c)) for c in COLUMNS[1:]}}
                   for r in results for s in first.eval.students]
        rows = leaderboard(records)
        md, table = markdown(rows), csv_text(rows)
        (out / "leaderboard.md").write_text(md)
        (out / "leaderboard.csv").write_text(table)
        parent.log_text(md, "leaderboard.md")
        parent.log_text(table, "leaderboard.csv")
        parent.log_metrics({f"acc/{r['method']}/ipc{r['ipc']}/{r['student']}": r["acc"] for r in rows})
        import matplotlib.pyplot as plt

        fig = accuracy_vs_ipc(rows)
        fig.savefig(out / "accuracy_vs_ipc.png", dpi=120)
        parent.log_figure(fig, "accuracy_vs_ipc.png")
        plt.close(fig)
        fig = grid_figure(*grid_inputs(first, results))
        fig.savefig(out / "grid.png", dpi=120)
        parent.log_figure(fig, "grid.png")
        plt.close(fig)
        parent.end("FINISHED")
    except BaseException as e:
        parent.end_after(e)
        raise
    print(md)
    log(f"leaderboard, accuracy_vs_ipc.png and grid.png in {out} (MLflow run {parent.run_id})")
    return {"rows": rows, "records": records, "parent_run_id": parent.run_id, "dir": str(out)}


def grid_inputs(cfg, results: list[dict]):
    """Seed 0 at the largest IPC of each method, and as many real train images per class."""
    import torch

    from raydd.prepare import load_data
    from raydd.generate import random_subset
    from raydd.outputs import read_distilled

    top = max(r["ipc"] for r in results)
    data = load_data(cfg)
    shown = dict(classes=list(range(min(10, data.num_classes))), per_class=min(top, 4))   # what grid_figure shows
    sets = {r["method"]: read_distilled(r["output_dir"], **shown) for r in results if r["ipc"] == top and r["seed"] == 0}
    real = random_subset(data.part("train"), min(top, 4), seed=0)
    return sets, (real.images, torch.as_tensor(real.labels)), data.class_names


def main(argv: list[str] | None = None) -> int:
    from raydd.methods import list_methods

    p = build_parser("python -m raydd.compare", __doc__.split("\n\n")[1])
    p.add_argument("--methods", default="", help=f"comma list (default: all: {','.join(list_methods())})")
    p.add_argument("--ipc", default="", help="comma list of IPCs (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3, help="distillation seeds per (method, IPC) (default 3)")
    p.add_argument("--from-sweep", default="", help="start each method from its sweep's best parameters")
    p.add_argument("--name", default="", help="the comparison's name (default: the preset, -smoke)")
    p.add_argument("--out", default="", help="its directory (default: compare/<name>)")
    p.add_argument("--parallel", type=int, default=0, help="distillations at once (default 0: as many as the "
                                                           "cluster's GPUs, or CPUs, hold sampling actors for)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    return run_cli(lambda: compare(args))


if __name__ == "__main__":
    sys.exit(main())
