"""MLflow: the only module in raydd that imports mlflow.

Default store: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
`check_reachable` runs before any heavy work so an unreachable server fails in seconds, not after
an hour of sampling.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from raydd.config import TrackingConfig
from raydd.errors import RayddError


class TrackingError(RayddError, RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else mlflow.db in the working directory. A relative sqlite
    path is made absolute against the current directory (the sweep resolves it on its driver, before
    its trials, which run in other directories)."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


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


def source_tags() -> dict[str, str]:
    """Where a run's code came from (the UI's Source and User columns): the raydd command, the user, raydd's
    version and, in a git checkout, the commit (+ "-dirty")."""
    import getpass
    import subprocess
    import sys

    import raydd

    entry = Path(sys.argv[0]).stem if sys.argv and sys.argv[0].endswith(".py") else ""
    tags = {"raydd.version": raydd.__version__, "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"python -m raydd.{entry}" if entry and entry != "__main__" else "raydd"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):   # no user name for this uid (some containers)
        pass
    root = Path(raydd.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        tags["mlflow.source.git.commit"] = commit + ("-dirty" if dirty else "")
    return tags


class Tracker:
    """One MLflow run, addressed by id through MlflowClient (no global "active run": a sweep's parent and
    its children live side by side). Reuses an existing run id (resume) instead of creating a duplicate."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_id: str | None = None, tags: dict | None = None,
                 parent_run_id: str | None = None):
        import mlflow

        self.uri = check_reachable(cfg)
        self.client = mlflow.MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        tags = (source_tags() | {k: str(v) for k, v in (tags or {}).items()}
                | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}))
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
        else:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.run_id = run_id
        self.log_images_enabled = cfg.log_images

    # --- what the rest of raydd calls -------------------------------------------------------
    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._log_points([(k, step or 0, v) for k, v in metrics.items()])

    def log_curve(self, name: str, points: list) -> None:
        """A learning curve [(step, value), ...] as one metric with steps (a line chart in the UI)."""
        self._log_points([(name, int(step), v) for step, v in points])

    def _log_points(self, points: list) -> None:
        """(key, step, value) triples, the finite ones, in MLflow's batches of 500."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step) for k, step, v in points if v is not None and np.isfinite(float(v))]
        for i in range(0, len(clean), 500):
            self.client.log_batch(self.run_id, metrics=clean[i:i + 500])

    def log_images(self, name: str, grid: np.ndarray) -> None:
        if self.log_images_enabled:
            self.client.log_image(self.run_id, grid, artifact_file=f"{name}.png")

    def log_dict(self, d: dict, name: str) -> None:
        self.client.log_dict(self.run_id, d, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    @staticmethod
    def status(cfg: TrackingConfig, run_id: str) -> str:
        import mlflow

        return mlflow.MlflowClient(tracking_uri(cfg)).get_run(run_id).info.status

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def end_after(self, error: BaseException) -> None:
        """End a run that `error` cut short: KILLED for an interrupt (Ctrl-C), FAILED for anything else."""
        self.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def _search_runs(cfg: TrackingConfig, filter_string: str, **kwargs) -> list:
    """Runs of cfg.experiment matching an MLflow filter ([] if the experiment does not exist yet)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string, **kwargs) if exp else []


def find_run(cfg: TrackingConfig, run_name: str) -> str | None:
    """The id of the newest run with this raydd run name (for resuming without duplicating)."""
    runs = _search_runs(cfg, f"tags.raydd_run = '{run_name}'", order_by=["attributes.start_time DESC"],
                        max_results=1)
    return runs[0].info.run_id if runs else None


def best_params_of_sweep(cfg: TrackingConfig, names: list[str], method: str) -> dict | None:
    """The best parameters ({dotted key: value}) of the newest finished sweep of `method` named one of `names`."""
    import mlflow

    for name in names:
        runs = _search_runs(cfg, f"tags.raydd_run = '{name}' and tags.raydd_sweep = '{method}' and "
                                 f"attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
        if runs:
            path = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="best.json",
                                                       tracking_uri=tracking_uri(cfg))
            return json.loads(Path(path).read_text())["best_params"]
    return None


def running_children(cfg: TrackingConfig, parent_run_id: str) -> list[str]:
    """Ids of the child runs of `parent_run_id` that are still marked RUNNING."""
    runs = _search_runs(cfg, f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'")
    return [r.info.run_id for r in runs]
