"""The training-loop skeleton every loop shares (raydd.train_hooks.TrainLoop), through the tiny DiT's real loop:
checkpoints, the final model, and resuming after a worker dies without redoing finished steps."""
import dataclasses
from pathlib import Path

import pytest
import torch

from raydd.config import load_config
from raydd.finetune import tiny_backbone_config, train_tiny_backbone
from raydd.train_hooks import TrainHooks


class Dies(TrainHooks):
    """Ray Train's view of a worker that dies after its `after`-th report (the checkpoint of that report kept)."""

    def __init__(self, after: int, restore: str | None = None):
        super().__init__()
        self.after, self._restore = after, restore

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if len(self.reports) == self.after:
            raise KeyboardInterrupt("worker died")


def test_tiny_backbone_trains_checkpoints_and_resumes_where_it_stopped(capsys):
    cfg = load_config("digits", smoke=True)
    backbone = dataclasses.replace(cfg.backbone, train_steps=20, train_batch=8)
    config = tiny_backbone_config(backbone, cfg.sampler, cfg.data, seed=0)
    torch.set_num_threads(1)
    first = Dies(after=2)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_backbone(config, first)
    assert [r["step"] for r in first.reports] == [4, 8]                  # a checkpoint every 1/5 of 20 steps
    state = torch.load(Path(first.checkpoint_dir) / "state.pt", weights_only=True)
    assert state["step"] == 8 and {"model", "ema", "opt"} <= set(state)
    capsys.readouterr()
    second = Dies(after=10**9, restore=first.checkpoint_dir)
    train_tiny_backbone(config, second)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[backbone] step ")]
    assert lines[0].startswith("[backbone] step 9/20"), lines[:2]     # a line a step (20 // 20)
    assert [r["step"] for r in second.reports] == [12, 16, 20]           # steps 1-8 were not redone
    final = Path(second.checkpoint_dir)
    assert (final / "transformer" / "config.json").exists() and (final / "curve.json").exists()
    assert not (final / "state.pt").exists()                             # nothing to resume: weights saved once
