"""MLflow: the only module in raydd that imports mlflow.

Default store: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
`check_reachable` runs before any heavy work so an unreachable server fails in seconds, not after
an hour of sampling.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from raydd.config import TrackingConfig


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def check_reachable(cfg: TrackingConfig) -> str:
    """Set the tracking URI and make one cheap call; raise TrackingError naming the URI if it fails."""
    uri = tracking_uri(cfg)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(f"MLflow tracking URI {uri!r} is unreachable or unusable: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}. Set MLFLOW_TRACKING_URI or tracking.uri= to a "
                            f"reachable server, or to sqlite:///mlflow.db for a local store.") from None
    return uri


class Tracker:
    """One MLflow run. Reuses an existing run id (resume) instead of creating a duplicate."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_id: str | None = None, tags: dict | None = None,
                 nested: bool = False):
        import mlflow

        self.mlflow = mlflow
        self.uri = check_reachable(cfg)
        mlflow.set_experiment(cfg.experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags, nested=nested)
        self.run_id = self.run.info.run_id
        self.log_images_enabled = cfg.log_images

    # --- what the rest of raydd calls -------------------------------------------------------
    def log_params(self, params: dict) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        new = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        items = list(new.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(float(v))}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_images(self, name: str, grid: np.ndarray) -> None:
        if self.log_images_enabled:
            self.mlflow.log_image(grid, artifact_file=f"{name}.png")

    def log_dict(self, d: dict, name: str) -> None:
        self.mlflow.log_dict(d, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, fig, name: str) -> None:
        self.mlflow.log_figure(fig, name)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def find_run(cfg: TrackingConfig, run_name: str) -> str | None:
    """The id of the newest run with this raydd run name (for resuming without duplicating)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.raydd_run = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def write_json_artifact(tracker: Tracker, d: dict, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(d, indent=1, default=str))
        tracker.log_artifact(p)
