"""Redundancy diagnostic (LGD, seed 000): how much of its training signal a distilled set repeats.

Split each class's images into K disjoint increments by slot order (increment k holds the k-th
contiguous block of a class's slots), train a student on one increment and measure its top-1
accuracy on the images of every other increment, treated as a test set:

    R[a, b] = acc(student trained on I_a, images of I_b)            R: [K, K], fractions in [0, 1]

The off-diagonal mean is the redundancy: near 100 %, any one increment already teaches what the
others hold (the paper: DiT 94.7 %, IGD 87.1 %, LGD 57.7 %). The diagonal (training accuracy) is
kept in the matrix but not in the mean. Works on any distilled set: ours (parquet, real slots) or
any ImageFolder (slots = natural order of the file names within a class folder).

Plain PyTorch; `redundancy_loop` is a raydd training loop (raydd.train_hooks) so the CLI can run
the (student, increment, seed) jobs on Ray Train workers.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raydd.config import ConfigError, DataConfig, EvalConfig
from raydd.data import DataError, Split, StreamedSplit
from raydd.protocols import epochs_for, fit_student, split_accuracy


def split_increments(labels: torch.Tensor, slots: torch.Tensor, k: int) -> list[torch.Tensor]:
    """K disjoint increments: per class, the items ordered by slot and cut into K contiguous blocks
    (sizes differ by at most one when a class's count is not a multiple of K).
    labels, slots [N] -> K index tensors."""
    if k < 2:
        raise ConfigError(f"the redundancy diagnostic needs K >= 2 increments, got {k}")
    parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.argsort(slots[idx], stable=True)]                   # this class in slot order
        if len(idx) < k:
            raise DataError(f"class {c} has {len(idx)} images: too few for K={k} increments")
        for j, block in enumerate(torch.tensor_split(idx, k)):
            parts[j].append(block)
    return [torch.cat(p) for p in parts]


def redundancy_row(split: Split | StreamedSplit, parts: list, a: int, *, student: str, num_classes: int,
                   cfg: EvalConfig, epochs: int, seed: int, device: str | torch.device = "cpu") -> list[float]:
    """Train on increment a of a split, held or streamed (parts: each increment's row positions in it); accuracy on
    every increment b -> [K]. A streamed split passes over its stream for each epoch and each b (nothing held)."""
    res = fit_student(split.subset(parts[a]), None, student=student, num_classes=num_classes, cfg=cfg, epochs=epochs,
                      seed=seed, device=device, return_model=True)
    return [split_accuracy(res["model"], split.subset(p), device=device) for p in parts]


def redundancy_matrix(images: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor, k: int, *, student: str,
                      num_classes: int, cfg: EvalConfig, epochs: int = 0, seeds: int = 1,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """R [K, K] averaged over `seeds` students per increment; epochs 0 = the protocol's epochs for
    the increment's IPC."""
    parts = split_increments(labels, slots, k)
    epochs = epochs or epochs_for(max(1, len(parts[0]) // max(1, len(labels.unique()))), cfg)
    rows = [[redundancy_row(Split(images, labels), parts, a, student=student, num_classes=num_classes, cfg=cfg,
                            epochs=epochs, seed=s, device=device) for s in range(seeds)] for a in range(k)]
    return np.asarray(rows).mean(axis=1)                                    # [K, seeds, K] -> [K, K]


def off_diagonal_mean(r: np.ndarray) -> float:
    """Mean of R[a, b] over a != b (the redundancy)."""
    r = np.asarray(r, dtype=np.float64)
    return float(r[~np.eye(len(r), dtype=bool)].mean())


def redundancy_figure(r: np.ndarray, title: str = ""):
    """A heatmap of R (percent, annotated) as a matplotlib Figure (no pyplot state, any backend)."""
    from matplotlib.figure import Figure

    k = len(r)
    fig = Figure(figsize=(max(4.0, 1.5 + 0.7 * k), max(3.5, 1.3 + 0.6 * k)))
    ax = fig.subplots()
    im = ax.imshow(100 * np.asarray(r), vmin=0, vmax=100, cmap="viridis")
    for a in range(k):
        for b in range(k):
            ax.text(b, a, f"{100 * r[a][b]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if r[a][b] < 0.6 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("evaluated on increment")
    ax.set_ylabel("trained on increment")
    ax.set_title((title + "\n" if title else "") + f"off-diagonal mean {100 * off_diagonal_mean(r):.1f}%", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Loading any distilled set with its slot order
# --------------------------------------------------------------------------------------------
def load_with_slots(path: str | Path, class_names: list[str], size: int, channels: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images uint8 [N,C,H,W], labels [N], slots [N]) of our output dir (its parquet, real slots) or of any
    ImageFolder (slots: natural file-name order, FolderSet; our images/ folder keeps its slots)."""
    from raydd.outputs import FolderSet, read_distilled

    root = Path(path).expanduser()
    s = read_distilled(root) if (root / "manifest.json").exists() else FolderSet(root, class_names, size, channels).read()
    return s.images, s.labels, s.slots


def redundancy_loop(config: dict, hooks) -> None:
    """Training loop: config {"source" (raydd.jobs.set_source: inline, or streamed as the job's "syn" dataset),
    "parts" (each increment's row positions in the set's (class, slot) order), "num_classes", "data", "eval",
    "jobs": [{student, a, seed}]}; each worker takes jobs[rank::world_size]; rank 0 reports results.json (one
    accuracy row per job)."""
    from raydd.jobs import synthetic_split

    dcfg, ecfg = DataConfig(**config["data"]), EvalConfig(**config["eval"])
    split = synthetic_split(config["source"], hooks, dcfg)
    parts, num_classes = [np.asarray(p, dtype=np.int64) for p in config["parts"]], config["num_classes"]
    epochs = epochs_for(max(1, len(parts[0]) // num_classes), ecfg)
    results = []
    for job in config["jobs"][hooks.world_rank::hooks.world_size]:
        row = redundancy_row(split, parts, job["a"], student=job["student"], num_classes=num_classes,
                             cfg=ecfg, epochs=epochs, seed=job["seed"], device=hooks.device)
        print(f"[redundancy {job['student']} increment {job['a']} seed {job['seed']}] "
              + " ".join(f"{100 * v:.1f}" for v in row), flush=True)
        results.append({**job, "row": row, "streamed": isinstance(split, StreamedSplit)})
    gathered = [r for part in hooks.all_gather(results) for r in part]
    with tempfile.TemporaryDirectory() as d:
        if hooks.world_rank == 0:
            Path(d, "results.json").write_text(json.dumps(gathered))
        hooks.report({"jobs": len(gathered)}, checkpoint_dir=d if hooks.world_rank == 0 else None)


def matrices_from_results(results: list[dict], k: int) -> dict[str, np.ndarray]:
    """results of redundancy_loop -> {student: R [K, K]} (rows averaged over seeds)."""
    out: dict[str, np.ndarray] = {}
    for s in sorted({r["student"] for r in results}):
        out[s] = np.asarray([np.mean([r["row"] for r in results if r["student"] == s and r["a"] == a], axis=0)
                             for a in range(k)])
    return out


def report_lines(r: np.ndarray, student: str, log: Callable[[str], None] = print) -> None:
    log(f"  {student}: cross-increment accuracy (%), rows = trained on, columns = evaluated on")
    for a, row in enumerate(r):
        log(f"    I{a}: " + " ".join(f"{100 * v:5.1f}" for v in row))
    log(f"  {student}: off-diagonal mean {100 * off_diagonal_mean(r):.1f}%")
