"""Starting a local Ray: two raydd commands started at the same moment must not collide on the dashboard port."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CODE = """
import os, sys
from raydd.config import ComputeConfig
from raydd.distributed.cluster import init_ray, shutdown
init_ray(ComputeConfig(num_cpus=1, dashboard_port=int(sys.argv[1])))
print("PORT", os.environ["RAY_API_SERVER_ADDRESS"].rsplit(":", 1)[1], flush=True)
shutdown()
"""


def test_two_local_rays_started_together_get_different_dashboard_ports():
    from raydd.distributed.cluster import _free_port

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    preferred = str(_free_port(0))            # free now, and both commands prefer it (as both preferred 8265)
    procs = [subprocess.Popen([sys.executable, "-c", CODE, preferred], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    ports = [next(line.split()[1] for line in out.splitlines() if line.startswith("PORT")) for out, _ in outs]
    assert ports[0] != ports[1] and preferred in ports, (preferred, ports)


def test_a_local_start_starts_its_own_ray_even_where_ray_start_left_a_cluster_address(tmp_path):
    """Ray's ray.init() without an address joins the cluster named in <temp dir>/ray/ray_current_cluster (what
    `ray start` writes) and there refused num_cpus; raydd's local start (no compute.ray_address, no RAY_ADDRESS)
    starts its own Ray, as documented."""
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="rl", dir="/tmp")          # Ray's socket paths must stay under 108 bytes
    try:
        (Path(short) / "ray").mkdir()
        (Path(short) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")   # a `ray start` cluster's address
        env = dict(os.environ, RAY_TMPDIR=short)
        env.pop("RAY_ADDRESS", None)
        code = ("import ray\nfrom raydd.config import ComputeConfig\nfrom raydd.distributed.cluster import init_ray, "
                "shutdown\ninit_ray(ComputeConfig(num_cpus=1))\nprint('CPUS', ray.cluster_resources()['CPU'], "
                "flush=True)\nshutdown()\n")
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "CPUS 1.0" in p.stdout, (p.stdout + p.stderr)[-2000:]
    finally:
        shutil.rmtree(short, ignore_errors=True)
