"""Ray Data sharding: rows (class, slot, seed, unit) through an actor pool.

Each actor builds `raydd.generate.SampleBatches` once (frozen backbone + guidance models) and then
denoises whole units. One input block == one unit, so a unit is never split across batches and the
output does not depend on how many actors ran (checked by tests/test_determinism.py).
"""
from __future__ import annotations

import os
import posixpath
import socket
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from raydd.config import ComputeConfig, FaultConfig, SamplerConfig
from raydd.errors import RayddError
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
            stage_dir: str | None = None, fail_driver_after: int = -1, light: bool = False) -> dict[str, np.ndarray]:
    """Run a callable class (constructor loads models once per actor; __call__: dict of numpy columns ->
    dict of numpy columns) over `columns` on an actor pool. Rows with the same `unit` form one block,
    so they are always processed together, whatever the number of actors.

    With stage_dir (a path or a URI), every finished unit is saved there as it arrives (temp file + rename), and units
    already there are not run again: a driver that dies mid-stage resumes where it stopped. A unit the udf wrote
    there itself (SampleBatches with a stage_dir) is not written again. light (with stage_dir): return the columns
    other than raydd.generate.HEAVY only; the images and latents stay in the unit files.
    fail_driver_after >= 0 (fault injection, sampling stages only): the driver exits after saving that many."""
    if stage_dir is None:
        return _map_units(udf, udf_kwargs, columns, compute, None, fail_driver_after, light=False)
    # processes that need the same stage at once (sweep trials sharing a pool) take turns: the first samples,
    # the others wait, then find every unit done (a local file lock: one machine or a shared POSIX file system;
    # for a URI stage, the driver machine's temp dir)
    name = posixpath.basename(stage_dir)
    home = Path(tempfile.gettempdir()) / "raydd-stage-locks" if "://" in stage_dir else Path(stage_dir).parent
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home / f".{name}.lock",                                          # hidden: globs list stages only
                   on_wait=lambda: print(f"[raydd] waiting for another process running stage {name} ...",
                                         flush=True)):
        return _map_units(udf, udf_kwargs, columns, compute, stage_dir, fail_driver_after, light)


def _map_units(udf: type, udf_kwargs: dict, columns: dict[str, np.ndarray], compute: ComputeConfig,
               stage_dir: str | None, fail_driver_after: int, light: bool) -> dict[str, np.ndarray]:
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

    if todo.any():
        def block(m: np.ndarray) -> pa.Table:  # tensors (latents [N,C,H,W]) as Ray's Arrow tensor columns
            return pa.table({k: ArrowTensorArray.from_numpy(v[m]) if v.ndim > 1 else v[m] for k, v in columns.items()})

        blocks = [block(todo & (columns["unit"] == u)) for u in np.unique(columns["unit"][todo])]
        ds = ray.data.from_arrow(blocks).map_batches(
            udf,
            fn_constructor_kwargs=udf_kwargs,
            batch_size=max(len(b) for b in blocks),
            compute=ray.data.ActorPoolStrategy(size=compute.num_actors),
            num_cpus=compute.cpus_per_actor,
            num_gpus=compute.gpus_per_actor,
            memory=int(compute.memory_per_actor_gib * 2**30) or None,     # bytes Ray reserves per actor
            # no max_restarts / max_task_retries: Ray Data's actor pools already default both to -1 (a lost
            # actor is replaced and its unfinished units re-run), and passing them is deprecated in Ray 2.60
        )
        parts: dict[int, list[dict[str, np.ndarray]]] = {}   # a unit may arrive in more than one batch
        for batch in _batches_or_init_error(ds, udf):
            for u in np.unique(batch["unit"]):
                part = {k: v[batch["unit"] == u] for k, v in batch.items()}
                done.append(kept(part))
                if stage_dir is not None:
                    # the driver writes the units it receives whole (the actor wrote the others), part by part
                    if int(u) in parts or not unit_exists(stage_dir, int(u)):
                        parts.setdefault(int(u), []).append(part)
                        save_unit(stage_dir, {k: np.concatenate([p[k] for p in parts[int(u)]]) for k in part})
                    saved += 1
                    if 0 <= fail_driver_after <= saved:           # fault injection: the driver dies here
                        print(f"[raydd] fault injection: driver exits after saving {saved} unit(s)", flush=True)
                        os._exit(3)
    return {k: np.concatenate([d[k] for d in done]) for k in done[0]}


