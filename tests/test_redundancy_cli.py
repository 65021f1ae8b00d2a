"""python -m raydd.evaluate <folder> --redundancy K: the LGD redundancy diagnostic on any ImageFolder, through
the CLI's own main() on a real local Ray and a real SQLite MLflow store."""
import mlflow
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_redundancy_cli_logs_the_matrix_of_a_folder_of_copies(tmp_path, monkeypatch):
    """Two increments that are the same images: training on one scores ~100 % on the other. The folder is read a
    class at a time into our output format (the driver holds its labels and slots) and goes to the workers as a set
    goes to the students: over raydd.jobs.INLINE_LIMIT (here lowered) streamed, each increment a streamed subset
    (#20: no worker holds a large set; the held path is test_lgd's redundancy_matrix)."""
    import json

    import numpy as np
    import torch

    from raydd import jobs
    from raydd.config import load_config
    from raydd.data import load_real
    from raydd.evaluate import main
    from raydd.outputs import to_pil

    data = load_real(load_config("digits").data)
    for c in range(10):
        (tmp_path / "set" / str(c)).mkdir(parents=True)
        x = data.train.x[data.train.y == c][:2]
        for k, img in enumerate(torch.cat([x, x])):                 # slots 0, 1 and their copies 2, 3
            to_pil(img.numpy()).save(tmp_path / "set" / str(c) / f"{k}.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("RAYDD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(jobs, "INLINE_LIMIT", 10)                     # this set is "large": it streams
    rc = main([str(tmp_path / "set"), "--redundancy", "2", "--smoke", f"tracking.uri={uri}", "eval.epochs=10",
               "compute.num_cpus=2"])
    assert rc == 0
    (run,) = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("raydd")
                                                   .experiment_id])
    m = run.data.metrics
    assert {"redundancy_0_1/convnet_d3", "redundancy_1_0/convnet_d3"} <= set(m)
    client = mlflow.MlflowClient(uri)
    report = json.loads(open(client.download_artifacts(run.info.run_id, "redundancy.json", str(tmp_path))).read())
    assert {r["streamed"] for r in report["jobs"]} == {True}
    assert not list((tmp_path / "cache" / "work").iterdir())            # the converted folder is removed
    assert m["redundancy/convnet_d3"] > 0.8 and np.isclose(
        m["redundancy/convnet_d3"], (m["redundancy_0_1/convnet_d3"] + m["redundancy_1_0/convnet_d3"]) / 2)
