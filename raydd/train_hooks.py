"""What a training loop may ask of whoever runs it (Ray Train on a cluster, or plain Python in a test).

Training loops in raydd are plain functions `loop(config: dict, hooks: TrainHooks) -> None`; the
Ray-specific lines (report, checkpoint, DDP wrapping, rank) go through `hooks`, so the same loop
runs under `raydd.distributed.train.fit` (Ray Train) and under `run_local` (unit tests).
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class TrainHooks:
    """In-process hooks: rank 0 of 1, reports kept in memory, checkpoints copied to a temp dir."""

    world_rank = 0
    world_size = 1

    def __init__(self, datasets: dict | None = None) -> None:
        self.reports: list[dict] = []
        self.datasets = datasets or {}
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

    def dataset(self, name: str):
        """The Ray Data stream `name` the job was given (`datasets=`), or None. Whole: raydd's jobs do not split
        it between workers (each evaluation worker trains whole students). Read it with iter_batches."""
        return self.datasets.get(name)


def print_progress(hooks: TrainHooks, tag: str, step: int, total: int, metrics: dict) -> None:
    """A training loop's progress line, from rank 0 only: "[tag] step s/total k v k v ..." (metrics but 'step')."""
    if hooks.world_rank == 0:
        print(f"[{tag}] step {step}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step"),
              flush=True)


class TrainLoop:
    """The skeleton every raydd training loop shares (tiny DiT, fine-tunes, tiny VAE, IGDS's estimator), so
    resume, logging and checkpoints cannot drift apart between them:

        loop = TrainLoop(hooks, "vae", total, {"vae": vae, "opt": opt})   # restores them after a failure
        for step in loop.steps():                                          # from the restored step on
            ... one optimizer step on `n` samples ...
            loop.end_step(step, n, metrics=lambda: {...}, final=lambda d: ...)

    A progress line every 1/20 of the steps (and at `breaks`, e.g. a phase boundary), a report with a
    checkpoint every 1/5 (a multiple of the log cadence, so reports carry the log metrics). A checkpoint is
    state.pt (every entry's state_dict, `extra()`'s values and the step) and the curve of every logged row;
    the last one holds what `final(dir)` writes instead of state.pt (the model the job exists for, saved once;
    the dict it returns is added to the last report)."""

    def __init__(self, hooks: TrainHooks, tag: str, total: int, state: dict[str, Any], curve_file: str = "curve.json",
                 breaks: tuple[int, ...] = ()):
        self.hooks, self.tag, self.total, self.state, self.curve_file = hooks, tag, total, state, curve_file
        self.log_every = max(1, total // 20)
        self.ckpt_every = self.log_every * max(1, total // 5 // self.log_every)
        self.breaks = set(breaks)
        self.start, self.saved, self.curve, self.metrics = 0, {}, [], {}
        if hooks.restore_dir():                                          # resume after a worker failure
            self.saved = torch.load(f"{hooks.restore_dir()}/state.pt", map_location="cpu", weights_only=True)
            for name, obj in state.items():
                obj.load_state_dict(self.saved[name])
            self.start = int(self.saved["step"])
            curve = Path(hooks.restore_dir(), curve_file)
            self.curve = json.loads(curve.read_text()) if curve.exists() else []
        self.t0, self.seen = time.time(), 0

    def steps(self) -> range:
        return range(self.start, self.total)

    def end_step(self, step: int, samples: int, metrics: Callable[[], dict],
                 final: Callable[[str], dict | None] | None = None, extra: Callable[[], dict] | None = None) -> None:
        """After optimizer step `step` (0-based) over `samples` samples; metrics() runs on log steps only."""
        self.seen += samples
        done, last = step + 1, step == self.total - 1
        if done % self.log_every == 0 or last or done in self.breaks:
            self.metrics = {"step": done, **metrics(), "images_per_s": self.seen / (time.time() - self.t0)}
            self.curve.append(self.metrics)
            print_progress(self.hooks, self.tag, done, self.total, self.metrics)
        if done % self.ckpt_every == 0 or last or done in self.breaks:
            rank0 = self.hooks.world_rank == 0
            with tempfile.TemporaryDirectory() as d:
                if rank0:
                    if last and final is not None:       # the model the job is for; nothing is left to resume,
                        self.metrics = self.metrics | (final(d) or {})   # so no state.pt: weights saved once
                    else:
                        torch.save({**{k: v.state_dict() for k, v in self.state.items()},
                                    **(extra() if extra else {}), "step": done}, f"{d}/state.pt")
                    Path(d, self.curve_file).write_text(json.dumps(self.curve))
                self.hooks.report(self.metrics, checkpoint_dir=d if rank0 else None)


def run_local(loop: Callable[[dict, TrainHooks], None], config: dict, datasets: dict | None = None) -> TrainHooks:
    hooks = TrainHooks(datasets)
    loop(config, hooks)
    return hooks


@dataclass
class TrainResult:
    metrics: dict                # the last report
    checkpoint_dir: str | None   # the final checkpoint (copy it out to keep it)
