"""Starting a local Ray: two raydd commands started at the same moment must not collide on the dashboard port."""
import os
import subprocess
import sys

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
