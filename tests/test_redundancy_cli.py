"""python -m raydd.evaluate <folder> --redundancy K: the LGD redundancy diagnostic on any ImageFolder, through
the CLI's own main() on a real local Ray and a real SQLite MLflow store."""
import mlflow
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_redundancy_cli_logs_the_matrix_of_a_folder_of_copies(tmp_path, monkeypatch):
    """Two increments that are the same images: training on one scores ~100 % on the other."""
    import numpy as np
    import torch

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
    rc = main([str(tmp_path / "set"), "--redundancy", "2", "--smoke", f"tracking.uri={uri}", "eval.epochs=30",
               "compute.num_cpus=2"])
    assert rc == 0
    (run,) = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("raydd")
                                                   .experiment_id])
    m = run.data.metrics
    assert {"redundancy_0_1/convnet_d3", "redundancy_1_0/convnet_d3"} <= set(m)
    assert m["redundancy/convnet_d3"] > 0.8 and np.isclose(
        m["redundancy/convnet_d3"], (m["redundancy_0_1/convnet_d3"] + m["redundancy_1_0/convnet_d3"]) / 2)
