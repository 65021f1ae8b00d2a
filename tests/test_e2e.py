"""End to end through the CLIs on a real local Ray and a real SQLite MLflow store (--smoke sizes)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def run_cli(args, env, cwd, timeout=600):
    p = subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory, smoke_cache):
    """One smoke distillation shared by the tests below (trains the smoke backbone once)."""
    import os

    tmp = tmp_path_factory.mktemp("e2e")
    env = dict(os.environ, RAYDD_CACHE=str(smoke_cache), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    rc, out = run_cli(["raydd.distill", "--method", "dit", "--smoke"], env, tmp)
    return {"tmp": tmp, "env": env, "rc": rc, "out": out, "seconds": time.time() - t0}


def assert_accuracy_is_counted(run, student="convnet_d3"):
    """The run's acc_mean is the mean of its students' accuracies in result.json, and each of those is
    (correct test images) / (test images) of the digits smoke split."""
    from raydd.config import load_config
    from raydd.data import load_real

    n_test = len(load_real(load_config("digits", smoke=True).data).test)
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="result.json")
    accs = json.loads(Path(path).read_text())["summary"]["students"][student]["accs"]
    assert run.data.metrics[f"acc_mean/{student}"] == pytest.approx(sum(accs) / len(accs))
    assert all(abs(a * n_test - round(a * n_test)) < 1e-6 for a in accs), (accs, n_test)


def runs(world, **tags):
    mlflow.set_tracking_uri(world["env"]["MLFLOW_TRACKING_URI"])
    filt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(experiment_names=["raydd"], filter_string=filt, output_format="list")


def test_dit_smoke_writes_set_and_one_mlflow_run(world):
    assert world["rc"] == 0, world["out"][-3000:]
    out_dir = world["tmp"] / "outputs" / "digits-dit-ipc2-s0"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["counts"] == [2] * 10 and manifest["method"] == "dit"
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == [str(i) for i in range(10)]
    assert len(list((out_dir / "parquet").glob("class_idx=*/part-0.parquet"))) == 10
    (run,) = runs(world, raydd_run="digits-dit-ipc2-s0")
    assert run.info.status == "FINISHED"
    assert run.data.params["ipc"] == "2" and run.data.params["sampler.steps"] == "8"
    m = run.data.metrics
    assert m["images_per_s"] > 0 and m["time_total_s"] > 0 and m["acc"] == m["acc_mean/convnet_d3"]
    assert_accuracy_is_counted(run)
    tags = run.data.tags
    assert (tags["kind"], tags["method"], tags["preset"], tags["ipc"], tags["seed"], tags["smoke"], tags["split"]) == (
        "distill", "dit", "digits", "2", "0", "true", "test") and "mlflow.source.git.commit" in tags
    params = run.data.params
    assert not any(k.startswith(("methods.", "faults.")) for k in params) and "" not in params.values()
    curve = mlflow.MlflowClient().get_metric_history(run.info.run_id, "curve/convnet_d3/hard/seed0")
    assert len(curve) >= 2 and [p.step for p in curve] == sorted(p.step for p in curve)   # a line, epoch by epoch
    assert {"HLR/convnet_d3", "IOR/convnet_d3", "LRS/convnet_d3", "acc_random/convnet_d3"} <= set(m)
    assert {"distilled/teacher_acc", "distilled/diversity", "distilled/latent_std"} <= set(m)   # set diagnostics
    assert run.data.tags["output_dir"] == str(out_dir)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"distilled_grid.png", "result.json"} <= arts
    cache = world["env"]["RAYDD_CACHE"]
    (backbone,) = [d for d in Path(cache, "backbones").iterdir() if d.is_dir()]
    assert (backbone / "transformer").is_dir() and not (backbone / "state.pt").exists()   # weights saved once
    assert not list(Path(cache, "ray_train").glob("backbones-*"))   # Ray Train's copies gone once cached


def test_training_progress_reaches_the_driver_once(world):
    """Ray Train's print patch copied every worker print to stdout and, as a log record, to stderr."""
    assert world["rc"] == 0, world["out"][-3000:]
    lines = [ln for ln in world["out"].splitlines() if "[syn convnet_d3 hard seed 0] [hard] epoch 1/" in ln]
    assert len(lines) == 1, lines
    assert "Total Progress" not in world["out"]       # no Ray Data progress blocks when stdout is not a terminal


