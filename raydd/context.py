"""What a method's `run(ctx, cfg)` receives: the run config, the real data, the backbone spec, and
the verbs methods need — `generate` (sharded sampling), `map` (any model over rows on the actors; `map_set` when
its answer is a set), `real_rows` (real images picked as a set), `train` / `train_cached` (training jobs),
`real_classifier` and `set_classifier` (classifiers on real data or on a set), `run_method` (another method's
set) — plus logging.

The verbs go to a runner: `LocalRunner` (in-process, plain PyTorch: unit tests, benchmarks) or
`raydd.distributed.runner.RayRunner` (Ray actors, Ray Data, Ray Train). Method code never sees which.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from raydd.config import Config, SamplerConfig
from raydd.data import RealData
from raydd.jobs import real_classifier, real_datasets, set_classifier_loop, set_source, streamed_set, streams
from raydd.generate import (HEAVY, BackboneSpec, DistilledSet, GuidanceFactory, StagedSet, generate_local, make_rows,
                            map_units, real_set, rows_to_set)
from raydd.train_hooks import TrainHooks, TrainResult, run_local


def log(msg: str) -> None:
    """The CLIs' "[raydd] ..." progress lines."""
    print(f"[raydd] {msg}", flush=True)


class LocalRunner:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def max_cpus_per_worker(self) -> float:
        import os

        return float(os.cpu_count() or 1)

    def generate(self, spec: BackboneSpec, rows: dict[str, np.ndarray],
                 guidance_factory: GuidanceFactory | None = None, post_step_factory=None,
                 sampler: SamplerConfig | None = None) -> DistilledSet:
        return generate_local(spec, sampler or self.cfg.sampler, rows, guidance_factory, post_step_factory)

    def map(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return map_units(udf(**udf_kwargs), columns)

    def map_set(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray]) -> tuple[DistilledSet, dict]:
        out = self.map(udf, udf_kwargs, columns)
        return rows_to_set(out), {k: v for k, v in out.items() if k not in HEAVY}

    def real_rows(self, part, idx: np.ndarray, slots: np.ndarray) -> DistilledSet:
        return real_set(part, idx, slots)

    def release_pools(self) -> None:
        """Nothing to release: in process there are no actors (RayRunner.release_pools)."""

    def map_part(self, part: str, per_class: int, udf: type, udf_kwargs: dict, latents: str = "") -> dict[str, np.ndarray]:
        from raydd.distributed.store import map_part

        return map_part(self.cfg, part, per_class, udf, udf_kwargs, latents)

    def train(self, loop: Callable[[dict, TrainHooks], None], config: dict, name: str, num_workers: int | None = None,
              cpus_per_worker: float | None = None, resume_key: str | None = None, callbacks: list | None = None,
              datasets: dict | None = None):
        """In process; `callbacks` (Ray Train UserCallbacks) see every report, after the loop has ended."""
        hooks = run_local(loop, config, datasets)
        for cb in callbacks or []:
            for metrics in hooks.reports:
                cb.after_report(None, [metrics], None)
        return TrainResult(hooks.reports[-1] if hooks.reports else {}, hooks.checkpoint_dir)


