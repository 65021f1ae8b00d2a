"""raydd on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, real raylets on this machine): a
distillation and its evaluation with the real-data store on a storage URI (file://), every Train job that
trains on the real data streaming it through Ray Data on whichever node it lands (#20)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from test_prepare import WNIDS, make_folder          # tests/ is on sys.path (rootdir-relative imports)

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_a_distillation_and_its_evaluation_on_two_nodes_with_the_store_on_a_uri(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    root = make_folder(tmp_path / "folder", per_class=(12, 3))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        env = dict(os.environ, RAYDD_CACHE=str(tmp_path / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "raydd.distill", "--method", "random", "data.dataset=imagefolder",
               f"data.root={root}", f"data.classes={','.join(WNIDS)}", "data.image_size=16", "data.channels=3",
               "data.val_fraction=0.2", f"data.store=file://{tmp_path / 'stores'}", f"compute.ray_address={cluster.address}",
               "ipc=2", "eval.students=[convnet_d1]", "eval.seeds=2", "eval.epochs=2", "eval.teacher_epochs=1",
               "eval.teacher_arch=convnet_d1", f"out_dir={tmp_path / 'outputs'}", "--result-json", str(tmp_path / "r.json")]
        p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert len(cluster.list_all_nodes()) == 2
    finally:
        cluster.shutdown()
    (manifest,) = (tmp_path / "stores").glob("*/manifest.json")              # prepared on the URI, complete
    assert json.loads(manifest.read_text())["counts"] == {"train": [12, 12], "val": [3, 3]}
    run_id = json.loads((tmp_path / "r.json").read_text())["run_id"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="result.json"))
                         .read_text())["summary"]
    refs = [j for j in summary["jobs"] if j["kind"] != "syn"]
    assert {j["kind"] for j in refs} == {"real", "random"} and all(j["streamed"] for j in refs)
    (teacher,) = (tmp_path / "cache" / "teachers").glob("*/metrics.json")
    assert json.loads(teacher.read_text())["streamed"] is True
    assert 0.0 <= summary["students"]["convnet_d1"]["acc_mean"] <= 1.0