def test_random_smoke_and_rerun_reuses_run(world):
    rc, out = run_cli(["raydd.distill", "--method", "random", "--smoke"], world["env"], world["tmp"])
    assert rc == 0, out[-3000:]
    rc, out = run_cli(["raydd.distill", "--method", "random", "--smoke"], world["env"], world["tmp"])
    assert rc == 0, out[-3000:]
    (run,) = runs(world, raydd_run="digits-random-ipc2-s0")          # re-run reuses the run: not duplicated
    assert run.info.status == "FINISHED" and "acc_mean/convnet_d3" in run.data.metrics


def test_latent_world_guided_method_through_the_cli(world):
    """digits-latent on Ray: the tiny VAE and the latent DiT train as Ray Train jobs, IGDS's guidance decodes
    x0_hat through the VAE on the sampling actor, and the run logs the set diagnostics."""
    rc, out = run_cli(["raydd.distill", "--method", "igds", "--preset", "digits-latent", "--smoke"],
                      world["env"], world["tmp"])
    assert rc == 0, out[-3000:]
    assert "training vaes" in out and "set diagnostics: teacher_acc" in out
    (run,) = runs(world, raydd_run="digits-latent-igds-ipc2-s0")
    assert run.info.status == "FINISHED" and run.data.params["backbone.vae"] == "tiny"
    assert {"distilled/teacher_acc", "distilled/latent_std", "acc_mean/convnet_d3"} <= set(run.data.metrics)


def test_driver_dies_mid_stage_and_between_stages_and_rerun_resumes_identically(world):
    """The driver exits after saving the first sampled unit (mid-stage); the rerun of the same run name
    samples only the other unit and exits once it is saved (the sampling stage is complete, evaluation
    not started: between stages); the third run samples nothing, evaluates, reuses the MLflow run and
    ends with output identical to the uninterrupted run of the same seed."""
    # its own stages (not shared by content with the uninterrupted run it is compared with)
    args = ["raydd.distill", "--method", "dit", "--smoke", "run_name=resume-test", "compute.share_stages=false"]
    rc, out = run_cli(args + ["faults.driver_after=1"], world["env"], world["tmp"])
    assert rc == 3 and "fault injection: driver exits" in out, out[-3000:]
    assert not (world["tmp"] / "outputs" / "resume-test").exists()          # nothing partial marked complete
    # the actor writes each unit itself and may finish the second before the driver's death ends it: remove that
    # one, so that the rerun has a unit to sample (the state of a driver that died with it in flight)
    (stage,) = (world["tmp"] / "outputs" / ".resume-test.work").glob("generate-*")
    assert (stage / "unit-0.npz").exists() or (stage / "unit-1.npz").exists()
    for f in sorted(stage.glob("unit-*.npz"))[1:]:
        f.unlink()
    rc, out = run_cli(args + ["faults.driver_after=1"], world["env"], world["tmp"])
    assert rc == 3 and "1 unit(s) already done, 1 to go" in out, out[-3000:]
    assert not (world["tmp"] / "outputs" / "resume-test").exists()
    rc, out = run_cli(args, world["env"], world["tmp"])
    assert rc == 0, out[-3000:]
    assert "2 unit(s) already done, 0 to go" in out and "evaluating" in out
    from raydd.outputs import read_distilled

    resumed = read_distilled(world["tmp"] / "outputs" / "resume-test")
    calm = read_distilled(world["tmp"] / "outputs" / "digits-dit-ipc2-s0")
    assert resumed.images.equal(calm.images) and resumed.latents.equal(calm.latents)
    (run,) = runs(world, raydd_run="resume-test")
    assert run.info.status == "FINISHED"


