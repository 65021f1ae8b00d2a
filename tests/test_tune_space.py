"""Search-space files: loading, defaults, and every validation error (no Ray / Optuna needed)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import pytest

from raydd import tune_space
from raydd.tune_space import SearchSpace, SpaceError, load_space, spaces_dir


def write(tmp_path: Path, text: str, name: str = "dit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def accept_all(name, value):
    """A validate_key that knows every key: isolates spec validation from config keys."""


# --------------------------------------------------------------------------------------------
# The shipped files
# --------------------------------------------------------------------------------------------
def test_spaces_dir_is_next_to_the_package():
    assert spaces_dir() == Path(tune_space.__file__).resolve().parent.parent / "tune_spaces"
    assert (spaces_dir() / "dit.yaml").is_file()


def test_dit_space_loads_with_paper_defaults():
    space = load_space("dit")
    assert isinstance(space, SearchSpace)
    assert space.method == "dit" and space.metric == "val_acc" and space.mode == "max"
    assert space.names() == ["sampler.cfg_scale", "sampler.steps"]
    assert space.defaults() == {"sampler.cfg_scale": 4.0, "sampler.steps": 50}
    cfg, steps = space.params["sampler.cfg_scale"], space.params["sampler.steps"]
    assert (cfg.type, cfg.low, cfg.high, cfg.log) == ("float", 1.0, 8.0, False)
    assert (steps.type, steps.low, steps.high, steps.step) == ("int", 10, 100, 10)
    assert isinstance(steps.default, int) and isinstance(cfg.default, float)


@pytest.mark.parametrize("method", tune_space.list_spaces())
def test_every_shipped_space_starts_from_the_methods_own_defaults(method):
    """A sweep's first trial is the default point: each shipped space's defaults must be the values a plain
    run uses (the method's Config, or the sampler's), except where the Config says "auto" (0 / "auto")."""
    import dataclasses

    from raydd.config import SamplerConfig
    from raydd.methods import get_method

    space = load_space(method)
    assert space.names(), method
    for name, value in space.defaults().items():
        section, field = name.split(".", 1)
        own = getattr(SamplerConfig() if section == "sampler" else get_method(section).Config(), field)
        if own in (0, "auto") and not isinstance(own, bool):
            continue
        assert own == pytest.approx(value) if isinstance(own, float) else own == value, (name, own, value)
    assert dataclasses.is_dataclass(get_method(method).Config())


def test_defaults_equal_the_declared_defaults(tmp_path):
    path = write(tmp_path, """
method: dit
params:
  sampler.cfg_scale: {type: float, low: 0.5, high: 8, log: true, default: 2}
  sampler.steps: {type: int, low: 10, high: 100, default: 37}
  sampler.scheduler: {type: categorical, choices: [ddpm, ddim], default: ddim}
  sampler.clip_x0: {type: categorical, choices: [true, false], default: false}
""")
    space = load_space("dit", path)
    assert space.metric == "val_acc"  # optional: defaults to val_acc
    assert space.defaults() == {"sampler.cfg_scale": 2.0, "sampler.steps": 37,
                                "sampler.scheduler": "ddim", "sampler.clip_x0": False}
    assert space.params["sampler.cfg_scale"].log is True
    assert space.params["sampler.scheduler"].choices == ["ddpm", "ddim"]


def test_yaml_float_exponent_strings_are_numbers(tmp_path):
    # PyYAML reads `1e-4` as a string; a float spec accepts it as the number it means
    path = write(tmp_path, """
method: dit
params:
  sampler.beta_start: {type: float, low: 1e-5, high: 1e-3, log: true, default: 1e-4}
