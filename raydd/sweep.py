"""python -m raydd.sweep --method <name> [--trials N] [--max-concurrent K] [--time-budget S] [--smoke]
                        [--resume] [--storage DIR|s3://...] [--preset digits] [key=value ...]

Search a method's hyperparameters (tune_spaces/<method>.yaml) with Optuna (TPE, seeded, the paper's
defaults evaluated first) through Ray Tune. Each trial distils with its configuration and evaluates
students on the VALIDATION split in stages of growing student-training length (1/4, 1/2, all of the
epochs) inside one Ray Train job, whose report after each stage reaches Tune, so ASHA stops bad
configurations early. The best configuration is then re-run with fresh seeds and reported on the TEST
split (never tuned on test).

MLflow: one parent run per sweep (search space, best params, best val and test accuracy, Optuna's
optimisation-history and parameter-importance plots) with one child run per trial and one for the
re-run of the best configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

from raydd.config import Config, ConfigError, load_config, run_params, run_tags
from raydd.distill import (build_parser, check_backbone, check_method, distill, ensure_backbone, log, prepare_method,
                           produce, run_cli)
from raydd.tune_space import SearchSpace, config_key_validator, load_space

STAGES = (0.25, 0.5, 1.0)      # fractions of the student-training epochs, one report each


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped (Ctrl-C); Tune saved its state and --resume continues it."""


def trial_config(base: Config, params: dict, trial_id: str, sweep_dir: Path) -> Config:
    """The base config with a trial's parameters applied (validated like any override)."""
    from raydd.config import set_key, validate

    cfg = dataclasses.replace(base, methods={k: dict(v) for k, v in base.methods.items()})
    for key, value in params.items():
        set_key(cfg, key, value)
    validate(cfg)
    cfg.run_name = f"{sweep_dir.name}-trial-{trial_id}"
    cfg.out_dir = str(sweep_dir / "trials")
    return cfg


def stage_done(tracking, run_id: str, metrics: dict) -> dict:
    """On the Train controller, once per evaluation stage of a trial: log val_acc to the trial's child run
    and return what Tune gets. Tune ends a trial at its last report (max_t), possibly before the trial's
    function returns, so the child run is closed here at the last stage."""
    from raydd.tracking import Tracker

    tracker = Tracker(tracking, "", run_id=run_id)
    tracker.log_metrics({"val_acc": metrics["acc"], "acc": metrics["acc"]}, step=metrics["stage"])
    if metrics["stage"] == len(STAGES):
        tracker.end("FINISHED")
    return {"val_acc": metrics["acc"], "stage": metrics["stage"]}


def run_trial(params: dict, base: Config, sweep_dir: Path, parent_run_id: str) -> None:
    """One Tune trial: distil, then evaluate on val in stages; each stage's val_acc reaches Tune (and ASHA,
    which may stop the trial there) from the one Ray Train job that trains the students."""
    import functools

    import ray.tune

    from raydd.prepare import load_data
    from raydd.distributed.runner import RayRunner
    from raydd.distributed.tune import StagesToTune
    from raydd.jobs import evaluate_set, set_source
    from raydd.tracking import Tracker, find_run

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params, trial_id, sweep_dir)
    data = load_data(cfg)
    scratch = sweep_dir / "scratch" / trial_id
    scratch.mkdir(parents=True, exist_ok=True)
    # a trial re-run after an interrupted sweep reuses its child run (and its finished sampling units and
    # student jobs, both kept in its scratch dir)
    tracker = Tracker(cfg.tracking, cfg.run_name, run_id=find_run(cfg.tracking, cfg.run_name),
                      parent_run_id=parent_run_id,
                      tags={"raydd_run": cfg.run_name, "raydd_trial": trial_id, "kind": "trial", "split": "val",
                            "searched": ",".join(sorted(params))} | run_tags(cfg))
    status = "FAILED"
    try:
        tracker.log_params(run_params(cfg, check_method(cfg)[1]))     # the searched values are among them
        runner = RayRunner(cfg, scratch, max_train_failures=0)        # (Tune restarts the trial instead)
        out_dir, _, timings = produce(cfg, data, runner, tracker, scratch)
        tracker.log_metrics(timings)
        report = StagesToTune(functools.partial(stage_done, cfg.tracking, tracker.run_id))
        evaluate_set(cfg, set_source(out_dir), runner, max_workers=1, stages=STAGES, callbacks=[report])
        status = "FINISHED"                      # (stage_done closed the run at the last stage)
    finally:
        # Tune stops a trial at its last report too, which can end the Train job (and this function) with
        # an error after stage_done closed the run FINISHED: keep that status
        if status != "FINISHED" and Tracker.status(cfg.tracking, tracker.run_id) == "RUNNING":
            tracker.end("KILLED")


