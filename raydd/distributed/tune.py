"""Ray Tune <- Ray Train: a sweep trial's student evaluation runs as a Ray Train job whose stage reports
reach the trial's scheduler (ASHA) while the job runs."""
from __future__ import annotations

from typing import Callable

from ray.tune.integration.ray_train import TuneReportCallback


class StagesToTune(TuneReportCallback):
    """Forwards a Train run's stage reports to the Tune trial the run is part of (constructed in the trial,
    run on the Train controller). A report that closes a stage carries {"stage", "acc"}; `on_stage(metrics)`
    (e.g. log to MLflow) returns what Tune gets, where every such report is one training_iteration for
    the scheduler. Other reports (per-round checkpoints) are not forwarded."""

    def __init__(self, on_stage: Callable[[dict], dict]):
        super().__init__()
        self.on_stage = on_stage

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if "stage" in metrics[0]:                       # metrics[i]: worker i's report; every rank sends the same
            super().after_report(run_context, [self.on_stage(metrics[0])], None)
