"""Start a local Ray or join an existing cluster."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import ray

from raydd.config import ComputeConfig
from raydd.errors import ClusterError
from raydd.locks import file_lock


def init_ray(compute: ComputeConfig) -> None:
    """Join compute.ray_address / $RAY_ADDRESS if given, else start a local Ray on this machine.
    The local dashboard (if any) binds to 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = compute.ray_address or os.environ.get("RAY_ADDRESS", "")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray Train's controller collects reports and worker-group state every 2 s by default: a report that
        # follows another within 2 s waits for it, and starting a worker group takes several polls. On a
        # Ray started here (its processes inherit this environment), poll every 0.25 s: a fit with three
        # reports went from 17 s to 10 s on 2 CPUs
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # Ray Train replaces `print` in its workers with a copy to stdout plus a log record to stderr, and
        # the driver shows both streams: every progress line of a training loop appeared twice. Keep print.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls (it frees a
        # Train job's CPUs when its controller is killed, e.g. when Tune stops a trial); localhost only.
        # The cleaner finds it through RAY_API_SERVER_ADDRESS, which every Ray process started here
        # inherits: without it, a second local Ray on the machine (two raydd commands at once) makes the
        # lookup fail, the CPUs are never freed and the next Train job waits forever.
        # A free port is only free until someone binds it, and the dashboard binds it seconds after ray.init
        # starts (up to a minute under load): two raydd commands started together both found 8265 free and
        # collided. Local starts on this machine take turns: choose the port, start Ray, wait until the
        # dashboard listens, then let the next one choose.
        with file_lock(Path(tempfile.gettempdir()) / "raydd-local-ray-start.lock"):
            port = _free_port(compute.dashboard_port)
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # address="local": a new Ray, as documented, even when a `ray start` cluster runs on this machine (Ray's
            # own default joins the latest one, and fails there on num_cpus): joining one is compute.ray_address=auto
            ray.init(address="local", num_cpus=compute.num_cpus or None, include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True, configure_logging=True, logging_level="WARNING")
            _wait_listening(port, timeout_s=90)
    ctx = ray.data.DataContext.get_current()
    # on a terminal, Ray Data's progress bars; elsewhere (CI, `ray job logs`, a file) it would print a
    # progress block every 10 s (a review counted 650 lines in the default run's log): there the [raydd] lines are the progress
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    check_fits(compute, joined=bool(address))


def check_fits(compute: ComputeConfig, joined: bool) -> None:
    """An actor or Train worker that asks for more CPUs or GPUs than any node has waits forever (Ray Data
    logs "pending: 4 CPU" and nothing else): fail at once, naming the setting and what the nodes allow. On
    a joined cluster an autoscaler may still add a larger node, so there it is a warning."""
    def refuse(msg: str) -> None:
        if not joined:
            raise ClusterError(msg)
        print(f"[raydd] warning: {msg}; waiting for the autoscaler to add what is missing", flush=True)

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gib = 2 ** 30
    for key, resource, amount in (("cpus_per_actor", "CPU", compute.cpus_per_actor),
                                  ("gpus_per_actor", "GPU", compute.gpus_per_actor),
                                  ("memory_per_actor_gib", "memory", compute.memory_per_actor_gib * gib),
                                  ("cpus_per_worker", "CPU", compute.cpus_per_worker),
                                  ("gpus_per_worker", "GPU", compute.gpus_per_worker),
                                  ("memory_per_worker_gib", "memory", compute.memory_per_worker_gib * gib)):
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if amount > largest:
            unit, scale = (" GiB", gib) if resource == "memory" else ("", 1)
            refuse(f"compute.{key}={amount / scale:g}, but no node of this Ray cluster has {amount / scale:g}"
                   f"{unit} {resource} (the largest has {largest / scale:.3g}{unit}); allowed: 0 to "
                   f"{largest / scale:.3g}")
    for resource, per_worker in (("CPU", compute.cpus_per_worker), ("GPU", compute.gpus_per_worker)):
        total = sum(node.get(resource, 0.0) for node in nodes)     # a Train job's workers start all at once
        if compute.train_workers * per_worker > total:
            refuse(f"compute.train_workers={compute.train_workers} x compute.{resource.lower()}s_per_worker="
                   f"{per_worker:g} needs {compute.train_workers * per_worker:g} {resource}, but this Ray cluster "
                   f"has {total:g}; allowed: compute.train_workers <= {int(total // per_worker)}")


def check_address(address: str) -> None:
    """ray.init retries an address where no Ray listens for minutes (the GCS connection timeouts): try one
    TCP connection to host:port first ("auto" and other forms without a port are left to Ray)."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")           # ray://host:port, host:port
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"Ray address {address!r} (compute.ray_address or RAY_ADDRESS): nothing answers there "
                           f"({e}). Start the cluster (`ray start --head`), fix the address, or leave both unset "
                           f"to start a local Ray") from None


def _wait_listening(port: int, timeout_s: float) -> None:
    """Return once something accepts connections on 127.0.0.1:port (or after timeout_s: Ray then runs without
    its dashboard, which only the state API and the UI need)."""
    import socket

    end = time.time() + timeout_s
    while time.time() < end:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


def _free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it, else a free port the OS picks."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free TCP port on 127.0.0.1")


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def cluster_resources() -> dict:
    return dict(ray.cluster_resources())


def cluster_address() -> str:
    """The running cluster's GCS address, for processes that join it (raydd.compare's distillations)."""
    return ray.get_runtime_context().gcs_address


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