def per_trial_resources(cfg: Config) -> dict:
    """What one trial's inner work holds at once: its sampling actors, or its one evaluation worker."""
    c = cfg.compute
    return {"CPU": max(c.num_actors * c.cpus_per_actor, c.train_workers * c.cpus_per_worker, c.cpus_per_worker),
            "GPU": max(c.num_actors * c.gpus_per_actor, c.train_workers * c.gpus_per_worker)}


def max_concurrent_trials(cfg: Config, requested: int) -> int:
    """Cap concurrent trials by what the cluster can run side by side, so nested Ray Data / Ray Train
    work inside trials cannot starve each other into a deadlock."""
    import ray

    need, have = per_trial_resources(cfg), ray.cluster_resources()
    fits = [math.floor(have.get(r, 0) / n) for r, n in need.items() if n > 0]
    cap = max(1, min(fits)) if fits else 1
    return min(cap, requested) if requested > 0 else cap


def close_stopped_trials(base: Config, name: str, grid, parent_run_id: str) -> None:
    """ASHA (or Ctrl-C) stops a trial by ending its actor, so the trial's own `finally` never runs: mark its
    child run KILLED, with the stage it reached, instead of leaving it RUNNING in the MLflow UI."""
    from raydd.tracking import Tracker, find_run, running_children

    for r in grid:
        tid = (r.metrics or {}).get("trial_id")
        run_id = find_run(base.tracking, f"{name}-trial-{tid}") if tid else None
        if run_id and Tracker.status(base.tracking, run_id) == "RUNNING":
            t = Tracker(base.tracking, f"{name}-trial-{tid}", run_id=run_id)
            stage = r.metrics.get("stage", 0)
            if stage < len(STAGES):
                t.set_tags({"raydd_stopped": f"after stage {stage} of {len(STAGES)}"})
            t.end("FINISHED" if stage == len(STAGES) else "KILLED")
    # a trial stopped before its first report has no metrics (no trial id) in the grid; once Tune has returned
    # no trial runs, so a child run still RUNNING is one of those (a --resume reuses it)
    for run_id in running_children(base.tracking, parent_run_id):
        t = Tracker(base.tracking, "", run_id=run_id)
        t.set_tags({"raydd_stopped": "before its first stage"})
        t.end("KILLED")


def optuna_distributions(space: SearchSpace) -> dict:
    import optuna

    out = {}
    for name, p in space.params.items():
        if p.type == "float":
            out[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            out[name] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(p.choices)
    return out


def study_from_results(results, space: SearchSpace):
    """An Optuna study rebuilt from the finished trials (for the history / importance plots)."""
    import optuna

    dists = optuna_distributions(space)
    study = optuna.create_study(direction="maximize")
    for r in results:
        if r.metrics and "val_acc" in r.metrics:
            params = {k: r.config[k] for k in dists if k in r.config}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r.metrics["val_acc"]))
    return study


