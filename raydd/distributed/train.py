"""Ray Train: one wrapper that runs any plain raydd training loop `loop(config, hooks)` as a
TorchTrainer — the tiny backbone, teachers, reference models and every student evaluation."""
from __future__ import annotations

import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch

from raydd.train_hooks import TrainHooks, TrainResult


class RayHooks(TrainHooks):
    """TrainHooks backed by Ray Train inside a worker."""

    def __init__(self, datasets: list[str]) -> None:
        super().__init__()
        self.names = datasets                           # what fit(datasets=) gave this job
        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        ckpt = ray.train.get_checkpoint()
        self._restore_ckpt = ckpt
        self._restore = None

    @property
    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    @property
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)  # DDP when world_size > 1

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def restore_dir(self) -> str | None:
        if self._restore_ckpt is None:
            return None
        if self._restore is None:  # materialise once, locally
            self._restore = tempfile.mkdtemp(prefix="raydd-restore-")
            self._restore_ckpt.to_directory(self._restore)
        return self._restore

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name) if name in self.names else None   # whole: datasets_to_split=[]

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def _worker(config: dict) -> None:
    loop, datasets = config.pop("__loop__"), config.pop("__datasets__")
    if isinstance(loop, str):                               # "module:function" (see loop_ref), imported here
        import importlib

        module, name = loop.split(":")
        loop = getattr(importlib.import_module(module), name)
    loop(config, RayHooks(datasets))


def loop_ref(loop: Callable) -> str | Callable:
    """"module:function" for a loop importable by name, else the function itself (defined in __main__ or
    inside a function: pickled by value). By name, the Train controller, which unpickles the config too,
    does not import the loop's module for nothing (e.g. evaluation imports torch and the students)."""
    if loop.__module__ == "__main__" or "<" in loop.__qualname__:
        return loop
    return f"{loop.__module__}:{loop.__qualname__}"


def fit(loop: Callable[[dict, TrainHooks], None], config: dict, *, name: str, storage: str | Path,
        num_workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
        memory_gib_per_worker: float = 0.0, max_failures: int = 2, resume: bool = False,
        callbacks: list | None = None, datasets: dict | None = None) -> TrainResult:
    """Run `loop` on `num_workers` Ray Train workers; restarts from the last checkpoint on worker
    failure (up to max_failures times). resume=True: `name` is used as given, so a later fit with the same
    name and storage (the driver died and the run was started again) starts from that run's last checkpoint;
    otherwise every fit gets a fresh directory. datasets: {name: Ray Dataset}, streamed to every worker whole
    (hooks.dataset(name)), not split: each worker of an evaluation trains whole students."""
    use_gpu = gpus_per_worker > 0
    resources = ({"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if use_gpu else {})
                 | ({"memory": int(memory_gib_per_worker * 2**30)} if memory_gib_per_worker > 0 else {}))
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={**config, "__loop__": loop_ref(loop), "__datasets__": sorted(datasets or {})},
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # unique per fit unless resumable: two runs of one name (e.g. a baseline) must not share a directory
            name=name if resume else f"{name}-{uuid.uuid4().hex[:8]}", storage_path=str(Path(storage).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train's INFO lines ("Checkpoint successfully created" per report, the controller's worker-group
            # lines) buried the loops' own progress; warnings and errors still show. "Reporting training result"
            # stays: Ray logs it through a logger named by its file path, outside this setting
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    # Ray Train's fit() (in the main thread) installs a SIGINT handler that aborts the run and ends in
    # SystemExit, and leaves it installed: Ctrl-C ended raydd with exit code 1 and no message, and a later
    # Ctrl-C (say, while sampling after the backbone trained) was swallowed. Put the previous handler back
    # and report the abort as the KeyboardInterrupt it was (Ray Train calls sys.exit only from that handler).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        result = trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt(f"Ray Train job {name} aborted") from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    return TrainResult(dict(result.metrics or {}), result.checkpoint.path if result.checkpoint else None)
