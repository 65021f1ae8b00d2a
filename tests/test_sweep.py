"""Sweeps end to end on a real local Ray (2 CPUs), Optuna and an SQLite MLflow store: parent/child runs,
and the best config re-run on test."""
import os
import subprocess
import sys

import mlflow
import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    e = dict(os.environ, RAYDD_CACHE=str(tmp / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
             PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return {"env": e, "tmp": tmp}


def children(uri, parent_id):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["raydd"], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              output_format="list")


def test_four_trials_two_concurrent_with_parent_child_runs(env):
    cmd = [sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", "--trials", "4",
           "--max-concurrent", "2", "--name", "s4", "--storage", str(env["tmp"] / "tune")]
    p = subprocess.run(cmd, env=env["env"], cwd=env["tmp"], capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    uri = env["env"]["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    (parent,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 's4'", output_format="list")
    assert parent.info.status == "FINISHED"
    m = parent.data.metrics
    assert 0 <= m["best_val_acc"] <= 1 and 0 <= m["best_test_acc"] <= 1 and m["trials_total"] == 4
    assert {"best.sampler.cfg_scale", "best.sampler.steps", "sweep.space"} <= set(parent.data.params)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"optuna_history.png", "best.json", "search_space.json"} <= arts
    kids = children(uri, parent.info.run_id)
    trials = [k for k in kids if "raydd_trial" in k.data.tags]
    assert len(trials) == 4 and all("trial.sampler.cfg_scale" in k.data.params for k in trials)
    assert any(k.data.params["trial.sampler.cfg_scale"] == "4.0" for k in trials)     # paper default first
    best = [k for k in kids if k.data.tags.get("raydd_run") == "s4-best"]
    assert len(best) == 1 and best[0].data.params["eval.split"] == "test"           # never tuned on test
    assert all(k.data.params["eval.split"] == "val" for k in trials)
    assert "Trial status" in p.stdout + p.stderr