def trials_table(results, space: SearchSpace) -> str:
    """A Markdown table of the trials (searched values, last val_acc, stage reached), best first."""
    names = space.names()
    rows = sorted(results, key=lambda r: -(r.metrics or {}).get("val_acc", -1.0))
    lines = ["| trial | " + " | ".join(names) + " | val_acc | stage |", "|" + "---|" * (len(names) + 3)]
    for r in rows:
        m = r.metrics or {}
        acc = f"{m['val_acc']:.4f}" if "val_acc" in m else "–"
        lines.append(f"| {m.get('trial_id', '?')} | " + " | ".join(str(r.config.get(k, "")) for k in names)
                     + f" | {acc} | {m.get('stage', '–')} |")
    return "\n".join(lines) + "\n"


def log_optuna_plots(tracker, study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    def save(ax, name: str) -> None:        # room for long parameter names (optuna's default size clips them)
        ax.figure.set_size_inches(9, 4.5)
        ax.figure.tight_layout()
        tracker.log_figure(ax.figure, name)
        plt.close(ax.figure)

    save(plot_optimization_history(study, target_name="val_acc"), "optuna_history.png")
    if len(study.trials) >= 2 and len({json.dumps(t.params, sort_keys=True, default=str) for t in study.trials}) >= 2:
        try:
            save(plot_param_importances(study, target_name="val_acc"), "optuna_importance.png")
        except (RuntimeError, ValueError) as e:  # e.g. zero variance in the objective
            log(f"parameter importance not computed: {e}")


def sweep(method: str, base: Config, final_eval, *, trials: int, max_concurrent: int, time_budget: float | None,
          storage: str, name: str, resume: bool, seed: int = 0, final_data=None, space_path: str = "") -> dict:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    from raydd.prepare import load_data
    from raydd.distributed.cluster import init_ray
    from raydd.distributed.runner import RayRunner
    from raydd.tracking import Tracker, check_reachable, find_run

    check_method(base)                                           # unknown method / method keys fail here
    space = load_space(method, space_path or None,                # bad YAML,
                       validate_key=functools.partial(config_key_validator, run=base))
    # unknown keys and values the method rejects (for this run's IPC and settings) fail here
    if "://" not in storage:                                     # a local --storage must be writable, now
        try:
            Path(storage).expanduser().mkdir(parents=True, exist_ok=True)
            probe = Path(storage).expanduser() / ".raydd-write-test"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--storage {storage}: cannot write there ({e.strerror}); give a writable "
                              f"directory or an s3:// / gs:// URI") from None
    # trials run in their own directories: hand them the resolved (absolute) tracking URI
    base = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, uri=check_reachable(base.tracking)))
    data = load_data(base)
    check_backbone(base)                                          # missing weights fail here
    path = str(Path(storage).expanduser().resolve()) if "://" not in storage else storage
    # the trials' outputs and work dirs: next to Tune's state, or for a URI under the cache, which every node of a
    # multi-node cluster must share anyway (cached models, Ray Train's checkpoints); a path relative to a trial's
    # working directory would land on whichever node ran it
    sweep_dir = Path(path) / name if "://" not in storage else base.resolved_cache_dir() / "sweeps" / name
    exists = ray.tune.Tuner.can_restore(f"{path}/{name}")
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep named {name!r} in {path}; start it without --resume")
    if exists and not resume:
        raise ConfigError(f"a sweep named {name!r} already exists in {path}; pass --resume to continue it "
                         f"or --name to start a new one")
    init_ray(base.compute)
    runner = RayRunner(base, sweep_dir)
    ensure_backbone(base, data, runner)                           # train the tiny DiT once, before any trial
    # and the method's jobs that every trial shares (IGDS's VE), like the backbone with a whole node's CPUs,
    # not with one CPU inside a trial while the other trials wait for it
    whole = dataclasses.replace(base, compute=dataclasses.replace(base.compute,
                                                                  cpus_per_worker=runner.max_cpus_per_worker()))
    prepare_method(whole, data, RayRunner(whole, sweep_dir))
    concurrent = max_concurrent_trials(base, max_concurrent)
    log(f"sweep {name}: {method}, {trials} trial(s), {concurrent} at a time, space {space.names()}")

    parent = Tracker(base.tracking, name, run_id=find_run(base.tracking, name) if resume else None,
                     tags={"raydd_run": name, "raydd_sweep": method, "kind": "sweep", "split": "test"}
                     | run_tags(dataclasses.replace(base, method=method)))
    try:
        parent.log_params({"sweep.method": method, "sweep.trials": trials, "sweep.max_concurrent": concurrent,
                           "sweep.space": json.dumps({k: dataclasses.asdict(v) for k, v in space.params.items()},
                                                     default=str)})
        parent.log_dict({k: dataclasses.asdict(v) for k, v in space.params.items()}, "search_space.json")
        trainable = ray.tune.with_parameters(run_trial, base=base, sweep_dir=sweep_dir, parent_run_id=parent.run_id)
        # the trial function only orchestrates: it holds no CPU (a token of memory, as Tune refuses an
        # empty resource request), so two 1-CPU trials fit on 2 CPUs
        trainable = ray.tune.with_resources(trainable, {"CPU": 0, "memory": 2**20})
        if resume:
            log("resuming: finished trials are kept, unfinished ones re-run")
            tuner = ray.tune.Tuner.restore(f"{path}/{name}", trainable, resume_unfinished=True, restart_errored=True)
        else:
            searcher = OptunaSearch(space=optuna_distributions(space), metric=space.metric, mode=space.mode,
                                    points_to_evaluate=[space.defaults()], sampler=optuna.samplers.TPESampler(seed=seed))
            scheduler = ASHAScheduler(metric=space.metric, mode=space.mode, time_attr="training_iteration",
                                      max_t=len(STAGES), grace_period=1, reduction_factor=2)
            tuner = ray.tune.Tuner(
                trainable,
                tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                                max_concurrent_trials=concurrent, time_budget_s=time_budget),
                # a trial that fails (e.g. a Train worker died) runs again, keeping its finished sampling
                # units and student jobs
                run_config=ray.tune.RunConfig(name=name, storage_path=path, verbose=1,
                                              failure_config=ray.tune.FailureConfig(max_failures=2)),
            )
        grid = tuner.fit()
        close_stopped_trials(base, name, grid, parent.run_id)
        # Ctrl-C / SIGINT: Tune saves its state and fit() returns early. The returned grid shows every trial
        # as TERMINATED; the saved state keeps the interrupted ones RUNNING / PENDING (what --resume re-runs).
        saved = [t.status for t in ray.tune.ExperimentAnalysis(f"{path}/{name}").trials]
        done = sum(st in ("TERMINATED", "ERROR") for st in saved)
        if done < len(saved) or (time_budget is None and len(saved) < trials):
            raise SweepInterrupted(
                f"sweep {name} interrupted with {done} of {trials} trial(s) finished; its state is "
                f"saved in {path}/{name}. Resume with: python -m raydd.sweep --method {method} --name {name} "
                f"--storage {storage} --resume")
        finished = [r for r in grid if r.metrics and "val_acc" in r.metrics]
        if not finished:
            raise RuntimeError(f"no trial of sweep {name} finished; see {path}/{name}")
        best = max(finished, key=lambda r: r.metrics["val_acc"])
        best_params = {k: best.config[k] for k in space.names() if k in best.config}
        log(f"best val_acc {best.metrics['val_acc']:.4f} with {best_params}; re-running on the test split ...")
        log_optuna_plots(parent, study_from_results(finished, space))
        parent.log_text(trials_table(grid, space), "trials.md")

        # the best configuration, fresh sampling and student seeds, evaluated on TEST
        final = trial_config(base, best_params, "best", sweep_dir)
        final = dataclasses.replace(final, seed=base.seed + 1000, run_name=f"{name}-best", out_dir=str(sweep_dir),
                                    eval=final_eval, data=final_data or base.data)
        rerun = distill(final, parent_run_id=parent.run_id)
        test_acc = rerun["metrics"]["acc"]                        # the mean over students (distill.summary_metrics)
        parent.log_params({f"best.{k}": v for k, v in best_params.items()})
        parent.log_metrics({"best_val_acc": best.metrics["val_acc"], "best_test_acc": test_acc, "acc": test_acc,
                            "trials_finished": len(finished), "trials_total": len(grid)})
        parent.log_dict({"best_params": best_params, "best_val_acc": best.metrics["val_acc"],
                         "best_test_acc": test_acc, "best_output_dir": rerun["output_dir"]}, "best.json")
        parent.end("FINISHED")
    except SweepInterrupted:
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    log(f"sweep {name} done: best val {best.metrics['val_acc']:.4f}, test {test_acc:.4f} (MLflow parent run "
        f"{parent.run_id}); compare trials with: mlflow ui --backend-store-uri {parent.uri}")
    return {"parent_run_id": parent.run_id, "best_params": best_params, "best_val_acc": best.metrics["val_acc"],
            "best_test_acc": test_acc, "trials": len(grid)}


