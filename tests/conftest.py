"""Shared fixtures: tiny models saved in the real formats, isolated cache / MLflow per session."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from raydd.config import load_config


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """A random-weight tiny DiT (10 classes, 1x16x16, learned sigma) saved as a diffusers model dir."""
    from raydd.backbone import save_transformer, tiny_dit

    torch.manual_seed(0)
    model = tiny_dit(num_classes=10, channels=1, image_size=16, hidden_size=32, depth=2, heads=2, patch_size=4)
    path = tmp_path_factory.mktemp("tiny_dit") / "transformer"
    save_transformer(model, str(path))
    return str(path)


@pytest.fixture()
def digits_cfg(tiny_dit_dir, tmp_path):
    """The digits preset in smoke size, pointing at the random tiny DiT and a temp cache."""
    cfg = load_config("digits", smoke=True)
    cfg.backbone = dataclasses.replace(cfg.backbone, source=tiny_dit_dir, hidden_size=32, depth=2, heads=2, patch_size=4)
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture()
def spec(digits_cfg):
    from raydd.generate import BackboneSpec

    return BackboneSpec(digits_cfg.backbone, num_classes=10, channels=1, image_size=16, class_ids=list(range(10)))


@pytest.fixture()
def backbone(spec):
    return spec.load("cpu")


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """A RAYDD_CACHE shared by the CLI end-to-end modules: the smoke backbone and reference students are
    trained once per session (cache entries are keyed by their config and completed atomically)."""
    return tmp_path_factory.mktemp("smoke_cache")


@pytest.fixture()
def cli_env(tmp_path):
    """Environment for CLI subprocesses: own cache, own SQLite MLflow store, cwd = tmp_path."""
    env = dict(os.environ)
    env["RAYDD_CACHE"] = str(tmp_path / "cache")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env.pop("RAY_ADDRESS", None)
    return env


def pytest_collection_modifyitems(items):
    """Every test that starts a local Ray carries the `ray` marker (select with -m ray / -m 'not ray')."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