def train_cached(runner, cache_dir: Path, kind: str, loop: Callable[[dict, TrainHooks], None], config: dict,
                 cpus_per_worker: float | None = None, log: Callable[[str], None] = log,
                 datasets: Callable[[], dict] | None = None) -> Path:
    """Run a training job once per config: its final checkpoint directory is kept at
    <cache_dir>/<kind>/<config hash>/ (copied to a temp name, then renamed: a cached entry is complete).
    Processes that need the same entry at once (concurrent sweep trials) take turns on a lock file: the
    first trains, the others give back their warm actors, wait and reuse its result (a local file lock: one
    machine or a shared POSIX file system). Ray Train's own checkpoint copies of the job are removed once the
    entry is in place.
    datasets: () -> the Ray Datasets the loop streams, called only when the job runs (a cached entry lists no
    files); not part of the key (they are the config's data, streamed)."""
    import time

    from raydd.config import config_hash
    from raydd.locks import file_lock

    path = Path(cache_dir) / kind / config_hash(config)
    locks = Path(cache_dir) / ".locks"                   # beside the entries, so <kind>/ lists entries only
    locks.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        log(f"waiting for another process training {kind} (cached as {path}) ...")
        runner.release_pools()                 # this process's idle actors: the other one's job may need them

    with file_lock(locks / f"{kind}-{path.name}.lock", on_wait=waiting):
        if not (path / ".complete").exists():
            log(f"training {kind} (cached as {path}) ...")
            t0 = time.time()
            result = runner.train(loop, config, name=f"{kind}-{path.name}", cpus_per_worker=cpus_per_worker,
                                  datasets=datasets() if datasets else None)
            if result.checkpoint_dir is None:
                raise RuntimeError(f"training job {kind} reported no checkpoint")
            tmp = path.with_name(path.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(result.checkpoint_dir, tmp)
            (tmp / "metrics.json").write_text(json.dumps(result.metrics, default=str))
            (tmp / ".complete").write_text("")
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            run_dir = Path(result.checkpoint_dir).resolve().parent     # Ray Train's own copies: not needed now
            if run_dir.parent == (Path(cache_dir) / "ray_train").resolve():
                shutil.rmtree(run_dir, ignore_errors=True)
            log(f"{kind} trained in {time.time() - t0:.0f}s: {result.metrics}")
    return path


def in_row_order(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A map's output sorted by its "row" column (the pool returns units in any order)."""
    order = np.argsort(out["row"])
    return {k: v[order] for k, v in out.items()}


class NullTracker:
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_images(self, name: str, grid) -> None:
        pass

    def log_dict(self, d: dict, name: str) -> None:
        pass


@dataclass
class Context:
    cfg: Config
    data: RealData
    backbone: BackboneSpec | Callable[[], BackboneSpec]  # a spec, or how to get one (trains the tiny DiT once)
    runner: Any = None
    tracker: Any = field(default_factory=NullTracker)
    scratch: Path = Path(".")

    @property
    def spec(self) -> BackboneSpec:
        """The frozen backbone; built on first use, so methods that never sample (random) never train it."""
        if callable(self.backbone):
            self.backbone = self.backbone()
        return self.backbone

    def rows(self, per_class: int, stream: str = "", by_class: bool = False,
             classes: list[int] | None = None) -> dict[str, np.ndarray]:
        """Rows (class, slot, seed, unit) for `per_class` samples of every class; seeds derive from
        (run seed, class, slot, stream) only."""
        unit = per_class if by_class else self.cfg.compute.batch_size
        return make_rows(self.data.num_classes, per_class, self.cfg.seed, unit, by_class, stream, classes)

    def generate(self, rows: dict[str, np.ndarray], guidance_factory: GuidanceFactory | None = None,
                 post_step_factory=None) -> DistilledSet:
        """post_step_factory(backbone, device) -> post_step: a batch-level update after every scheduler
        step (raydd.sampling.sample); with rows from rows(..., by_class=True) it sees one whole class."""
        # the sampler is this context's: a method may sample with its own (CaO2's pool at its CFG scale)
        return self.runner.generate(self.spec, rows, guidance_factory, post_step_factory=post_step_factory,
                                    sampler=self.cfg.sampler)

    def map(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Any callable class over rows grouped by `unit` on the actor pool (e.g. latent optimisation):
        the constructor loads models once per actor, __call__ maps numpy columns to numpy columns."""
        return self.runner.map(udf, udf_kwargs, columns)

    def map_rows(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray],
                 unit: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`map` over N rows (every column [N, ...]) with its output back in row order (the pool returns units in
        any order). unit [N]: the rows processed together (default: chunks of compute.batch_size)."""
        return in_row_order(self.map(udf, udf_kwargs, self.numbered(columns, unit)))

    def map_set(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray],
                unit: np.ndarray | None = None) -> tuple[DistilledSet | StagedSet, dict[str, np.ndarray]]:
        """map_rows for a UDF whose answer rows are a set's (class_idx, slot, image, latent, score; CaO2's latent
        optimisation): (that set, its other columns in row order). On Ray the set is a StagedSet: the UDF's units
        stay in a stage's files and no image comes back to the driver."""
        result, light = self.runner.map_set(udf, udf_kwargs, self.numbered(columns, unit))
        return result, in_row_order(light)

    def numbered(self, columns: dict[str, np.ndarray], unit: np.ndarray | None) -> dict[str, np.ndarray]:
        """columns + "row" (0..N-1) and "unit" (given, or chunks of compute.batch_size rows)."""
        n = len(next(iter(columns.values())))
        unit = np.arange(n) // self.cfg.compute.batch_size if unit is None else unit
        return {"row": np.arange(n), "unit": unit, **columns}

    def actor_resources(self) -> dict:
        """A map UDF's share of an actor (its `gpus` and `threads` arguments): compute.gpus_per_actor, and
        compute.cpus_per_actor threads."""
        c = self.cfg.compute
        return {"gpus": c.gpus_per_actor, "threads": max(1, int(c.cpus_per_actor))}

    def real_rows(self, idx: np.ndarray, slots: np.ndarray, part: str = "train") -> DistilledSet | StagedSet:
        """Rows idx of a real split as a set with these slots (random's picks): on Ray staged under the run's scratch
        dir (raydd.generate.stage_rows: one pass over a store's split, the driver holds a batch); in process, read."""
        return self.runner.real_rows(self.data.part(part), idx, slots)

    def map_real(self, udf: type, udf_kwargs: dict, per_class: int = 0, latents: str = "") -> dict[str, np.ndarray]:
        """A callable class over the real train split's rows (class_idx, unit = class, image uint8 [C, H, W]), the
        first `per_class` of each class (0: all), e.g. per-class sums. With a store it streams from the store
        through an actor pool (raydd.distributed.store.map_part) and no process holds the split; else the held
        split goes through `map`. Rows arrive in batches that may mix classes, in any order. latents: the
        split's stored latents (stored_latents), as a column latent float16 [c, h, w] instead of image."""
        if streams(self.cfg):
            return self.runner.map_part("train", per_class, udf, udf_kwargs, latents)
        x, y = self.data.train.x, self.data.train.y
        keep = torch.cat([torch.nonzero(y == c).flatten()[: per_class or None] for c in range(self.data.num_classes)])
        return self.map(udf, udf_kwargs, {"class_idx": y[keep].numpy(), "unit": y[keep].numpy(), "image": x[keep].numpy()})

    def train(self, loop: Callable[[dict, TrainHooks], None], config: dict, name: str, num_workers: int | None = None,
              cpus_per_worker: float | None = None, datasets: dict | None = None):
        return self.runner.train(loop, config, name, num_workers, cpus_per_worker, datasets=datasets)

    def train_cached(self, kind: str, loop: Callable[[dict, TrainHooks], None], config: dict,
                     cpus_per_worker: float | None = None, reads: tuple[str, ...] = (), latents: str = "") -> Path:
        """A training job run once per config (reference models, estimators, selectors, fine-tunes). reads: the
        real splits the loop reads with raydd.jobs.real_split ("train", "val"); with a store they stream to it.
        latents: "train" streams the split's stored latents (stored_latents) instead of its images."""
        return train_cached(self.runner, self.cfg.resolved_cache_dir(), kind, loop, config, cpus_per_worker,
                            datasets=lambda: real_datasets(self.cfg, *reads, latents=latents))

    def stored_latents(self) -> str:
        """With data.latents: the location of the train split's latents under the backbone's VAE, encoded on the
        actor pool the first time (raydd.prepare.prepare_latents); else "" (each job encodes as it reads)."""
        from raydd.prepare import prepare_latents

        if not self.cfg.data.latents:
            return ""
        self.runner.release_pools()                      # the encoding's actors need the CPUs / GPUs
        return prepare_latents(self.cfg, self.spec.cfg.vae, self.spec.cfg.vae_scale)

    def real_classifier(self, arch: str = "", epochs: int = 0) -> Path:
        """A classifier trained on the real train split, cached (raydd.jobs.real_classifier)."""
        return real_classifier(self.cfg, self.runner, arch, epochs)

    def set_classifier(self, set_dir: Path, arch: str, epochs: int, dst: Path, evaluate: bool = False) -> tuple[Path, dict]:
        """A classifier trained on a distilled set (hard labels, the eval protocol's recipe), kept as `dst`
        (safetensors, written atomically; reused when it exists) with its job's metrics beside it
        (`dst`.json): raydd.jobs.set_classifier_loop. evaluate: the job also measures "eval_acc" on eval.split,
        streamed to it with a store (the driver reads no real split)."""
        metrics = dst.with_suffix(".json")
        if not dst.exists():
            source, syn = streamed_set(set_source(str(set_dir)))                # inline when small, else streamed
            config = {"source": source, "data": asdict(self.cfg.data), "arch": arch, "evaluate": evaluate,
                      "num_classes": self.data.num_classes, "eval": asdict(self.cfg.eval), "epochs": epochs,
                      "seed": self.cfg.seed}
            result = self.train(set_classifier_loop, config, name=f"{self.cfg.resolved_run_name()}-{dst.stem}",
                                num_workers=1, datasets=(real_datasets(self.cfg, "eval") if evaluate else {}) | syn)
            metrics.write_text(json.dumps(result.metrics, default=str))
            tmp = dst.with_name(dst.name + ".partial")
            shutil.copyfile(Path(result.checkpoint_dir) / "model.safetensors", tmp)
            os.replace(tmp, dst)
        return dst, json.loads(metrics.read_text()) if metrics.exists() else {}

    def run_method(self, name: str, ipc: int) -> DistilledSet:
        """Another registered method's set at `ipc`, with its own `<name>.<field>` settings and this backbone
        (CaO2's pool from a generator, LGD's seed set)."""
        from raydd.config import make_method_config
        from raydd.methods import get_method

        method = get_method(name)
        sub = dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, ipc=ipc, method=name),
                                  backbone=lambda: self.spec)
        return method.run(sub, make_method_config(method.Config, self.cfg.methods.get(name, {}), name))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step)
