"""Ray Data sharding: rows (class, slot, seed, unit) through an actor pool.

Each actor builds `raydd.generate.SampleBatches` once (frozen backbone + guidance models) and then
denoises whole units. One input block == one unit, so a unit is never split across batches and the
output does not depend on how many actors ran (checked by tests/test_determinism.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from raydd.config import ComputeConfig, SamplerConfig
from raydd.generate import BackboneSpec, DistilledSet, GuidanceFactory, SampleBatches, rows_to_set


class FaultySampleBatches(SampleBatches):
    """Fault injection (compute.fail_actor_after = N): the first actor to finish N batches exits its
    process once; a marker file makes sure it happens once per run, not on every restart."""

    def __init__(self, *args, fail_after: int, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_after, self.marker, self.done = fail_after, marker, 0

    def __call__(self, batch):
        out = super().__call__(batch)
        self.done += 1
        if self.done >= self.fail_after:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL)  # atomic: only one actor wins
                os.close(fd)
                os._exit(1)
            except FileExistsError:
                pass
        return out


def map_ray(udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray], compute: ComputeConfig) -> dict[str, np.ndarray]:
    """Run a callable class (constructor loads models once per actor; __call__: dict of numpy columns ->
    dict of numpy columns) over `columns` on an actor pool. Rows with the same `unit` form one block,
    so they are always processed together, whatever the number of actors."""
    units = np.unique(columns["unit"])
    def block(m: np.ndarray) -> pa.Table:  # tensors (latents [N,C,H,W]) as Ray's Arrow tensor columns
        return pa.table({k: ArrowTensorArray.from_numpy(v[m]) if v.ndim > 1 else v[m] for k, v in columns.items()})

    blocks = [block(columns["unit"] == u) for u in units]
    ds = ray.data.from_arrow(blocks).map_batches(
        udf,
        fn_constructor_kwargs=udf_kwargs,
        batch_size=max(len(b) for b in blocks),
        compute=ray.data.ActorPoolStrategy(size=compute.num_actors),
        num_cpus=compute.cpus_per_actor,
        num_gpus=compute.gpus_per_actor,
        max_restarts=-1,          # a lost actor is replaced ...
        max_task_retries=-1,      # ... and its unfinished units are re-run
    )
    cols: dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def generate_ray(spec: BackboneSpec, sampler: SamplerConfig, rows: dict[str, np.ndarray], compute: ComputeConfig,
                 guidance_factory: GuidanceFactory | None = None, scratch: str | Path | None = None,
                 post_step_factory=None) -> DistilledSet:
    kwargs = dict(spec=spec, sampler=sampler, guidance_factory=guidance_factory, gpus=compute.gpus_per_actor,
                  threads=max(1, int(compute.cpus_per_actor)), precision=compute.precision,
                  post_step_factory=post_step_factory)
    udf = SampleBatches
    if compute.fail_actor_after >= 0:
        udf = FaultySampleBatches
        kwargs.update(fail_after=compute.fail_actor_after, marker=str(Path(scratch or ".") / "actor_fault_injected"))
    out = map_ray(udf, kwargs, rows, compute)
    check_complete(rows, out)
    return rows_to_set(out)


def check_complete(rows: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    """Every (class, slot) exactly once — never silently drop or duplicate a sample."""
    want = set(zip(rows["class_idx"].tolist(), rows["slot"].tolist()))
    got = list(zip(out["class_idx"].tolist(), out["slot"].tolist()))
    if len(got) != len(set(got)) or set(got) != want:
        raise RuntimeError(f"sharded sampling returned {len(got)} rows ({len(set(got))} distinct) for "
                           f"{len(want)} requested (class, slot) pairs")
