"""cluster/*.yaml parse and hold what `ray up` and the KubeRay operator need."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"
ALL_FILES = sorted(CLUSTER_DIR.glob("*.yaml"))
AUTOSCALER_FILES = [CLUSTER_DIR / "aws.yaml", CLUSTER_DIR / "gcp.yaml"]
KUBERAY_FILES = [CLUSTER_DIR / "kuberay-raycluster.yaml", CLUSTER_DIR / "kuberay-rayjob.yaml"]


def load_docs(path: Path) -> list:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def test_expected_files_exist():
    names = {p.name for p in ALL_FILES}
    assert {"aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= names
    assert (CLUSTER_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_cluster_yaml_parses_as_mappings(path):
    for doc in load_docs(path):
        assert isinstance(doc, dict), f"{path.name}: top level must be a mapping"


# --------------------------------------------------------------------------------------------
# Ray autoscaler (`ray up`) configs
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=AUTOSCALER_FILES, ids=lambda p: p.name)
def autoscaler(request):
    (cfg,) = load_docs(request.param)
    return request.param, cfg


def _gpu_types(cfg: dict) -> dict:
    return {name: t for name, t in cfg["available_node_types"].items()
            if (t.get("resources") or {}).get("GPU", 0) > 0}


def test_autoscaler_config_has_launcher_fields(autoscaler):
    path, cfg = autoscaler
    assert isinstance(cfg["cluster_name"], str) and cfg["cluster_name"]
    assert cfg["provider"]["type"] == path.stem  # aws.yaml -> aws, gcp.yaml -> gcp
    assert cfg["provider"]["region"]
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] > 0
    types_ = cfg["available_node_types"]
    assert len(types_) >= 2
    for name, t in types_.items():
        assert isinstance(t["node_config"], dict) and t["node_config"], name
        assert isinstance(t["resources"], dict), name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert cfg["head_node_type"] in types_


def test_autoscaler_head_does_no_work(autoscaler):
    _, cfg = autoscaler
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def test_autoscaler_gpu_workers_scale_from_zero_on_demand_and_spot(autoscaler):
    path, cfg = autoscaler
    gpus = _gpu_types(cfg)
    assert gpus, f"{path.name}: no GPU worker type"
    assert all(t["min_workers"] == 0 for t in gpus.values())
    assert all(t["max_workers"] >= 1 for t in gpus.values())
    if cfg["provider"]["type"] == "aws":
        spot = [n for n, t in gpus.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    else:
        spot = [n for n, t in gpus.items()
                if t["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"
                or t["node_config"].get("scheduling", {}).get("preemptible") is True]
    assert spot, f"{path.name}: no spot/preemptible GPU type"
    assert len(spot) < len(gpus), f"{path.name}: no on-demand GPU type"


def test_autoscaler_installs_raydd_and_uses_token_auth(autoscaler):
    path, cfg = autoscaler
    setup = " ".join(cfg["setup_commands"])
    assert "raydd" in setup and "pip install" in setup
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start  # reach it via `ray dashboard <yaml>` only
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    mounts = cfg["file_mounts"]
    assert mounts.get("~/raydd") == "."  # the synced working tree that setup installs
    assert "~/.ray/auth_token" in mounts  # every node gets the cluster token


def test_autoscaler_nodes_share_raydd_s_cache_on_a_mounted_file_system(autoscaler):
    """Ray Train's checkpoints and raydd's cached models must be at one path every node sees (a local path on
    the head fails the first checkpoint a worker node writes): each host mounts an NFS file system before its
    container starts, the container mounts it at the same path, and RAYDD_CACHE points into it."""
    path, cfg = autoscaler
    options = cfg["docker"]["run_options"]
    (cache,) = [o.split("=", 1)[1] for o in options if o.startswith("-e RAYDD_CACHE=")]
    (volume,) = [o.split()[1] for o in options if o.startswith("-v ")]
    host, inside = volume.split(":")
    assert host == inside and cache.startswith(inside.rstrip("/") + "/"), (volume, cache)
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs" in init and f" {host})" in init, init     # mounted on every host, head included


def test_autoscaler_config_passes_rays_own_schema(autoscaler):
    # the exact check `ray up` runs before it touches the cloud
    from ray.autoscaler._private.util import prepare_config, validate_config

    path, cfg = autoscaler
    validate_config(prepare_config(copy.deepcopy(cfg)))
    broken = copy.deepcopy(cfg)
    broken["available_node_types"][cfg["head_node_type"]]["node_configs"] = {}  # a typo'd key
    with pytest.raises(Exception, match="node_configs"):
        validate_config(prepare_config(broken))


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------
def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.fixture(params=KUBERAY_FILES, ids=lambda p: p.name)
def kuberay(request):
    (doc,) = load_docs(request.param)
    return request.param, doc


def test_kuberay_kinds():
    kinds = {load_docs(p)[0]["kind"] for p in KUBERAY_FILES}
    assert kinds == {"RayCluster", "RayJob"}


def test_kuberay_cluster_spec(kuberay):
    path, doc = kuberay
    assert doc["apiVersion"].startswith("ray.io/")
    assert doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # strings, as KubeRay requires
    containers = head["template"]["spec"]["containers"]
    assert containers and all(c["image"] for c in containers)
    assert any(c.get("name") == "ray-head" for c in containers)


def test_kuberay_gpu_workers_autoscale_from_zero(kuberay):
    path, doc = kuberay
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    assert groups
    gpu_groups = []
    for g in groups:
        assert g["groupName"]
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        for c in g["template"]["spec"]["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert int(limits["nvidia.com/gpu"]) >= 1
                gpu_groups.append(g["groupName"])
    assert gpu_groups, f"{path.name}: no worker group with nvidia.com/gpu limits"


def test_kuberay_pods_share_raydd_s_cache_on_a_read_write_many_claim(kuberay):
    """As on the VMs: every pod, head and workers, mounts one claim and RAYDD_CACHE points into it."""
    _, doc = kuberay
    spec = _cluster_spec(doc)
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            (cache,) = [e["value"] for e in c["env"] if e["name"] == "RAYDD_CACHE"]
            mounted = [m for m in c["volumeMounts"] if m["name"] in claims]
            assert any(cache.startswith(m["mountPath"].rstrip("/") + "/") for m in mounted), (c["name"], cache)
            assert {claims[m["name"]] for m in mounted} == {"raydd-shared"}


def test_kuberay_images_match_the_declared_ray_version(kuberay):
    _, doc = kuberay
    spec = _cluster_spec(doc)
    version = spec["rayVersion"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert f":{version}-" in c["image"], (c["image"], version)


def test_rayjob_runs_the_sweep():
    (doc,) = load_docs(CLUSTER_DIR / "kuberay-rayjob.yaml")
    spec = doc["spec"]
    assert "raydd.sweep" in spec["entrypoint"] and "--method igds" in spec["entrypoint"]
    assert "--storage" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert runtime_env["working_dir"] and runtime_env["pip"]
    assert any("raydd" in p for p in runtime_env["pip"])


# --------------------------------------------------------------------------------------------
# README covers what the brief promises
# --------------------------------------------------------------------------------------------
def test_readme_covers_launch_storage_tracking_gpus_spot_and_auth():
    text = (CLUSTER_DIR / "README.md").read_text()
    for needle in ["ray up cluster/aws.yaml", "ray dashboard", "kubectl apply -f cluster/kuberay-rayjob.yaml",
                   "--storage", "MLFLOW_TRACKING_URI", "mlflow server", "--artifacts-destination",
                   "compute.gpus_per_actor", "compute.gpus_per_worker", "--resume",
                   "RAY_AUTH_MODE=token", "ray get-auth-token --generate"]:
        assert needle in text, needle
