import pytest
import torch

from raydd.config import ConfigError, load_config, make_method_config
from raydd.distill import check_method


def test_defaults_and_preset_applied():
    cfg = load_config("digits")
    assert cfg.data.dataset == "digits" and cfg.ipc == 10 and cfg.eval.flip is False
    assert cfg.sampler.steps == 50 and cfg.sampler.cfg_scale == 4.0


def test_smoke_section_and_overrides_win():
    cfg = load_config("digits", ["ipc=3", "eval.students=[convnet_d2,resnetap10]", "sampler.cfg_scale=2"], smoke=True)
    assert cfg.smoke and cfg.sampler.steps == 8          # from the smoke section
    assert cfg.ipc == 3                                    # override beats smoke's ipc=2
    assert cfg.eval.students == ["convnet_d2", "resnetap10"] and cfg.sampler.cfg_scale == 2.0


@pytest.mark.parametrize("override, expected", [
    ("nope=1", "allowed top-level keys"),
    ("data.nope=1", "allowed keys under 'data'"),
    ("ipc=abc", "expected int"),
    ("ipc=0", "ipc=0 must be >= 1"),
    ("ipc=-3", "must be >= 1"),
    ("sampler.scheduler=heun", r"allowed: ddpm, ddim, dpm\+\+, dpm\+\+sde, unipc, euler"),
    ("eval.protocol=medium", "allowed: hard, soft"),
    ("eval.students=[convnet_d3,vit_giant]", "unknown student"),
    ("sampler.steps=5000", "sampler.steps=5000"),
    ("data=3", "is a section"),
    ("ipc", "key=value"),
    ("sampler.cfg_scale=0.5", "must be >= 1"),
    ("compute.cpus_per_actor=-1", "gpus_per_worker and memory_per_worker_gib must be >= 0"),
    ("compute.memory_per_actor_gib=-1", "memory_per_actor_gib, cpus_per_worker"),
    ("eval.real_acc={resnet18: 87.1}", "accuracies are fractions in [0, 1]"),
    ("compute.stages=ftp://host/stages", "allowed: a path, or a URI of file, s3, gs"),
    ("data.latents=true", "data.latents=true needs data.store=DIR_OR_URI and a latent backbone"),
])
def test_bad_overrides_name_the_problem(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_config("digits", [override])


def test_stored_latents_need_a_store_and_a_latent_backbone(tmp_path):
    with pytest.raises(ConfigError, match="backbone.vae='identity'"):
        load_config("digits", ["data.latents=true", f"data.store={tmp_path}"])
    with pytest.raises(ConfigError, match="data.store=''"):
        load_config("digits-latent", ["data.latents=true"])
    assert load_config("digits-latent", ["data.latents=true", f"data.store={tmp_path}"]).data.latents is True


def test_a_stage_location_needs_shared_stages_and_a_path_is_made_absolute(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="with compute.share_stages=false none are shared"):
        load_config("digits", ["compute.stages=s3://bucket/stages", "compute.share_stages=false"])
    monkeypatch.chdir(tmp_path)
    assert load_config("digits", ["compute.stages=stages"]).compute.stages == str(tmp_path / "stages")
    assert load_config("digits", ["compute.stages=s3://bucket/stages"]).compute.stages == "s3://bucket/stages"


def test_unknown_preset_lists_allowed():
    with pytest.raises(ConfigError, match="allowed: digits, digits-latent, imageidc"):
        load_config("cifar")


def test_imagefolder_preset_needs_root():
    with pytest.raises(ConfigError, match="data.root must be set"):
        load_config("imagenette")


def test_method_checks():
    cfg = load_config("digits", method="nosuch")
    with pytest.raises(ConfigError, match="unknown method 'nosuch'; allowed: .*dit.*random"):
        check_method(cfg)
    cfg = load_config("digits", ["dit.beta=3"], method="dit")
    with pytest.raises(ConfigError, match="unknown config key 'dit.beta'"):
        check_method(cfg)
    cfg = load_config("digits", ["nosuch.x=1"], method="dit")
    with pytest.raises(ConfigError, match="unknown method"):
        check_method(cfg)


def test_method_config_coerces_types():
    from dataclasses import dataclass

    @dataclass
    class C:
        lam: float = 1.0
        k: int = 3

    c = make_method_config(C, {"lam": 2, "k": 5}, "m")
    assert c.lam == 2.0 and isinstance(c.lam, float) and c.k == 5
    with pytest.raises(ConfigError, match="'m.k': expected int"):
        make_method_config(C, {"k": 2.5}, "m")


# ---- a method's own settings fail in seconds, before Ray or MLflow start (in-process CLI calls) ----------
@pytest.mark.parametrize("args, message", [
    (["raydd.distill", "--method", "lgd", "lgd.kappa=0"], "lgd.increment and lgd.kappa must be >= 1"),
    (["raydd.distill", "--method", "igds", "igds.mode=bogus"], "igds.mode='bogus'; allowed: full, x0"),
    (["raydd.distill", "--method", "cao2", "cao2.order=random"], "cao2.order='random' is not allowed; allowed: auto"),
    (["raydd.distill", "--method", "ims3", "ims3.ema=1.5"], "ims3.ema=1.5 must be in [0, 1)"),
    (["raydd.distill", "--method", "rsm_cgs", "rsm_cgs.on=bogus"], "rsm_cgs.on='bogus'; allowed"),
    (["raydd.sweep", "--method", "dit", "--storage", "/proc/nope"], "--storage /proc/nope: cannot write there"),
    (["raydd.distill", "--method", "dit", "eval.recipe=idc"], "eval.recipe='idc' is not allowed; allowed: cao2, igd"),
    (["raydd.distill", "--method", "dit", "eval.randaugment=[1]"], "eval.randaugment=[1] must be [num_ops >= 0"),
])
def test_method_settings_and_sweep_storage_fail_before_ray(args, message, capsys, monkeypatch, tmp_path):
    import importlib
    import time

    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    t0 = time.time()
    rc = importlib.import_module(args[0]).main(args[1:])
    assert rc == 2 and message in capsys.readouterr().err
    assert not ray.is_initialized() and time.time() - t0 < 30
    assert not (tmp_path / "mlflow.db").exists()                     # no MLflow run was created


def test_a_search_space_value_the_method_rejects_fails_when_the_space_loads(tmp_path):
    from raydd.config import load_config
    from raydd.tune_space import SpaceError, config_key_validator, load_space

    space = tmp_path / "igds.yaml"
    space.write_text("method: igds\nparams:\n  igds.mode: {type: categorical, choices: [x0, full, bogus], default: x0}\n")
    with pytest.raises(SpaceError, match="igds.mode='bogus'; allowed: full, x0"):
        load_space("igds", space)
    lgd = tmp_path / "lgd.yaml"                                     # valid only for some IPCs: checked on the run's
    lgd.write_text("method: lgd\nparams:\n  lgd.seed_ipc: {type: categorical, choices: [1, 8], default: 1}\n")
    load_space("lgd", lgd, validate_key=lambda k, v: config_key_validator(k, v, run=load_config(overrides=["ipc=10"])))
    with pytest.raises(SpaceError, match="lgd.seed_ipc=8 is larger than ipc=7"):
        load_space("lgd", lgd, validate_key=lambda k, v: config_key_validator(k, v, run=load_config(overrides=["ipc=7"])))


@pytest.mark.parametrize("preset", ["imagenette", "imagewoof", "imageidc", "imagenet100"])
def test_imagenet_presets_evaluate_with_the_papers_convnet6_and_guide_lgd_with_a_student(preset):
    """The papers evaluate 256 px subsets with ConvNet-6 (IDC / Minimax), not ConvNet-5; LGD's θ*, θ_{i−1} are
    an evaluation student there, not a ConvNet-D3 with a 131k-wide head."""
    from raydd.students import create_student

    for smoke in (False, True):
        cfg = load_config(preset, ["data.root=/nowhere"], smoke=smoke)
        assert cfg.eval.students[0] == "convnet_d6" and cfg.methods["lgd"]["arch"] == "resnetap10"
    net = create_student("convnet_d6", 10, 3, 256)
    assert net(torch.zeros(1, 3, 256, 256)).shape == (1, 10)


def test_cli_tells_bad_input_from_bugs():
    """A RayddError (bad input) is one line and exit 2; any other exception is a bug and keeps its traceback."""
    from raydd.distill import run_cli
    from raydd.errors import CheckpointError

    def bad_input():
        raise CheckpointError("checkpoint /x does not fit")

    def bug():
        raise ValueError("shapes [2, 3] and [4] do not broadcast")

    assert run_cli(bad_input) == 2
    with pytest.raises(ValueError, match="broadcast"):
        run_cli(bug)
    with pytest.raises(RuntimeError):
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("actor died")))


def test_presets_extend_a_shared_base_key_by_key():
    """imagenet1k `extends: _imagenet` and overrides only its classes and students: the base's other settings,
    including the rest of its smoke section, still apply; "_" files are bases, not presets."""
    from raydd.config import list_presets

    assert "_imagenet" not in list_presets() and "imagenet1k" in list_presets()
    woof, full = load_config("imagewoof", ["data.root=/x"], smoke=True), load_config("imagenet1k", ["data.root=/x"], smoke=True)
    assert (woof.data.classes, full.data.classes) == ("imagewoof", "imagenet1k")
    assert full.eval.students == ["resnet18"] and woof.eval.students == ["convnet_d6"]
    assert full.ipc == woof.ipc == 1 and full.sampler.steps == woof.sampler.steps == 3
    assert full.methods == woof.methods and full.data.image_size == 256
