"""The benchmark harness measures what it says (its numbers are never asserted as targets here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_batching_section_writes_a_curve_per_precision(tmp_path):
    from raydd.generate import cpu_has_bf16

    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "raydd.bench", "--only", "batching", "--smoke", "--no-mlflow",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["machine"]["cpus"] == os.cpu_count() and r["targets"]["batching"] == 5.0
    b = r["batching"]
    for prefix in [""] + (["bf16_"] if cpu_has_bf16() else []):
        curve = {int(k): v for k, v in b[f"{prefix}images_per_s_by_batch"].items()}
        assert sorted(curve) == [1, 4, 16, 32] and all(v > 0 for v in curve.values())
        assert abs(b[f"{prefix}batching_ratio"] - curve[32] / curve[1]) < 1e-9
    assert ("bf16_speedup_at_largest_batch" in b) == cpu_has_bf16()
    assert "batching: images=32" in p.stdout


def test_peak_tree_rss_counts_child_processes():
    """A parent that starts a child holding 300 MiB: the peak covers the child, which tops the list."""
    from raydd.bench import peak_tree_rss

    child = "x = bytearray(300 * 2**20); import time; time.sleep(3)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    rc, rss, pss, secs, top = peak_tree_rss([sys.executable, "-c", parent], dict(os.environ), ".")
    assert rc == 0 and secs >= 3
    assert rss >= 300 / 1024 and pss >= 290 / 1024, (rss, pss)
    assert top[0][1] >= 290 and "bytearray" in top[0][0], top
