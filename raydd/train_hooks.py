"""What a training loop may ask of whoever runs it (Ray Train on a cluster, or plain Python in a test).

Training loops in raydd are plain functions `loop(config: dict, hooks: TrainHooks) -> None`; the
Ray-specific lines (report, checkpoint, DDP wrapping, rank) go through `hooks`, so the same loop
runs under `raydd.distributed.train.fit` (Ray Train) and under `run_local` (unit tests).
"""
from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch


class TrainHooks:
    """In-process hooks: rank 0 of 1, reports kept in memory, checkpoints copied to a temp dir."""

    world_rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.reports: list[dict] = []
        self.checkpoint_dir: str | None = None
        self._restore: str | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def node_id(self) -> str:
        """The machine this worker runs on: workers on one node may lend each other their CPUs."""
        return socket.gethostname()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Report metrics; with checkpoint_dir, that directory is persisted as the latest checkpoint."""
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            import shutil

            dst = tempfile.mkdtemp(prefix="raydd-ckpt-")
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)
            self.checkpoint_dir = dst

    def restore_dir(self) -> str | None:
        """The latest checkpoint directory to resume from after a failure, or None on a fresh start."""
        return self._restore

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


def print_progress(hooks: TrainHooks, tag: str, step: int, total: int, metrics: dict) -> None:
    """A training loop's progress line, from rank 0 only: "[tag] step s/total k v k v ..." (metrics but 'step')."""
    if hooks.world_rank == 0:
        print(f"[{tag}] step {step}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step"),
              flush=True)


def run_local(loop: Callable[[dict, TrainHooks], None], config: dict) -> TrainHooks:
    hooks = TrainHooks()
    loop(config, hooks)
    return hooks


@dataclass
class TrainResult:
    metrics: dict                # the last report
    checkpoint_dir: str | None   # the final checkpoint (copy it out to keep it)
