"""A warm actor pool: the sampling and map stages that follow one another keep their actor processes.

Ray Data's actor pools end with their dataset (ray-project/ray#42366), so each stage paid a process start, the
torch and diffusers imports and a backbone load before its first unit (about 5 s on the digits world; much more for
DiT-XL/2 weights). These actors outlive a stage: each builds a stage's callable class on its first unit and keeps
the frozen backbone (raydd.generate.keep_backbone), so the next stage with the same backbone starts at once.

The pool holds its CPUs and GPUs while it lives. RayRunner releases it before any other Ray work (a Train job, a
Ray Data read) so that the two never wait on each other; a stage sequence (LGD's rounds, CaO2's pool then its
latent optimisation) runs in one pool. A unit is one call: the output does not depend on which actor ran it.
"""
from __future__ import annotations

import os
import traceback
import weakref
from typing import Iterator

import numpy as np
import ray

from raydd.config import ComputeConfig
from raydd.errors import RayddError


class ActorStartError(RayddError, RuntimeError):
    """The actors could not start because of bad input (weights that do not fit, a missing file)."""


class ActorStartBug(RuntimeError):
    """A stage's callable class failed in its constructor for another reason (a bug: its traceback is in the log)."""


@ray.remote(max_restarts=-1, max_task_retries=-1)    # a lost actor is replaced and its unit run again
class StageActor:
    def __init__(self):
        from raydd.generate import keep_backbone

        keep_backbone()                                   # this process keeps its backbone from stage to stage
        self.stage, self.udf = None, None

    def run(self, stage: str, udf_and_kwargs: tuple[type, dict], unit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """unit: one unit's rows (numpy columns) -> the udf's answer. The udf is built on the stage's first unit."""
        if stage != self.stage:
            udf, kwargs = udf_and_kwargs
            self.stage, self.udf = None, None             # the last stage's models go before the next ones load
            try:
                self.udf = udf(**kwargs)
            except Exception as e:
                traceback.print_exc()                     # in the actor's log, which Ray shows in the driver's
                error = ActorStartError if isinstance(e, RayddError) else ActorStartBug
                raise error(f"the {udf.__name__} actors could not start: {type(e).__name__}: {e}") from None
            self.stage = stage
        return self.udf(unit)

    def pid(self) -> int:
        return os.getpid()


class WarmPool:
    """compute.num_actors StageActors, started on the first stage and kept until release(). Units go only to actors
    that have started: on a full cluster a stage runs on the actors it got, instead of waiting for the others (two
    pools each waiting for the other's CPUs would never finish)."""

    live: "weakref.WeakSet[WarmPool]" = weakref.WeakSet()    # this process's pools with actors

    def __init__(self, compute: ComputeConfig):
        self.compute, self.stages = compute, 0
        self.ready: list = []                             # started actors
        self.starting: dict = {}                          # ping ref -> an actor not yet started

    @property
    def actors(self) -> list:
        return self.ready + list(self.starting.values())

    def map(self, udf: type, udf_kwargs: dict, units: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """udf(**udf_kwargs)(unit) for every unit, on the pool, answers in the order they finish."""
        if not units:                                     # nothing to do: no actor starts
            return
        if not self.actors:
            c = self.compute
            options = dict(num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor,
                           memory=int(c.memory_per_actor_gib * 2**30) or None,   # bytes Ray reserves per actor
                           # spread over the nodes, as Ray Data's actor pools were; and an explicit strategy keeps
                           # them out of a sweep trial's placement group, which holds only the trial's memory token
                           scheduling_strategy="SPREAD")
            actors = [StageActor.options(**options).remote() for _ in range(c.num_actors)]
            self.starting = {a.pid.remote(): a for a in actors}
            WarmPool.live.add(self)
        self.stages += 1
        stage, work = f"stage-{self.stages}", ray.put((udf, udf_kwargs))          # shipped once, not per unit
        todo, idle, running = list(reversed(units)), list(self.ready), {}
        while todo or running:
            while todo and idle:                          # one unit per idle actor
                a = idle.pop()
                running[a.run.remote(stage, work, todo.pop())] = a
            [ref], _ = ray.wait(list(running) + list(self.starting), num_returns=1)
            if ref in self.starting:                      # an actor has started: it joins
                self.ready.append(self.starting[ref])
                idle.append(self.starting.pop(ref))
                continue
            idle.append(running.pop(ref))
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, (ActorStartError, ActorStartBug)):
                    raise e.cause from None               # one line; the constructor's traceback is in the log
                raise

    @classmethod
    def release_all(cls) -> None:
        """Release every pool of this process: before other Ray work, an idle pool of another runner (a test's second
        context, an earlier run's) must not hold the CPUs that work waits for."""
        for pool in list(cls.live):
            pool.release()

    def release(self) -> None:
        """Stop the actors: their CPUs, GPUs and memory go back to Ray."""
        for a in self.actors:
            ray.kill(a)
        self.ready, self.starting = [], {}