def _batches_or_init_error(ds, udf: type):
    """ds's batches. When the actors cannot even be built (weights that do not load, a bad guidance model),
    Ray ends the stage with an ActorDiedError whose text is the constructor's whole traceback: raise its
    last line, the constructor's own error, instead (the traceback is in the actor's log above it)."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.ActorDiedError as e:
        if not e.actor_init_failed:
            raise
        last = str(e).strip().splitlines()[-1]                    # "<ErrorType>: <message>"
        msg = f"the {udf.__name__} actors could not start: {last}"
        if last.split(":", 1)[0].rsplit(".", 1)[-1] in _bad_input_names():   # e.g. CheckpointError: bad weights
            raise ActorStartError(msg) from None
        raise RuntimeError(msg) from None


def _bad_input_names() -> set[str]:
    """Names of every RayddError class (an actor's constructor error arrives as text)."""
    todo, names = [RayddError], set()
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class ActorStartError(RayddError, RuntimeError):
    """The actors could not start because of bad input (weights that do not fit, a missing file)."""


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
                 faults: FaultConfig = FaultConfig()) -> DistilledSet | StagedSet:
    """Sample `rows` on the actor pool. The stage is kept under `stages` (else `scratch`), keyed by its content
    (rows with their seeds, sampler, backbone, guidance and post-step recipes, precision): every run that
    asks for the same samples reuses the finished units (a sweep whose trials differ after sampling samples
    once; a rerun after the driver died resumes). Then the result is a StagedSet: the images stay in the stage's
    unit files, which the actors write. Without a place to keep it, a DistilledSet in memory."""
    kwargs = dict(spec=spec, sampler=sampler, guidance_factory=guidance_factory, gpus=compute.gpus_per_actor,
                  threads=max(1, int(compute.cpus_per_actor)), precision=compute.precision,
                  post_step_factory=post_step_factory)
    udf = SampleBatches
    if faults.actor_after >= 0:
        udf = FaultySampleBatches
        kwargs.update(fail_after=faults.actor_after, marker=str(Path(scratch or ".") / "actor_fault_injected"))
    home = stages if stages is not None else scratch
    if home is None:                                                   # nothing kept: the rows come back whole
        out = map_ray(udf, kwargs, rows, compute, fail_driver_after=faults.driver_after)
        check_complete(rows, out)
        return rows_to_set(out)
    key = stage_key({k: v.tolist() for k, v in rows.items()}, sampler, spec, guidance_factory, post_step_factory,
                    compute.precision)
    home = str(home).rstrip("/") if "://" in str(home) else str(Path(home).resolve())
    stage_dir = f"{home}/generate-{key}"
    # the actors on this machine (any, for a URI) write their units there; the driver receives (class, slot, seed,
    # unit, score)
    kwargs.update(stage_dir=stage_dir, stage_host=socket.gethostname())
    out = map_ray(udf, kwargs, rows, compute, stage_dir, fail_driver_after=faults.driver_after, light=True)
    check_complete(rows, out)
    return StagedSet.read(stage_dir, np.unique(rows["unit"]))


def check_complete(rows: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    """Every (class, slot) exactly once — never silently drop or duplicate a sample."""
    want = set(zip(rows["class_idx"].tolist(), rows["slot"].tolist()))
    got = list(zip(out["class_idx"].tolist(), out["slot"].tolist()))
    if len(got) != len(set(got)) or set(got) != want:
        raise RuntimeError(f"sharded sampling returned {len(got)} rows ({len(set(got))} distinct) for "
                           f"{len(want)} requested (class, slot) pairs")
