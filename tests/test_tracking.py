"""Every MLflow run says where its code came from."""
import subprocess

import mlflow

import raydd
from raydd.config import TrackingConfig
from raydd.tracking import Tracker


def test_runs_carry_raydd_version_and_git_commit(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Tracker(TrackingConfig(uri=uri, experiment="t"), run_name="r", tags={"method": "dit"})
    tags = mlflow.MlflowClient(uri).get_run(run.run_id).data.tags
    assert tags["raydd.version"] == raydd.__version__ != "unknown" and tags["method"] == "dit"
    own = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if own:                                  # the tests run from a git checkout (CI clones it)
        assert tags["mlflow.source.git.commit"].split("-")[0] == own


def test_runs_name_their_command_and_user_for_the_ui(tmp_path, monkeypatch):
    """The MLflow UI's Source and User columns were empty on raydd runs."""
    import getpass

    monkeypatch.setattr("sys.argv", ["/somewhere/raydd/compare.py", "--seeds", "3"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Tracker(TrackingConfig(uri=uri, experiment="t"), run_name="r")
    tags = mlflow.MlflowClient(uri).get_run(run.run_id).data.tags
    assert tags["mlflow.source.name"] == "python -m raydd.compare" and tags["mlflow.user"] == getpass.getuser()
