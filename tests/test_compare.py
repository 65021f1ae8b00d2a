"""raydd.compare: the statistics on a hand-made table, bad lists rejected before anything runs, and (slow) a
real comparison on local Ray + SQLite MLflow that a second call reuses whole."""
import json
import math

import mlflow
import pytest

from raydd import compare
from raydd.compare import leaderboard, markdown, t_interval


def rec(method, seed, acc, ipc=10, **extra):
    return {"method": method, "ipc": ipc, "seed": seed, "student": "convnet_d3", "acc": acc} | extra


def test_paired_differences_and_intervals_on_a_hand_made_table():
    records = [rec("dit", 0, 0.80), rec("dit", 1, 0.90), rec("dit", 2, 0.85),
               rec("random", 0, 0.70), rec("random", 1, 0.80), rec("random", 2, 0.75),
               rec("igds", 0, 0.82), rec("igds", 1, 0.93), rec("igds", 2, 0.86, HLR=0.1)]
    rows = {r["method"]: r for r in leaderboard(records)}
    igds = rows["igds"]
    assert igds["n"] == 3 and igds["acc"] == pytest.approx(0.87) and igds["acc_std"] == pytest.approx(0.05567764)
    # paired by seed: d = (0.02, 0.03, 0.01) -> mean 0.02, sd 0.01, t(0.975, 2) = 4.3027
    assert igds["vs_dit"] == pytest.approx(0.02) and igds["vs_dit_ci95"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3))
    # against random the difference is 0.12, 0.13, 0.11: same spread, although the raw accuracies spread 5 points
    assert igds["vs_random"] == pytest.approx(0.12) and igds["vs_random_ci95"] == pytest.approx(igds["vs_dit_ci95"])
    assert math.isnan(rows["dit"]["vs_dit"]) and rows["dit"]["vs_random"] == pytest.approx(0.10)
    assert igds["HLR"] == pytest.approx(0.1) and math.isnan(igds["HLR_std"])       # one value: no spread
    assert math.isnan(t_interval([0.5])[1])
    # a seed the reference lacks is left out of the pairing
    rows = {r["method"]: r for r in leaderboard(records + [rec("igds", 3, 0.50)])}
    assert rows["igds"]["n"] == 4 and rows["igds"]["vs_dit"] == pytest.approx(0.02)
    md = markdown(leaderboard(records))
    assert md.index("| igds") < md.index("| dit") < md.index("| random")           # best first
    assert "2.0 ± 2.5" in md                                                       # vs dit, in points


@pytest.mark.parametrize("args, message", [
    (["--methods", "dit,nosuch"], "--methods: unknown ['nosuch']; allowed: cao2, dit"),
    (["--methods", "dit,dit"], "without repeats"),
    (["--ipc", "1,zero"], "IPCs are integers >= 1"),
    (["--ipc", "0"], "IPCs are integers >= 1"),
    (["--seeds", "0"], "--seeds=0 must be >= 1"),
    (["--parallel", "-1"], "--parallel=-1 must be >= 0"),
    (["--methods", "dit,cao2", "cao2.m=-1"], "cao2.m"),
    (["--methods", "dit", "ipc=x"], "ipc"),
])
def test_bad_lists_fail_before_ray_or_mlflow(args, message, capsys, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    assert compare.main(args) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "compare").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_compare_runs_each_distillation_once_and_logs_a_parent_with_children(tmp_path, monkeypatch, smoke_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYDD_CACHE", str(smoke_cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["--smoke", "--methods", "dit,random", "--seeds", "2", "--name", "cmp", "eval.ranking=false"]
    assert compare.main(args) == 0
    out = tmp_path / "compare" / "cmp"
    records = sorted(json.loads(p.read_text())["run_id"] for p in (out / "runs").glob("*.json"))
    assert len(records) == 4
    client = mlflow.MlflowClient()
    (parent,) = mlflow.search_runs(experiment_names=["raydd"], filter_string="tags.raydd_run = 'cmp'",
                                   output_format="list")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raydd_compare"] == "dit,random" and parent.data.tags["smoke"] == "True"
    assert parent.data.tags["preset"] == "digits" and "mlflow.source.git.commit" in parent.data.tags
    kids = mlflow.search_runs(experiment_names=["raydd"], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.info.run_id for k in kids) == records
    # the local Ray has 2 CPUs and a distillation 1 actor of 1 CPU: two ran at once, each logging to its own file
    spans = sorted((k.info.start_time, k.info.end_time) for k in kids)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert len(list((out / "logs").glob("*.log"))) == 4
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "leaderboard.md", "leaderboard.csv", "accuracy_vs_ipc.png", "grid.png"}
    rows = {r.split(",")[2]: r for r in (out / "leaderboard.csv").read_text().splitlines()[1:]}
    assert set(rows) == {"dit", "random"}
    dit = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    accs = [r["metrics"]["acc_mean/convnet_d3"] for r in dit if r["method"] == "dit"]
    assert parent.data.metrics["acc/dit/ipc2/convnet_d3"] == pytest.approx(sum(accs) / 2)
    # the same command again: every distillation reused, nothing new in MLflow
    assert compare.main(args) == 0
    kids2 = mlflow.search_runs(experiment_names=["raydd"], output_format="list",
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.info.run_id for k in kids2) == records
    assert len(mlflow.search_runs(experiment_names=["raydd"], output_format="list")) == 5


def test_image_grid_is_labelled_and_sized_to_the_set():
    """The grid every run logs: no blank columns below IPC 10, 256 px images not upscaled, the class names
    written left of their rows."""
    import numpy as np
    import torch

    from raydd.outputs import image_grid

    y = torch.arange(10).repeat_interleave(2)                              # IPC 2
    big = image_grid(torch.zeros(20, 3, 256, 256, dtype=torch.uint8), y, names=["n01440764"] * 10, gap=2)
    assert big.shape == (2 + 10 * 258, 84 + 2 + 2 * 258, 3)                # 2 columns, 1:1, a label column
    small = image_grid(torch.full((20, 1, 16, 16), 255, dtype=torch.uint8), y, names=[str(i) for i in range(10)])
    assert small.shape[0] == 2 + 10 * 66                                    # 16 px digits shown at 64 px
    assert (small[:, :84] < 128).any() and not (image_grid(torch.full((20, 1, 16, 16), 255, dtype=torch.uint8), y)
                                                 < 128).any()                # the names are the only dark pixels
    assert np.array_equal(small[2:66, 86:150], np.full((64, 64, 3), 255))  # the first tile, scaled
