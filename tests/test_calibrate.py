"""python -m raydd.calibrate: the same noises unguided and guided, the guided objective next to the diagnostics."""
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method, key", [("igds", "J"), ("lgd", "S")])
def test_calibration_rows_show_the_guided_objective_rising(method, key, tmp_path, monkeypatch, capsys):
    from raydd.calibrate import main

    monkeypatch.setenv("RAYDD_CACHE", str(tmp_path / "cache"))
    assert main(["--method", method, "--preset", "digits", "--smoke", "--scales", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["scale"] for r in rows] == [0.0, 3.0]
    assert rows[1][key] > rows[0][key]
    assert {"teacher_acc", "diversity", "latent_std"} <= set(rows[0])