def test_ctrl_c_during_evaluation_exits_130_and_the_rerun_finishes(world):
    """Ray Train's fit() turned Ctrl-C into SystemExit: exit code 1, no message, run marked FAILED."""
    import signal

    args = [sys.executable, "-m", "raydd.distill", "--method", "dit", "--smoke", "run_name=ctrl-c"]
    log_path = world["tmp"] / "ctrl-c.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen(args, env=world["env"], cwd=world["tmp"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "evaluating:" not in log_path.read_text() and p.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)                                     # inside the Train job (its start-up alone takes ~10 s)
        assert p.poll() is None, log_path.read_text()[-3000:]
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=120)
    out = log_path.read_text()
    assert rc == 130 and "raydd: interrupted: Ray Train job eval-ctrl-c" in out, out[-3000:]
    (run,) = runs(world, raydd_run="ctrl-c")
    assert run.info.status == "KILLED"
    rc, out = run_cli(args[2:], world["env"], world["tmp"])                  # the same command again
    assert rc == 0, out[-3000:]
    (run,) = runs(world, raydd_run="ctrl-c")
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("where", ["folder", "uri"])
def test_evaluate_any_imagefolder_or_our_output_on_a_uri(world, where):
    out = world["tmp"] / "outputs" / "digits-dit-ipc2-s0"
    folder = str(out / "images") if where == "folder" else f"file://{out}"
    rc, log = run_cli(["raydd.evaluate", folder, "--smoke", "eval.ranking=false"], world["env"], world["tmp"])
    assert rc == 0, log[-3000:]
    (run,) = runs(world, raydd_eval=folder)
    assert_accuracy_is_counted(run)
    if where == "uri":
        assert run.data.params["folder"] == folder and "evaluating file://" in log


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuch"], "unknown method 'nosuch'; allowed: cao2, dit, igds, ims3, lgd, random, rsm_cgs"),
    (["--method", "dit", "ipc=0"], "ipc=0 must be >= 1"),
    (["--method", "dit", "data.classes=1,2,1"], "duplicate classes: ['1']"),
    (["--method", "dit", "data.classes=1,x"], "not found"),
    (["--method", "dit", "--preset", "imagenette"], "data.root must be set"),
    (["--method", "random", "ipc=500"], "larger than the real pool"),
    (["--method", "dit", "backbone.source=/nonexistent/dit"], "DiT source not found: /nonexistent/dit"),
    (["--method", "dit", "compute.ray_address=127.0.0.1:1"], "Ray address '127.0.0.1:1' (compute.ray_address or "
                                                             "RAY_ADDRESS): nothing answers there"),
])
def test_bad_input_fails_fast_with_the_allowed_values(world, args, message):
    t0 = time.time()
    rc, out = run_cli(["raydd.distill", *args, "--smoke"], world["env"], world["tmp"])
    assert rc == 2 and message in out, out[-2000:]
    assert time.time() - t0 < 60


def test_resources_no_node_has_fail_at_once(world):
    """An actor asking for more CPUs than any node has used to wait forever ("pending: 1000 CPU")."""
    t0 = time.time()
    rc, out = run_cli(["raydd.distill", "--method", "dit", "--smoke", "compute.cpus_per_actor=1000",
                       "run_name=too-big"], world["env"], world["tmp"], timeout=180)
    assert rc == 2, out[-2000:]
    assert "compute.cpus_per_actor=1000, but no node of this Ray cluster has 1000 CPU" in out, out[-2000:]
    assert runs(world, raydd_run="too-big") == [] and time.time() - t0 < 60   # checked before the MLflow run


def test_unreachable_mlflow_fails_before_heavy_work(world, tmp_path):
    env = dict(world["env"], MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    t0 = time.time()
    rc, out = run_cli(["raydd.distill", "--method", "dit", "--smoke"], env, tmp_path)
    assert rc == 2 and "MLflow tracking URI 'http://127.0.0.1:9' is unreachable" in out, out[-2000:]
    assert not (tmp_path / "outputs").exists() and time.time() - t0 < 60
