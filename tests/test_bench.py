"""The benchmark harness measures what it says (its numbers are never asserted as targets here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from raydd.config import SamplerConfig


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


def test_flop_count_of_dit_xl2_matches_the_paper():
    """FlopCounterMode on the meta device: DiT-XL/2 at 256 px is 118.6 GMACs in the DiT paper (237 GFLOP)."""
    from raydd.bench import DIT_XL_2, SD_VAE, count_flops

    dit, vae = count_flops(DIT_XL_2, SD_VAE, 256)
    assert 236e9 < dit < 238.5e9, dit
    assert 0.55e12 < vae < 0.7e12, vae


def test_gpu_section_runs_shrunk_on_cpu():
    """The GPU section's code path (never run here at full size: no GPU) with a tiny DiT and VAE on CPU."""
    from raydd.bench import bench_gpu

    tiny, vae = {"hidden_size": 64, "depth": 2, "heads": 2, "patch_size": 2}, {"block_out_channels": (32, 32),
                                                                                "layers_per_block": 1}
    r = bench_gpu(steps=2, batch=2, compile_model=False, device="cpu", arch=tiny, vae_arch=vae, image_size=32,
                  matmul_n=256)
    assert r["fp32_images_per_s"] > 0 and r["bf16_images_per_s"] > 0 and "tf32_images_per_s" not in r
    assert abs(r["limit_images_per_s"] - r["matmul_bf16_tflops"] * 1e12 / r["flop_per_image"]) < 1e-6 * r["limit_images_per_s"]
    best = max(r["fp32_images_per_s"], r["bf16_images_per_s"])
    assert abs(r["gpu_fraction_of_limit"] - best / r["limit_images_per_s"]) < 1e-12
    if not torch.cuda.is_available():
        assert bench_gpu(steps=2, batch=2, compile_model=False)["skipped"] == "no CUDA device"


def test_schedulers_section_rates_every_setting_of_both_worlds():
    from raydd.bench import bench_schedulers

    out = bench_schedulers(4, [("ddpm", 50), ("dpm++", 10), ("euler", 10)])
    assert set(out["digits"]["images_per_s"]) == {"ddpm-50", "dpm++-10"}          # euler cannot clip: skipped
    assert set(out["digits-latent"]["images_per_s"]) == {"ddpm-50", "dpm++-10", "euler-10"}
    assert out["digits-latent"]["speedup_vs_ddpm50"]["ddpm-50"] == 1.0
    assert all(v > 0 for w in ("digits", "digits-latent") for v in out[w]["images_per_s"].values())


@pytest.mark.slow
@pytest.mark.ray
def test_startup_section_splits_an_actors_start_into_its_parts(tmp_path):
    """Each part of the start-up is measured (positive), the parts of the actor's path add up to the whole, and
    a sampling stage costs more than the warm sampling it contains."""
    from raydd.bench import bench_startup, tiny_spec

    r = bench_startup(tiny_spec(tmp_path), SamplerConfig(steps=4, cfg_scale=4.0, clip_x0=True))
    parts = ("actor_to_constructor_s", "actor_model_load_s", "actor_first_unit_s")
    assert all(r[k] > 0 for k in parts + ("import_torch_s", "import_raydd_sampling_s", "sample_unit_warm_s",
                                          "stage_s", "train_fit_s"))
    assert sum(r[k] for k in parts) == pytest.approx(r["actor_to_first_unit_s"])
    assert r["stage_overhead_s"] == pytest.approx(r["stage_s"] - r["sample_unit_warm_s"]) and r["stage_overhead_s"] > 0


def test_prepare_section_times_each_source_of_the_same_images(tmp_path):
    """prepare_rates on a tiny folder: each source (the folder, its WebDataset shards, its parquet files) prepares
    into its own store of the same counts, and each gets a rate."""
    import json

    from raydd.bench import prepare_rates
    from raydd.realarch import write_imagefolder

    write_imagefolder(tmp_path / "folder", ["n01440764", "n02102040"], train=3, val=1, size=32)
    r = prepare_rates(tmp_path / "folder", tmp_path / "stores", ("imagefolder", "webdataset", "huggingface"))
    assert r["images"] == 8
    for key in ("prepare", "prepare_webdataset", "prepare_huggingface"):
        assert r[f"{key}_images_per_s"] > 0 and r[f"{key}_over_pil_pool"] > 0
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "stores").glob("*/manifest.json")]
    assert len(manifests) == 3 and {str(m["counts"]) for m in manifests} == {str({"train": [3, 3], "val": [1, 1]})}
