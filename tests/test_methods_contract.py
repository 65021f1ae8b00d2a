"""The methods' contract, for every registered method on both embedded worlds: its --smoke configuration
runs through distill's `produce` (method.run, parquet + ImageFolder, set diagnostics) and a student trains
on the result. The pixel world (digits: 1x16x16, clip_x0) and the latent world (digits-latent: RGB 32 px
through a tiny AutoencoderKL, a DiT on 4x8x8 latents, no clipping) run the same code; the latent world is
where a method that treats latents as pixels breaks. In-process (LocalRunner): the Ray paths of each stage
have their own tests, and test_e2e runs the latent world through the CLI."""
import math

import numpy as np
import pytest
import torch

from raydd.config import load_config
from raydd.context import LocalRunner, NullTracker
from raydd.data import load_real
from raydd.distill import produce
from raydd.jobs import evaluate_set, set_source
from raydd.methods import list_methods
from raydd.outputs import read_distilled

SHAPES = {"digits": {"image": (1, 16, 16), "latent": (1, 16, 16)},
          "digits-latent": {"image": (3, 32, 32), "latent": (4, 8, 8)}}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """One cache per world for the module: the smoke DiT, VAE, teacher and the methods' jobs train once."""
    return {p: tmp_path_factory.mktemp(f"cache-{p}") for p in SHAPES}


@pytest.mark.parametrize("preset", sorted(SHAPES))
@pytest.mark.parametrize("method", list_methods())
def test_every_method_smoke_on_both_worlds(method, preset, caches, tmp_path):
    torch.set_num_threads(2)
    cfg = load_config(preset, [f"cache_dir={caches[preset]}", f"out_dir={tmp_path}", "eval.ranking=false"],
                      smoke=True, method=method)
    data = load_real(cfg.data)
    out_dir, n, metrics = produce(cfg, data, LocalRunner(cfg), NullTracker(), tmp_path / "scratch")
    assert n == cfg.ipc * data.num_classes
    s = read_distilled(out_dir)
    assert torch.equal(torch.bincount(s.labels, minlength=10), torch.full((10,), cfg.ipc))
    assert tuple(s.images.shape[1:]) == SHAPES[preset]["image"] and s.images.dtype == torch.uint8
    if method == "random":                                           # real images: no latents
        assert s.latents is None and "distilled/latent_std" not in metrics
    else:
        assert tuple(s.latents.shape[1:]) == SHAPES[preset]["latent"] and torch.isfinite(s.latents.float()).all()
        assert math.isfinite(metrics["distilled/latent_std"]) and metrics["distilled/latent_std"] > 0
    n = len(s.labels)                                                # teacher_acc counts the set's images
    assert abs(metrics["distilled/teacher_acc"] * n - round(metrics["distilled/teacher_acc"] * n)) < 1e-6
    assert np.isfinite(metrics["distilled/diversity"])
    summary = evaluate_set(cfg, set_source(str(out_dir)), LocalRunner(cfg))
    assert len(summary["students"]["convnet_d3"]["accs"]) == cfg.eval.seeds
