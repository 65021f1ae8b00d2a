"""RayRunner: how a method's Context generates (Ray Data) and trains (Ray Train) on the cluster."""
from __future__ import annotations

import hashlib
import math
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from raydd.config import Config, SamplerConfig
from raydd.distributed.data import generate_ray, map_ray, stage_key
from raydd.distributed.pool import WarmPool
from raydd.distributed.train import fit
from raydd.generate import BackboneSpec, DistilledSet, GuidanceFactory, StagedSet, stage_rows
from raydd.train_hooks import TrainHooks


class RayRunner:
    """max_train_failures: how often a Ray Train job restarts after a worker dies (FailureConfig). A sweep
    trial passes 0: Tune stopping the trial kills its Train workers, and a job that restarts then reserves a
    new placement group that nothing frees until the sweep ends (Ray Train registers a worker group's
    placement group for cleanup only once the group has started); Tune restarts a failed trial instead.

    Sampling and map stages that follow one another run in one warm actor pool (raydd.distributed.pool): its actors
    keep their processes and the backbone. Any other Ray work (a Train job, a Ray Data pass over the real data)
    releases it, and any other pool of this process, first, so no pool holds the CPUs or GPUs that work waits for."""

    def __init__(self, cfg: Config, scratch: Path | None, max_train_failures: int = 2):
        self.cfg, self.scratch, self.max_train_failures = cfg, scratch, max_train_failures
        self.pool = WarmPool(cfg.compute)

    def generate(self, spec: BackboneSpec, rows: dict[str, np.ndarray],
                 guidance_factory: GuidanceFactory | None = None, post_step_factory=None,
                 sampler: SamplerConfig | None = None) -> DistilledSet:
        # generation stages are shared by content across runs (the cache's stages/); without a scratch dir
        # (python -m raydd.evaluate) nothing is kept
        share = self.scratch is not None and self.cfg.compute.share_stages
        stages = (self.cfg.compute.stages or self.cfg.resolved_cache_dir() / "stages") if share else None
        return generate_ray(spec, sampler or self.cfg.sampler, rows, self.cfg.compute, guidance_factory,
                            scratch=self.scratch, post_step_factory=post_step_factory, stages=stages,
                            faults=self.cfg.faults, pool=self.pool)

    def map(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Like generate, each finished unit is kept under the run's scratch dir, so a rerun after the
        driver died resumes the stage."""
        return map_ray(udf, udf_kwargs, columns, self.cfg.compute, self.map_stage(udf, udf_kwargs, columns),
                       pool=self.pool)

    def map_set(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray]) -> tuple[StagedSet, dict]:
        """map for a UDF whose answer rows are a set's and that writes its units itself (stage_dir / stage_host, as
        SampleBatches): (the StagedSet over the stage's unit files, the light columns). The driver writes the units
        of actors on other machines as they arrive and keeps none."""
        stage = self.map_stage(udf, udf_kwargs, columns)
        light = map_ray(udf, udf_kwargs | {"stage_dir": stage, "stage_host": socket.gethostname()}, columns,
                        self.cfg.compute, stage, light=True, pool=self.pool)
        return StagedSet.read(stage, np.unique(columns["unit"])), light

    def map_part(self, part: str, per_class: int, udf: type, udf_kwargs: dict, latents: str = "") -> dict[str, np.ndarray]:
        """udf over a store's part, streamed through Ray Data's own actor pool (raydd.distributed.store.map_part)."""
        from raydd.distributed.store import map_part

        self.release_pools()
        return map_part(self.cfg, part, per_class, udf, udf_kwargs, latents)

    def real_rows(self, part, idx: np.ndarray, slots: np.ndarray) -> StagedSet:
        """Rows idx of a real split as a set, staged under the run's scratch dir (raydd.generate.stage_rows)."""
        key = stage_key(np.asarray(idx), np.asarray(slots))
        return stage_rows(part, idx, slots, str(Path(self.scratch) / f"real-{key}"))

    def map_stage(self, udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray]) -> str:
        """<scratch>/map-<udf>-<key>; the key: the udf, its kwargs and the bytes of every input column."""
        digest = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in columns.items()}
        key = stage_key(udf.__qualname__, tuple(sorted(udf_kwargs.items())), digest)
        return str(Path(self.scratch) / f"map-{udf.__name__}-{key}")

    def train(self, loop: Callable[[dict, TrainHooks], None], config: dict, name: str,
              num_workers: int | None = None, cpus_per_worker: float | None = None, resume_key: str | None = None,
              callbacks: list | None = None, datasets: dict | None = None):
        """resume_key: the job's checkpoints live under the run's scratch dir as <name>-<resume_key>, so a
        rerun of the run after the driver died continues from the last one (the scratch dir goes with the run).
        callbacks: Ray Train UserCallbacks, run on the Train controller after every report. datasets: Ray
        Datasets the loop streams (hooks.dataset)."""
        self.release_pools()
        c = self.cfg.compute
        cpus = cpus_per_worker or c.cpus_per_worker
        if datasets:
            # a stream's Ray Data tasks need a CPU of their own: a worker that held all of its node's CPUs (the
            # tiny VAE's job on one 2-CPU node) left them pending forever. Leave one, as evaluate_set does.
            cpus = min(cpus, max(1.0, self.max_cpus_per_worker() - 1))
        resumable = resume_key is not None and self.scratch is not None
        storage = Path(self.scratch) / "ray_train" if resumable else self.cfg.resolved_cache_dir() / "ray_train"
        return fit(loop, config, name=f"{name}-{resume_key}" if resumable else name, storage=storage, resume=resumable,
                   num_workers=num_workers or c.train_workers, cpus_per_worker=cpus,
                   gpus_per_worker=c.gpus_per_worker, memory_gib_per_worker=c.memory_per_worker_gib,
                   max_failures=self.max_train_failures, callbacks=callbacks, datasets=datasets)

    def release_pools(self) -> None:
        """Stop this process's warm pools (the runner's and any other's): before other Ray work, and before waiting
        for another process (a cached job it trains, a stage it runs), which may need those CPUs or GPUs."""
        WarmPool.release_all()

    def max_cpus_per_worker(self) -> float:
        """CPUs for each of compute.train_workers workers of a job that may use the whole cluster (the tiny
        backbone, IGDS's estimator in a sweep)."""
        cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
        return whole_cluster_share(cpus, self.cfg.compute.train_workers) or self.cfg.compute.cpus_per_worker


def whole_cluster_share(node_cpus: list[float], workers: int) -> float:
    """The most CPUs each of `workers` workers can ask for so that all of them fit at once, one per node
    while there are nodes enough (the workers-th largest node), else shared (the smallest node split);
    0 when no node has CPUs yet (an autoscaler's head started with --num-cpus=0). Asking for a whole node
    per worker made two workers on a one-node Ray wait forever."""
    cpus = sorted((c for c in node_cpus if c > 0), reverse=True)
    if not cpus:
        return 0.0
    if workers <= len(cpus):
        return cpus[workers - 1]
    return max(1.0, cpus[-1] // math.ceil(workers / len(cpus)))
