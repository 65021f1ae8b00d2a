"""Sharded sampling and map stages: rows (class, slot, seed, unit) through an actor pool (raydd.distributed.pool).

Each actor builds a stage's callable class (`raydd.generate.SampleBatches`: frozen backbone + guidance models) once
and then denoises whole units. One call == one unit, so a unit is never split and the output does not depend on
how many actors ran (checked by tests/test_determinism.py). Units are kept in a stage dir as they finish, so a driver
that dies mid-stage resumes where it stopped.
"""
from __future__ import annotations

import os
import posixpath
import socket
import tempfile
from pathlib import Path

import numpy as np

from raydd.config import ComputeConfig, FaultConfig, SamplerConfig
from raydd.distributed.pool import WarmPool
from raydd.locks import file_lock
from raydd.generate import (HEAVY, BackboneSpec, DistilledSet, GuidanceFactory, SampleBatches, StagedSet, open_unit,
                             remove_stale_temps, rows_to_set, save_unit, stage_units, unit_exists,
                             unit_file)


class FaultySampleBatches(SampleBatches):
    """Fault injection (faults.actor_after = N): the first actor to finish N batches exits its
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


def map_ray(udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray], compute: ComputeConfig,
            stage_dir: str | None = None, fail_driver_after: int = -1, light: bool = False,
            pool: WarmPool | None = None) -> dict[str, np.ndarray]:
    """Run a callable class (constructor loads models once per actor; __call__: dict of numpy columns ->
    dict of numpy columns) over `columns` on an actor pool: `pool` (a runner's, kept warm from stage to stage), else
    one started for this stage. Rows with the same `unit` go to an actor together, so a unit is always processed
    whole, whatever the number of actors.

    With stage_dir (a path or a URI), every finished unit is saved there as it arrives (temp file + rename), and units
    already there are not run again: a driver that dies mid-stage resumes where it stopped. A unit the udf wrote
    there itself (SampleBatches with a stage_dir) is not written again. light (with stage_dir): return the columns
    other than raydd.generate.HEAVY only; the images and latents stay in the unit files.
    fail_driver_after >= 0 (fault injection, sampling stages only): the driver exits after saving that many."""
    if stage_dir is None:
        return _map_units(udf, udf_kwargs, columns, compute, None, fail_driver_after, False, pool)
    # processes that need the same stage at once (sweep trials sharing a pool) take turns: the first samples,
    # the others wait, then find every unit done (a local file lock: one machine or a shared POSIX file system;
    # for a URI stage, the driver machine's temp dir)
    name = posixpath.basename(stage_dir)
    home = Path(tempfile.gettempdir()) / "raydd-stage-locks" if "://" in stage_dir else Path(stage_dir).parent
    home.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        print(f"[raydd] waiting for another process running stage {name} ...", flush=True)
        WarmPool.release_all()                 # the waiting process's actors are idle: the other one may need them

    with file_lock(home / f".{name}.lock", on_wait=waiting):                       # hidden: globs list stages only
        return _map_units(udf, udf_kwargs, columns, compute, stage_dir, fail_driver_after, light, pool)


def _map_units(udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray], compute: ComputeConfig,
               stage_dir: str | None, fail_driver_after: int, light: bool, pool: WarmPool | None) -> dict[str, np.ndarray]:
    def wanted(key: str) -> bool:
        return not (light and key in HEAVY)

    def kept(cols) -> dict[str, np.ndarray]:
        return {k: v for k, v in cols.items() if wanted(k)}

    done: list[dict[str, np.ndarray]] = []
    if stage_dir is not None:
        if stale := remove_stale_temps(stage_dir):
            print(f"[raydd] stage {posixpath.basename(stage_dir)}: removed {len(stale)} unfinished unit write(s) "
                  f"over an hour old", flush=True)
        for u in stage_units(stage_dir):
            with open_unit(unit_file(stage_dir, u)) as z:               # members load one by one, only those kept
                done.append({k: z[k] for k in z.files if wanted(k)})
    finished = {int(u) for d in done for u in np.unique(d["unit"])}
    todo = ~np.isin(columns["unit"], list(finished))
    if finished:
        print(f"[raydd] resuming stage {posixpath.basename(stage_dir)}: {len(finished)} unit(s) already done, "
              f"{len(np.unique(columns['unit'][todo]))} to go", flush=True)
    saved = 0

    units = [{k: v[columns["unit"] == u] for k, v in columns.items()} for u in np.unique(columns["unit"][todo])]
    own = pool is None                                                  # a pool for this stage alone
    pool = WarmPool(compute) if own else pool
    try:
        for answer in pool.map(udf, udf_kwargs, units):                 # one unit's answer, whole
            done.append(kept(answer))
            if stage_dir is not None:
                if not unit_exists(stage_dir, int(answer["unit"][0])):   # the actor did not write it: not its machine
                    save_unit(stage_dir, answer)
                saved += 1
                if 0 <= fail_driver_after <= saved:                     # fault injection: the driver dies here
                    print(f"[raydd] fault injection: driver exits after saving {saved} unit(s)", flush=True)
                    os._exit(3)
    finally:
        if own:
            pool.release()
    return {k: np.concatenate([d[k] for d in done]) for k in done[0]}


def stage_key(*parts) -> str:
    """A stable content key for a stage: rows, sampler, backbone and the guidance recipe. Factories
    (functools.partial) count by their function and arguments, arrays by their bytes (a repr would summarise
    a large array with "..."), anything else by its repr without memory addresses, so the key survives a
    restart and two runs asking for the same samples share them."""
    from raydd.config import config_hash

    return config_hash(*[_fingerprint(p) for p in parts])


def _fingerprint(obj):
    import functools
    import hashlib
    import re

    if isinstance(obj, functools.partial):
        return {"fn": f"{obj.func.__module__}.{obj.func.__qualname__}", "args": [_fingerprint(a) for a in obj.args],
                "kw": {k: _fingerprint(v) for k, v in sorted(obj.keywords.items())}}
    if isinstance(obj, np.ndarray):
        return f"{obj.dtype}{obj.shape}:{hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}"
    if isinstance(obj, dict):
        return {str(k): _fingerprint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fingerprint(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return re.sub(r" at 0x[0-9a-f]+", "", repr(obj))


def generate_ray(spec: BackboneSpec, sampler: SamplerConfig, rows: dict[str, np.ndarray], compute: ComputeConfig,
                 guidance_factory: GuidanceFactory | None = None, scratch: str | Path | None = None,
                 post_step_factory=None, stages: str | Path | None = None,
                 faults: FaultConfig = FaultConfig(), pool: WarmPool | None = None) -> DistilledSet | StagedSet:
    """Sample `rows` on the actor pool. The stage is kept under `stages` (else `scratch`), keyed by its content
    (rows with their seeds, sampler, backbone, guidance and post-step recipes, precision): every run that
    asks for the same samples reuses the finished units (a sweep whose trials differ after sampling samples
    once; a rerun after the driver died resumes). Then the result is a StagedSet: the images stay in the stage's
    unit files, which the actors write. Without a place to keep it, a DistilledSet in memory. pool: as map_ray's."""
    kwargs = dict(spec=spec, sampler=sampler, guidance_factory=guidance_factory, gpus=compute.gpus_per_actor,
                  threads=max(1, int(compute.cpus_per_actor)), precision=compute.precision,
                  post_step_factory=post_step_factory)
    udf = SampleBatches
    if faults.actor_after >= 0:
        udf = FaultySampleBatches
        kwargs.update(fail_after=faults.actor_after, marker=str(Path(scratch or ".") / "actor_fault_injected"))
    home = stages if stages is not None else scratch
    if home is None:                                                   # nothing kept: the rows come back whole
        out = map_ray(udf, kwargs, rows, compute, fail_driver_after=faults.driver_after, pool=pool)
        check_complete(rows, out)
        return rows_to_set(out)
    key = stage_key({k: v.tolist() for k, v in rows.items()}, sampler, spec, guidance_factory, post_step_factory,
                    compute.precision)
    home = str(home).rstrip("/") if "://" in str(home) else str(Path(home).resolve())
    stage_dir = f"{home}/generate-{key}"
    # the actors on this machine (any, for a URI) write their units there; the driver receives (class, slot, seed,
    # unit, score)
    kwargs.update(stage_dir=stage_dir, stage_host=socket.gethostname())
    out = map_ray(udf, kwargs, rows, compute, stage_dir, fail_driver_after=faults.driver_after, light=True, pool=pool)
    check_complete(rows, out)
    return StagedSet.read(stage_dir, np.unique(rows["unit"]))


def check_complete(rows: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    """Every (class, slot) exactly once — never silently drop or duplicate a sample."""
    want = set(zip(rows["class_idx"].tolist(), rows["slot"].tolist()))
    got = list(zip(out["class_idx"].tolist(), out["slot"].tolist()))
    if len(got) != len(set(got)) or set(got) != want:
        raise RuntimeError(f"sharded sampling returned {len(got)} rows ({len(set(got))} distinct) for "
                           f"{len(want)} requested (class, slot) pairs")
