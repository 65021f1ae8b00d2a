import pytest

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
    ("sampler.scheduler=euler", "allowed: ddpm, ddim"),
    ("eval.protocol=medium", "allowed: hard, soft"),
    ("eval.students=[convnet_d3,vit_giant]", "unknown student"),
    ("sampler.steps=5000", "sampler.steps=5000"),
    ("data=3", "is a section"),
    ("ipc", "key=value"),
    ("sampler.cfg_scale=0.5", "must be >= 1"),
    ("compute.cpus_per_actor=-1", "gpus_per_worker must be >= 0"),
])
def test_bad_overrides_name_the_problem(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_config("digits", [override])


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
