"""raydd on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, real raylets on this machine): a
distillation and its evaluation with the real-data store, the stages and the output on storage URIs (file://), every
Train job that
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


def test_a_distillation_and_its_evaluation_on_two_nodes_with_the_store_stages_and_output_on_uris(tmp_path):
    """A `dit` distillation (a random tiny DiT over ImageNet's 1000 class ids, saved in the diffusers format) with
    the real-data store, the generation stages and the output on file:// URIs: the sampling actors write their units
    to the stage URI, on whichever node they run, and the set is written to and evaluated from the output URI."""
    import ray
    from ray.cluster_utils import Cluster

    from raydd.backbone import save_transformer, tiny_dit

    ray.shutdown()
    root = make_folder(tmp_path / "folder", per_class=(12, 3))
    dit = tmp_path / "dit" / "transformer"
    save_transformer(tiny_dit(1000, 3, 16, hidden_size=32, depth=1, heads=2, patch_size=4), str(dit))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        env = dict(os.environ, RAYDD_CACHE=str(tmp_path / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "raydd.distill", "--method", "dit", "data.dataset=imagefolder",
               f"data.root={root}", f"data.classes={','.join(WNIDS)}", "data.image_size=16", "data.channels=3",
               "data.val_fraction=0.2", f"data.store=file://{tmp_path / 'stores'}", f"compute.ray_address={cluster.address}",
               f"compute.stages=file://{tmp_path / 'stages'}", "compute.batch_size=2",
               f"backbone.source={dit}", "backbone.vae=identity", "sampler.steps=4",
               "ipc=2", "eval.students=[convnet_d1]", "eval.seeds=2", "eval.epochs=2", "eval.teacher_epochs=1",
               "eval.teacher_arch=convnet_d1", f"out_dir=file://{tmp_path / 'outputs'}", "run_name=two-nodes", "--result-json", str(tmp_path / "r.json")]
        p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert len(cluster.list_all_nodes()) == 2
    finally:
        cluster.shutdown()
    (manifest,) = (tmp_path / "stores").glob("*/manifest.json")              # prepared on the URI, complete
    (stage,) = (tmp_path / "stages").glob("generate-*")                     # sampled into the stage URI
    assert sorted(p.name for p in stage.iterdir()) == ["unit-0.npz", "unit-1.npz"]   # 2 classes x IPC 2, by 2
    assert json.loads(manifest.read_text())["counts"] == {"train": [12, 12], "val": [3, 3]}
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["output_dir"] == f"file://{tmp_path / 'outputs'}/two-nodes"
    assert json.loads((tmp_path / "outputs" / "two-nodes" / "manifest.json").read_text())["counts"] == [2, 2]
    assert len(list((tmp_path / "outputs" / "two-nodes" / "images").rglob("*.png"))) == 4
    assert not (tmp_path / "file:").exists() and not list((tmp_path / "cache" / "work").iterdir())   # scratch gone
    run_id = result["run_id"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="result.json"))
                         .read_text())["summary"]
    refs = [j for j in summary["jobs"] if j["kind"] != "syn"]
    assert {j["kind"] for j in refs} == {"real", "random"} and all(j["streamed"] for j in refs)
    assert all(j["eval_streamed"] for j in summary["jobs"])
    (teacher,) = (tmp_path / "cache" / "teachers").glob("*/metrics.json")
    assert json.loads(teacher.read_text())["streamed"] is True
    assert 0.0 <= summary["students"]["convnet_d1"]["acc_mean"] <= 1.0


def test_a_sweep_on_an_autoscaling_cluster_brings_workers_up_and_lets_idle_ones_go(tmp_path, smoke_cache, monkeypatch):
    """Ray's autoscaling simulator (fake nodes: real raylets on this machine, launched by the real autoscaler)
    shaped like cluster/aws.yaml: a head with no CPU and one worker type that starts at zero. Every task, actor
    and Train worker of the sweep needs a worker node, so only the autoscaler answering the sweep's resource
    requests lets it finish; after it, the idle nodes are terminated."""
    import time

    import ray
    from ray.cluster_utils import AutoscalingCluster

    class Simulator(AutoscalingCluster):
        """Ray 2.60's wheel lacks the fake_multi_node/example.yaml that AutoscalingCluster builds its config
        from: the same settings, written out (a fake_multinode provider, no updaters, no setup commands)."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
            empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                     "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                     "rsync_exclude", "rsync_filter")
            return {"cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
                    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                                 "disable_node_updaters": True, "disable_launch_config_check": True},
                    "available_node_types": worker_node_types | {"ray.head.default": {
                        "resources": head_resources, "node_config": {}, "max_workers": 0}},
                    "auth": {}, "upscaling_speed": 1.0, "docker": {}, "file_mounts": {},
                    "file_mounts_sync_continuously": False} | {k: [] for k in empty} | kw

    ray.shutdown()
    # `ray start` / `ray stop` from this interpreter's environment (CI runs .venv/bin/python without activating it)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cluster = Simulator(   # as cluster/aws.yaml: the head schedules nothing, the workers start at zero
        head_resources={"CPU": 0},
        worker_node_types={"cpu.worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                                          "max_workers": 2}},
        idle_timeout_minutes=0.1)                                             # 6 s idle -> terminated
    cluster.start()
    try:
        env = dict(os.environ, RAYDD_CACHE=str(smoke_cache), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", "--trials", "1", "--name", "auto",
               "--storage", f"file://{tmp_path / 'tune'}", "compute.ray_address=auto"]    # a URI, as on a cluster
        p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        ray.init(address="auto")
        workers = [n for n in ray.nodes() if not n["Resources"].get("node:__internal_head__")]
        assert workers, "the sweep ran, so a worker node must have come up"
        end = time.time() + 180
        while any(n["Alive"] for n in ray.nodes() if not n["Resources"].get("node:__internal_head__")) \
                and time.time() < end:
            time.sleep(2)
        alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]
                 and not n["Resources"].get("node:__internal_head__")]
        assert not alive, f"idle worker nodes still up 180 s after the sweep: {alive}"
    finally:
        ray.shutdown()
        cluster.shutdown()
    # Tune's state is on the URI; the sets are under the cache, which the nodes of a real cluster share
    assert (tmp_path / "tune" / "auto").is_dir() and not (tmp_path / "auto").exists()
    sets = smoke_cache / "sweeps" / "auto"
    assert len(list(sets.glob("trials/auto-trial-*/manifest.json"))) == 1 and (sets / "auto-best" / "manifest.json").exists()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (parent,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 'auto'", output_format="list")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_total"] == 1
