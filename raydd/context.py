"""What a method's `run(ctx, cfg)` receives: the run config, the real data, the backbone spec, and
two verbs — `generate` (sharded sampling) and `train` (a training job) — plus logging.

The verbs go to a runner: `LocalRunner` (in-process, plain PyTorch: unit tests, benchmarks) or
`raydd.distributed.runner.RayRunner` (Ray Data / Ray Train). Method code never sees which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raydd.config import Config
from raydd.data import RealData
from raydd.generate import BackboneSpec, DistilledSet, GuidanceFactory, generate_local, make_rows
from raydd.train_hooks import TrainHooks, TrainResult, run_local


class LocalRunner:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def generate(self, spec: BackboneSpec, rows: dict[str, np.ndarray],
                 guidance_factory: GuidanceFactory | None = None) -> DistilledSet:
        return generate_local(spec, self.cfg.sampler, rows, guidance_factory)

    def train(self, loop: Callable[[dict, TrainHooks], None], config: dict, name: str, num_workers: int | None = None):
        hooks = run_local(loop, config)
        return TrainResult(hooks.reports[-1] if hooks.reports else {}, hooks.checkpoint_dir)


class NullTracker:
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_images(self, name: str, images, labels, class_names=None) -> None:
        pass

    def log_dict(self, d: dict, name: str) -> None:
        pass


@dataclass
class Context:
    cfg: Config
    data: RealData
    spec: BackboneSpec
    runner: Any = None
    tracker: Any = field(default_factory=NullTracker)
    scratch: Path = Path(".")

    def rows(self, per_class: int, stream: str = "", by_class: bool = False,
             classes: list[int] | None = None) -> dict[str, np.ndarray]:
        """Rows (class, slot, seed, unit) for `per_class` samples of every class; seeds derive from
        (run seed, class, slot, stream) only."""
        unit = per_class if by_class else self.cfg.compute.batch_size
        return make_rows(self.data.num_classes, per_class, self.cfg.seed, unit, by_class, stream, classes)

    def generate(self, rows: dict[str, np.ndarray], guidance_factory: GuidanceFactory | None = None) -> DistilledSet:
        return self.runner.generate(self.spec, rows, guidance_factory)

    def train(self, loop: Callable[[dict, TrainHooks], None], config: dict, name: str, num_workers: int | None = None):
        return self.runner.train(loop, config, name, num_workers)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step)
