"""Start a local Ray or join an existing cluster."""
from __future__ import annotations

import os

import ray

from raydd.config import ComputeConfig


def init_ray(compute: ComputeConfig) -> None:
    """Join compute.ray_address / $RAY_ADDRESS if given, else start a local Ray on this machine.
    The local dashboard (if any) binds to 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = compute.ray_address or os.environ.get("RAY_ADDRESS", "")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # the dashboard serves the state API that Ray Train's placement-group cleaner polls; localhost only
        ray.init(num_cpus=compute.num_cpus or None, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True, configure_logging=True, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
