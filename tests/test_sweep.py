"""Sweeps end to end on a real local Ray (2 CPUs), Optuna and an SQLite MLflow store: parent/child runs,
and the best config re-run on test."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def env(tmp_path_factory, smoke_cache):
    tmp = tmp_path_factory.mktemp("sweep")
    e = dict(os.environ, RAYDD_CACHE=str(smoke_cache), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
             PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")         # tests count lines that actors print
    e.pop("RAY_ADDRESS", None)
    return {"env": e, "tmp": tmp}


def run(cmd, env, timeout=780):
    """The CLI as a user runs it; a run that hangs fails with the end of its output (inside pytest's own
    900 s limit, which would show nothing)."""
    try:
        return subprocess.run(cmd, env=env["env"], cwd=env["tmp"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") + (e.stderr or "")
        pytest.fail(f"{' '.join(cmd[2:])} still running after {timeout}s:\n{out[-6000:]}")


def children(uri, parent_id):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["raydd"], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              output_format="list")


def test_four_trials_two_concurrent_with_parent_child_runs(env):
    cmd = [sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", "--trials", "4",
           "--max-concurrent", "2", "--name", "s4", "--storage", str(env["tmp"] / "tune")]
    p = run(cmd, env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    uri = env["env"]["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    (parent,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 's4'", output_format="list")
    assert parent.info.status == "FINISHED"
    m = parent.data.metrics
    assert m["trials_total"] == 4
    assert {"best.sampler.cfg_scale", "best.sampler.steps", "sweep.space"} <= set(parent.data.params)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"optuna_history.png", "best.json", "search_space.json", "trials.md"} <= arts
    table = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="trials.md")).read_text()
    assert len(table.strip().splitlines()) == 2 + 4 and "sampler.cfg_scale" in table.splitlines()[0]
    kids = children(uri, parent.info.run_id)
    trials = [k for k in kids if "raydd_trial" in k.data.tags]
    assert len(trials) == 4 and all("sampler.cfg_scale" in k.data.tags["searched"].split(",") for k in trials)
    assert not any(p.startswith(("trial.", "methods.", "faults.")) for k in trials for p in k.data.params)
    # one accuracy name and the same tags on every kind of run (a trial: val; the parent: the test rerun)
    assert all(k.data.tags["kind"] == "trial" and k.data.tags["split"] == "val" and k.data.tags["preset"] == "digits"
               and k.data.tags["smoke"] == "true" for k in trials)
    assert parent.data.tags["method"] == "dit" and parent.data.tags["kind"] == "sweep" and m["acc"] == m["best_test_acc"]
    assert all(k.info.status in ("FINISHED", "KILLED") for k in trials)      # none left RUNNING (KILLED: ASHA)
    assert any(k.info.status == "FINISHED" and k.data.metrics["val_acc"] >= 0 for k in trials)
    assert any(k.data.params["sampler.cfg_scale"] == "4.0" for k in trials)           # paper default first
    assert all(k.data.metrics.get("acc") == k.data.metrics.get("val_acc") for k in trials)
    best = [k for k in kids if k.data.tags.get("raydd_run") == "s4-best"]
    assert len(best) == 1 and best[0].data.params["eval.split"] == "test"           # never tuned on test
    # the parent's figures are the best trial's val_acc and the best configuration's test rerun
    assert any(k.data.metrics.get("val_acc") == pytest.approx(m["best_val_acc"]) for k in trials)
    assert m["best_test_acc"] == pytest.approx(best[0].data.metrics["acc_mean/convnet_d3"])
    assert all(k.data.params["eval.split"] == "val" for k in trials)
    assert "Trial status" in p.stdout + p.stderr


def test_failed_trial_runs_again_and_resumes(env):
    """faults.driver_after=1: the process that samples exits after receiving each new unit. In a trial
    that is the trial's actor, so the trial fails; Tune runs it again (FailureConfig(max_failures=2)) and
    it resumes from its saved units until an attempt finds both done and evaluates. The sampling actor writes
    each unit itself and may finish the second before the trial's death ends it, so that takes two or three
    attempts (1 done, then 2 done; or 2 done at once). The best config's re-run samples in the sweep's driver,
    which the same fault then ends (exit code 3)."""
    cmd = [sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", "--trials", "1", "--name", "f1",
           "--storage", str(env["tmp"] / "tune"), "faults.driver_after=1", "compute.share_stages=false"]
    p = run(cmd, env)
    out = p.stdout + p.stderr
    assert p.returncode == 3, out[-4000:]
    faults = out.count("fault injection: driver exits after saving 1 unit(s)")    # failed attempts + the re-run
    assert faults in (2, 3), out[-4000:]
    assert "2 unit(s) already done, 0 to go" in out                 # the last attempt sampled nothing again
    assert faults == 2 or "1 unit(s) already done, 1 to go" in out
    assert "re-running on the test split" in out                 # the trial finished after two failures
    uri = env["env"]["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    (parent,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 'f1'", output_format="list")
    (trial,) = [k for k in children(uri, parent.info.run_id) if "raydd_trial" in k.data.tags]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(trial.info.run_id).info.status == "FINISHED"          # one child run for 3 attempts
    assert len(client.get_metric_history(trial.info.run_id, "val_acc")) == 3


def test_interrupted_sweep_resumes_without_redoing_finished_trials(env):
    """Ctrl-C (SIGINT to the driver) once the first trial has finished; --resume keeps that trial and the
    parent run, and runs the rest."""
    import signal
    import time

    uri = env["env"]["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    base = [sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", "--trials", "2",
            "--max-concurrent", "1", "--name", "r3", "--storage", str(env["tmp"] / "tune")]
    log = open(env["tmp"] / "r3-first.log", "w")
    p = subprocess.Popen(base, env=env["env"], cwd=env["tmp"], stdout=log, stderr=subprocess.STDOUT)
    client = mlflow.MlflowClient(uri)

    def trials_with(status):
        exp = client.get_experiment_by_name("raydd")
        if exp is None:
            return []
        return [r for r in client.search_runs([exp.experiment_id], "tags.raydd_trial != ''")
                if r.data.tags.get("raydd_run", "").startswith("r3-trial") and r.info.status == status]

    def finished_trials():
        return trials_with("FINISHED")

    # interrupt once the first trial has finished and the second has started (its child run is RUNNING,
    # most likely before its first stage report)
    deadline = time.time() + 600
    while not (finished_trials() and trials_with("RUNNING")) and p.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert p.poll() is None, "the sweep ended before it could be interrupted: " + (env["tmp"] / "r3-first.log").read_text()[-3000:]
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=300)
    first = (env["tmp"] / "r3-first.log").read_text()
    assert rc == 130, first[-4000:]
    assert "--resume" in first
    done = finished_trials()
    (parent,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 'r3'", output_format="list")
    assert parent.info.status == "KILLED" and "best_test_acc" not in parent.data.metrics
    # the trial Ctrl-C stopped, whatever stage it had reached, is not left RUNNING in the UI
    assert [k.info.status for k in children(uri, parent.info.run_id) if k.info.status == "RUNNING"] == []

    again = run(base + ["--resume"], env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    (parent2,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 'r3'", output_format="list")
    assert parent2.info.run_id == parent.info.run_id and parent2.info.status == "FINISHED"   # reused, not duplicated
    assert parent2.data.metrics["trials_total"] == 2 and "finished trials are kept" in again.stdout + again.stderr
    for trial in done:                                     # finished before the interrupt: not run again
        same = [k for k in children(uri, parent.info.run_id) if k.data.tags.get("raydd_trial") == trial.data.tags["raydd_trial"]]
        assert len(same) == 1
        assert len(client.get_metric_history(trial.info.run_id, "val_acc")) == 3     # 3 stages, logged once
        assert client.get_run(trial.info.run_id).info.status == "FINISHED"
    trials = [k for k in children(uri, parent.info.run_id) if "raydd_trial" in k.data.tags]
    assert len(trials) == 2 and all(k.info.status in ("FINISHED", "KILLED") for k in trials)  # KILLED: ASHA stopped it


def test_existing_sweep_name_needs_resume(env):
    cmd = [sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", "--name", "nosuch", "--resume",
           "--storage", str(env["tmp"] / "tune")]
    p = run(cmd, env, timeout=300)
    assert p.returncode == 2 and "no sweep named 'nosuch'" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("args, message", [(["--trials", "0"], "--trials=0 must be >= 1"),
                                           (["--trials", "-1"], "--trials=-1 must be >= 1"),
                                           (["--max-concurrent", "-1"], "--max-concurrent=-1 must be >= 0"),
                                           (["--time-budget", "0"], "--time-budget=0.0 must be > 0"),
                                           (["--space", "/nope/dit.yaml"], "/nope/dit.yaml does not exist"),
                                           (["--space", str(Path(__file__).parents[1] / "tune_spaces" / "cao2.yaml")],
                                            "'method' is 'cao2'")])
def test_bad_sweep_arguments_fail_before_anything_runs(env, args, message):
    """--trials 0 used to mean the default and -1 Tune's "sample forever"."""
    p = run([sys.executable, "-m", "raydd.sweep", "--method", "dit", "--smoke", *args], env, timeout=120)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]


def test_close_stopped_trials_ends_children_left_running(tmp_path):
    """A trial whose process died before its first report (no metrics in Tune's grid, its `finally` never
    ran) leaves its child run RUNNING; once Tune has returned, the sweep marks it KILLED, and nothing else."""
    import dataclasses

    from raydd.config import Config, TrackingConfig
    from raydd.sweep import close_stopped_trials
    from raydd.tracking import Tracker

    tc = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = Tracker(tc, "sw")
    stale = Tracker(tc, "sw-trial-a", parent_run_id=parent.run_id)
    done = Tracker(tc, "sw-trial-b", parent_run_id=parent.run_id)
    done.end("FINISHED")
    other = Tracker(tc, "not-a-child")
    close_stopped_trials(dataclasses.replace(Config(), tracking=tc), "sw", [], parent.run_id)
    status = {name: Tracker.status(tc, t.run_id) for name, t in
              (("parent", parent), ("stale", stale), ("done", done), ("other", other))}
    assert status == {"parent": "RUNNING", "stale": "KILLED", "done": "FINISHED", "other": "RUNNING"}
    assert mlflow.MlflowClient(tc.uri).get_run(stale.run_id).data.tags["raydd_stopped"] == "before its first stage"