def trial_base_config(user: Config) -> Config:
    """What every trial runs: one student seed on the val split, no DD-Ranking references, and a val split
    held out of train (HOLDOUT of it) where the user's data has none (ImageNet presets train on all of it)."""
    data = user.data if user.data.val_fraction > 0 else dataclasses.replace(user.data, val_fraction=HOLDOUT)
    return dataclasses.replace(user, data=data, eval=dataclasses.replace(user.eval, seeds=1, ranking=False, split="val"))


HOLDOUT = 0.15


def main(argv: list[str] | None = None) -> int:
    from raydd.methods import list_methods

    p: argparse.ArgumentParser = build_parser("python -m raydd.sweep", __doc__.split("\n\n")[1])
    p.add_argument("--method", required=True, help=f"one of: {', '.join(list_methods())}")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default 8; 2 with --smoke)")
    p.add_argument("--max-concurrent", type=int, default=0, help="cap on concurrent trials (default: what fits)")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--storage", default="sweeps", help="Tune results: a local dir or s3:// / gs:// URI")
    p.add_argument("--name", default="", help="sweep name (default <preset>-<method>-sweep; reuse it to --resume)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep of the same name")
    p.add_argument("--space", default="", help="a search-space YAML (default: tune_spaces/<method>.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)

    def body():
        trials = args.trials if args.trials is not None else (2 if args.smoke else 8)
        for ok, msg in ((trials >= 1, f"--trials={trials} must be >= 1"),      # (Tune reads -1 as "forever")
                        (args.max_concurrent >= 0, f"--max-concurrent={args.max_concurrent} must be >= 0 (0 = what fits)"),
                        (args.time_budget is None or args.time_budget > 0, f"--time-budget={args.time_budget} must be > 0")):
            if not ok:
                raise ConfigError(msg)
        user = load_config(args.preset, args.overrides, smoke=args.smoke, method=args.method)
        # trials: one student seed on the val split, no DD-Ranking references; the best config's re-run
        # gets the user's evaluation settings (and data: the whole train split) on the test split
        trial_base = trial_base_config(user)
        if trial_base.data.val_fraction != user.data.val_fraction:
            log(f"trials hold out data.val_fraction={trial_base.data.val_fraction} of the train split as val; "
                f"the best configuration's re-run trains on all of it")
        name = args.name or f"{args.preset}-{args.method}-sweep{'-smoke' if args.smoke else ''}"
        t0 = time.time()
        sweep(args.method, trial_base, dataclasses.replace(user.eval, split="test"), trials=trials,
              max_concurrent=args.max_concurrent, time_budget=args.time_budget, storage=args.storage, name=name,
              resume=args.resume, seed=user.seed, final_data=user.data, space_path=args.space)
        log(f"total {time.time() - t0:.0f}s")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