""")
    p = load_space("dit", path).params["sampler.beta_start"]
    assert (p.low, p.high, p.default) == (1e-5, 1e-3, 1e-4)


def test_custom_metric(tmp_path):
    path = write(tmp_path, "method: dit\nmetric: val_top5\nparams:\n"
                           "  sampler.steps: {type: int, low: 10, high: 20, default: 10}\n")
    assert load_space("dit", path).metric == "val_top5"


# --------------------------------------------------------------------------------------------
# Errors: each names the file, the parameter and what is allowed
# --------------------------------------------------------------------------------------------
def test_missing_file_lists_available_methods(tmp_path):
    with pytest.raises(SpaceError, match="no search space for method 'nope'") as e:
        load_space("nope")
    assert "dit" in str(e.value) and "nope.yaml" in str(e.value)

    write(tmp_path, "method: other\nparams: {}\n", name="other.yaml")
    with pytest.raises(SpaceError, match=r"available in .*: other") as e:
        load_space("nope", tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(e.value)


SPEC_ERRORS = [
    # (id, params body, substrings the message must contain)
    ("bad-type", "{type: double, low: 1, high: 2, default: 1}",
     ["type 'double' is not allowed", "float, int, categorical"]),
    ("missing-type", "{low: 1, high: 2, default: 1}", ["type None is not allowed"]),
    ("unknown-spec-key", "{type: float, low: 1, high: 2, default: 1, lo: 0}",
     ["unknown key(s) ['lo']", "allowed: type, low, high, step, log, default"]),
    ("key-of-other-type", "{type: categorical, choices: [1, 2], default: 1, low: 0}",
     ["unknown key(s) ['low'] for type categorical", "allowed: type, choices, default"]),
    ("low-ge-high", "{type: float, low: 8.0, high: 8.0, default: 8.0}", ["low=8.0 must be < high=8.0"]),
    ("low-gt-high-int", "{type: int, low: 100, high: 10, default: 50}", ["low=100 must be < high=10"]),
    ("log-nonpositive", "{type: float, low: 0.0, high: 8.0, log: true, default: 4.0}",
     ["log: true needs low > 0", "low=0.0"]),
    ("log-not-bool", "{type: float, low: 1.0, high: 8.0, log: yes please, default: 4.0}",
     ["'log' must be true or false"]),
    ("int-bounds-float", "{type: int, low: 10.5, high: 100, default: 50}",
     ["low=10.5 must be an integer for type int"]),
    ("int-default-float", "{type: int, low: 10, high: 100, default: 50.5}",
     ["default=50.5 must be an integer for type int"]),
    ("int-bound-bool", "{type: int, low: true, high: 100, default: 50}",
     ["low=True must be an integer"]),
    ("float-bound-text", "{type: float, low: one, high: 8.0, default: 4.0}",
     ["low='one' must be a finite number for type float"]),
    ("step-zero", "{type: int, low: 10, high: 100, step: 0, default: 50}", ["step=0 must be positive"]),
    ("step-negative", "{type: float, low: 1.0, high: 8.0, step: -0.5, default: 4.0}",
     ["step=-0.5 must be positive"]),
    ("step-with-log", "{type: float, low: 1.0, high: 8.0, step: 0.5, log: true, default: 4.0}",
     ["log: true cannot be combined with step=0.5"]),
    ("high-off-grid", "{type: int, low: 10, high: 95, step: 10, default: 50}",
     ["high=95 is not on the grid low=10 + k*step=10"]),
    ("default-off-grid", "{type: int, low: 10, high: 100, step: 10, default: 55}",
     ["default=55 is not on the grid", "allowed: 10, 20, 30, 40, 50, 60, ..., 100"]),
    ("default-above", "{type: float, low: 1.0, high: 8.0, default: 9.0}",
     ["default=9.0 is outside [low=1.0, high=8.0]"]),
    ("default-below-int", "{type: int, low: 10, high: 100, default: 5}",
     ["default=5 is outside [low=10, high=100]"]),
    ("default-missing", "{type: float, low: 1.0, high: 8.0}", ["missing 'default'"]),
    ("low-missing", "{type: float, high: 8.0, default: 4.0}", ["float needs 'low'"]),
    ("choices-empty", "{type: categorical, choices: [], default: a}",
     ["categorical needs a non-empty list 'choices'"]),
    ("choices-missing", "{type: categorical, default: a}", ["categorical needs a non-empty list 'choices'"]),
    ("choices-duplicate", "{type: categorical, choices: [a, a], default: a}", ["'choices' has duplicates"]),
    ("choice-not-scalar", "{type: categorical, choices: [[1, 2], b], default: b}", ["is not a scalar"]),
    ("default-not-a-choice", "{type: categorical, choices: [a, b], default: c}",
     ["default 'c' is not one of the choices ['a', 'b']"]),
    ("bool-is-not-int-choice", "{type: categorical, choices: [0, 1], default: true}",
     ["default True is not one of the choices [0, 1]"]),
    ("spec-not-mapping", "[float, 1, 8]", ["spec must be a mapping"]),
]


@pytest.mark.parametrize("body,expected", [(b, e) for _, b, e in SPEC_ERRORS], ids=[i for i, _, _ in SPEC_ERRORS])
def test_spec_errors_name_file_param_and_allowed_values(tmp_path, body, expected):
    path = write(tmp_path, f"method: dit\nparams:\n  sampler.cfg_scale: {body}\n")
    with pytest.raises(SpaceError) as e:
        load_space("dit", path, validate_key=accept_all)
    msg = str(e.value)
    assert str(path) in msg and "param 'sampler.cfg_scale'" in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


FILE_ERRORS = [
    ("yaml-syntax", "method: dit\nparams: {sampler.steps: [1, 2\n", ["YAML syntax error"]),
    ("not-a-mapping", "- method\n- dit\n", ["expected a mapping with keys method, metric, params"]),
    ("method-mismatch", "method: igds\nparams:\n  sampler.steps: {type: int, low: 1, high: 2, default: 1}\n",
     ["'method' is 'igds' but this file is loaded for method 'dit'"]),
    ("method-missing", "params:\n  sampler.steps: {type: int, low: 1, high: 2, default: 1}\n",
     ["'method' is None"]),
    ("unknown-top-key", "method: dit\nmode: min\nparams:\n  sampler.steps: {type: int, low: 1, high: 2, default: 1}\n",
     ["unknown top-level key(s) ['mode']", "allowed: method, metric, params"]),
    ("params-empty", "method: dit\nparams: {}\n", ["'params' must map at least one config key"]),
    ("params-missing", "method: dit\n", ["'params' must map at least one config key"]),
    ("metric-empty", "method: dit\nmetric: ''\nparams:\n  sampler.steps: {type: int, low: 1, high: 2, default: 1}\n",
     ["'metric' must be a non-empty string"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in FILE_ERRORS], ids=[i for i, _, _ in FILE_ERRORS])
def test_file_errors_name_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as e:
        load_space("dit", path, validate_key=accept_all)
    msg = str(e.value)
    assert str(path) in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_space_error_is_a_value_error():
    assert issubclass(SpaceError, ValueError)


# --------------------------------------------------------------------------------------------
# Parameter names are config keys
# --------------------------------------------------------------------------------------------
def test_unknown_config_key_is_rejected_with_allowed_keys(tmp_path):
    path = write(tmp_path, "method: dit\nparams:\n  sampler.nope: {type: float, low: 1.0, high: 2.0, default: 1.5}\n")
    with pytest.raises(SpaceError) as e:
        load_space("dit", path)
    msg = str(e.value)
    assert str(path) in msg and "param 'sampler.nope'" in msg
    assert "unknown config key 'sampler.nope'" in msg and "cfg_scale" in msg  # the allowed keys


def test_unknown_section_is_rejected(tmp_path):
    path = write(tmp_path, "method: dit\nparams:\n  samplr.cfg_scale.x: {type: float, low: 1.0, high: 2.0, default: 1.5}\n")
    with pytest.raises(SpaceError, match="unknown config key 'samplr.cfg_scale.x'"):
        load_space("dit", path)


def test_param_type_must_fit_the_config_field(tmp_path):
    # sampler.steps is an int field: a continuous float would hand it 37.4 mid-sweep
    path = write(tmp_path, "method: dit\nparams:\n  sampler.steps: {type: float, low: 10, high: 100, default: 50}\n")
    with pytest.raises(SpaceError, match=r"param 'sampler.steps'.*expected int"):
        load_space("dit", path)
    # every categorical choice is checked, not only the default
    path = write(tmp_path, "method: dit\nparams:\n  ipc: {type: categorical, choices: [10, many], default: 10}\n")
    with pytest.raises(SpaceError, match=r"param 'ipc'.*ipc=.many.*expected int"):
        load_space("dit", path)


def test_top_level_config_keys_are_valid(tmp_path):
    path = write(tmp_path, "method: dit\nparams:\n  ipc: {type: categorical, choices: [1, 10, 50], default: 10}\n"
                           "  eval.lr: {type: float, low: 0.001, high: 0.1, log: true, default: 0.01}\n")
    assert load_space("dit", path).defaults() == {"ipc": 10, "eval.lr": 0.01}


def test_custom_validator_errors_become_space_errors(tmp_path):
    seen = []

    def validate(name, value):
        seen.append((name, value))
        if name == "sampler.steps":
            raise ValueError("steps are frozen in this study")

    path = write(tmp_path, "method: dit\nparams:\n  sampler.cfg_scale: {type: float, low: 1.0, high: 8.0, default: 4.0}\n"
                           "  sampler.steps: {type: int, low: 10, high: 100, step: 10, default: 50}\n")
    with pytest.raises(SpaceError, match=r"param 'sampler.steps'.*steps are frozen in this study"):
        load_space("dit", path, validate_key=validate)
    assert seen[0] == ("sampler.cfg_scale", 4.0)  # the default comes first


@dataclasses.dataclass
class _FakeIGDSConfig:
    beta: float = 0.1
    eta: float = 1.0


def _fake_methods_module():
    mod = types.ModuleType("raydd.methods")

    def get_method(name):
        if name != "igds":
            raise KeyError(f"unknown method {name!r}; known: igds")
        return types.SimpleNamespace(Config=_FakeIGDSConfig)

    mod.get_method = get_method
    return mod


def test_method_fields_are_checked_against_the_method_config(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "raydd.methods", _fake_methods_module())
    good = write(tmp_path, "method: igds\nparams:\n  igds.beta: {type: float, low: 0.0, high: 1.0, default: 0.1}\n",
                 name="igds.yaml")
    assert load_space("igds", good).defaults() == {"igds.beta": 0.1}

    bad = write(tmp_path, "method: igds\nparams:\n  igds.betta: {type: float, low: 0.0, high: 1.0, default: 0.1}\n",
                name="igds.yaml")
    with pytest.raises(SpaceError) as e:
        load_space("igds", bad)
    msg = str(e.value)
    assert "param 'igds.betta'" in msg and "unknown config key 'igds.betta'" in msg and "igds.beta" in msg

    other = write(tmp_path, "method: igds\nparams:\n  nomethod.x: {type: float, low: 0.0, high: 1.0, default: 0.1}\n",
                  name="igds.yaml")
    with pytest.raises(SpaceError, match=r"'nomethod' is neither a config section nor a method"):
        load_space("igds", other)


def test_loading_a_space_imports_no_ray_optuna_or_mlflow():
    code = ("import sys; from raydd.tune_space import load_space; load_space('dit'); "
            "print(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(tune_space.__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
