"""Search spaces for sweeps: `tune_spaces/<method>.yaml` -> a validated `SearchSpace`.

Plain Python + YAML on purpose (no Ray, Optuna or MLflow here): the sweep turns a `SearchSpace`
into Optuna distributions at the edge. A file looks like

    method: dit
    metric: val_acc          # optional, default val_acc; always maximised
    params:                  # names are config keys, exactly as in `key=value` overrides
      sampler.cfg_scale: {type: float, low: 1.0, high: 8.0, default: 4.0}   # optional log: true
      sampler.steps:     {type: int, low: 10, high: 100, step: 10, default: 50}
      some.key:          {type: categorical, choices: [a, b], default: a}

Each `default` is the paper's value; the sweep evaluates the defaults as its first trial.
Everything is checked on load and every error names the file, the parameter and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from raydd.errors import RayddError

TYPES = ("float", "int", "categorical")
TOP_KEYS = ("method", "metric", "params")
SPEC_KEYS = {  # keys a parameter spec may have, by type
    "float": ("type", "low", "high", "step", "log", "default"),
    "int": ("type", "low", "high", "step", "log", "default"),
    "categorical": ("type", "choices", "default"),
}
DEFAULT_METRIC = "val_acc"

KeyValidator = Callable[[str, Any], None]  # (config key, value) -> None, raises ValueError if invalid


class SpaceError(RayddError, ValueError):
    """A search-space file is missing or invalid; the message names the file and the parameter."""


@dataclass
class Param:
    name: str                      # config key, e.g. "sampler.cfg_scale" or "igds.beta"
    type: str                      # "float" | "int" | "categorical"
    low: float | int | None = None   # float/int: inclusive bounds
    high: float | int | None = None
    step: float | int | None = None  # float/int: grid spacing from `low` (None = continuous / 1 for int)
    log: bool = False              # float/int: sample on a log scale (needs low > 0)
    choices: list | None = None    # categorical: the allowed values
    default: Any = None            # the paper's value: the first trial


@dataclass
class SearchSpace:
    method: str
    metric: str = DEFAULT_METRIC   # reported by every trial on the validation split
    params: dict[str, Param] = field(default_factory=dict)
    mode: str = "max"              # the metric is an accuracy: always maximised

    def defaults(self) -> dict[str, Any]:
        """The paper's defaults, `{config key: value}`: evaluated as the first trial."""
        return {name: p.default for name, p in self.params.items()}

    def names(self) -> list[str]:
        return list(self.params)


def spaces_dir() -> Path:
    """`<repo>/tune_spaces`, next to the raydd package."""
    return Path(__file__).resolve().parent.parent / "tune_spaces"


def list_spaces(directory: str | Path | None = None) -> list[str]:
    """Methods that have a search-space file."""
    d = Path(directory) if directory is not None else spaces_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_space(method: str, path: str | Path | None = None,
               validate_key: KeyValidator | None = None) -> SearchSpace:
    """Load and validate `tune_spaces/<method>.yaml` (or `path`).

    validate_key(name, value) must raise ValueError for a key the config does not know or a value
    it rejects; it is called with each parameter's default and bounds (or each choice).
    None = `config_key_validator` (raydd.config keys; `<method>.<field>` against the method's Config).
    """
    path = Path(path) if path is not None else spaces_dir() / f"{method}.yaml"
    if not path.is_file():
        known = list_spaces(path.parent)
        raise SpaceError(f"no search space for method {method!r}: {path} does not exist; "
                         f"available in {path.parent}: {', '.join(known) or '(none)'}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: YAML syntax error: {e}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")

    unknown = sorted(set(raw) - set(TOP_KEYS), key=str)
    if unknown:
        raise SpaceError(f"{path}: unknown top-level key(s) {unknown}; allowed: {', '.join(TOP_KEYS)}")
    if raw.get("method") != method:
        raise SpaceError(f"{path}: 'method' is {raw.get('method')!r} but this file is loaded for "
                         f"method {method!r}; set `method: {method}`")
    metric = raw.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise SpaceError(f"{path}: 'metric' must be a non-empty string (default {DEFAULT_METRIC}), got {metric!r}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{path}: 'params' must map at least one config key to a spec, "
                         f"e.g. `sampler.cfg_scale: {{type: float, low: 1.0, high: 8.0, default: 4.0}}`")

    validate_key = validate_key or config_key_validator
    space = SearchSpace(method=method, metric=metric)
    for name, spec in params.items():
        where = f"{path}: param {name!r}"
        if not isinstance(name, str) or not name:
            raise SpaceError(f"{path}: parameter names must be config keys (strings), got {name!r}")
        param = _parse_param(name, spec, where)
        for value in _probe_values(param):
            try:
                validate_key(name, value)
            except ValueError as e:
                raise SpaceError(f"{where}: not a valid config key/value ({name}={value!r}): {e}") from None
        space.params[name] = param
    return space


# --------------------------------------------------------------------------------------------
# One parameter spec
# --------------------------------------------------------------------------------------------
def _parse_param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: spec must be a mapping like {{type: float, low: .., high: .., default: ..}}, "
                         f"got {spec!r}")
    typ = spec.get("type")
    if typ not in TYPES:
        raise SpaceError(f"{where}: type {typ!r} is not allowed; allowed: {', '.join(TYPES)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS[typ]), key=str)
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {unknown} for type {typ}; "
                         f"allowed: {', '.join(SPEC_KEYS[typ])}")
    if "default" not in spec:
        raise SpaceError(f"{where}: missing 'default' (the paper's value, evaluated as the first trial)")
    if typ == "categorical":
        return _parse_categorical(name, spec, where)
    return _parse_numeric(name, typ, spec, where)


def _parse_categorical(name: str, spec: dict, where: str) -> Param:
    choices, default = spec.get("choices"), spec["default"]
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{where}: categorical needs a non-empty list 'choices', got {choices!r}")
    for c in choices:  # what Optuna's CategoricalDistribution accepts
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise SpaceError(f"{where}: choice {c!r} is not a scalar (str, int, float, bool or null)")
    if len({(type(c), c) for c in choices}) != len(choices):
        raise SpaceError(f"{where}: 'choices' has duplicates: {choices}")
    if not any(_same(c, default) for c in choices):
        raise SpaceError(f"{where}: default {default!r} is not one of the choices {choices}")
    return Param(name=name, type="categorical", choices=list(choices), default=default)


def _parse_numeric(name: str, typ: str, spec: dict, where: str) -> Param:
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{where}: {typ} needs '{key}'")
    low = _number(spec["low"], typ, where, "low")
    high = _number(spec["high"], typ, where, "high")
    step = None if spec.get("step") is None else _number(spec["step"], typ, where, "step")
    default = _number(spec["default"], typ, where, "default")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: 'log' must be true or false, got {log!r}")

    if not low < high:
        raise SpaceError(f"{where}: low={low} must be < high={high}")
    if log and low <= 0:
        raise SpaceError(f"{where}: log: true needs low > 0, got low={low}")
    if step is not None:
        if step <= 0:
            raise SpaceError(f"{where}: step={step} must be positive")
        if log and not (typ == "int" and step == 1):  # Optuna: log and step do not combine
            raise SpaceError(f"{where}: log: true cannot be combined with step={step} (drop one of them)")
        if not _on_grid(high, low, step):
            raise SpaceError(f"{where}: high={high} is not on the grid low={low} + k*step={step}")
    if not low <= default <= high:
        raise SpaceError(f"{where}: default={default} is outside [low={low}, high={high}]")
    if step is not None and not _on_grid(default, low, step):
        raise SpaceError(f"{where}: default={default} is not on the grid low={low} + k*step={step}; "
                         f"allowed: {_grid_preview(low, high, step)}")
    return Param(name=name, type=typ, low=low, high=high, step=step, log=log, default=default)


def _number(value: Any, typ: str, where: str, key: str) -> float | int:
    """An int for int params; a float for float params (YAML's `1e-4` is a string: accept it)."""
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpaceError(f"{where}: {key}={value!r} must be an integer for type int")
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{where}: {key}={value!r} must be a finite number for type float")
    return float(value)


def _on_grid(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))


def _grid_preview(low: float, high: float, step: float, n: int = 6) -> str:
    count = int(round((high - low) / step)) + 1
    values = [low + i * step for i in range(min(count, n))]
    text = ", ".join(f"{v:g}" for v in values)
    return text + (f", ..., {high:g}" if count > n else "")


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (YAML choices mix bools and numbers)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _probe_values(p: Param) -> list[Any]:
    """Values the config key must accept: the default and every value a trial can reach."""
    if p.type == "categorical":
        return [p.default] + [c for c in p.choices if not _same(c, p.default)]
    values = [p.default, p.low, p.high]
    if p.type == "float" and p.step is None:
        # a continuous float's samples are not integers: an int config key must reject them here,
        # not halfway through a sweep (1/pi puts the probe off any round grid)
        values.append(p.low + (p.high - p.low) / math.pi)
    return values


# --------------------------------------------------------------------------------------------
# Default key validator: raydd.config's keys, and a method's own Config fields
# --------------------------------------------------------------------------------------------
def config_key_validator(name: str, value: Any, run: Any = None) -> None:
    """Raise ValueError unless `name=value` is a valid override.

    Keys whose first part is a field of `raydd.config.Config` go through `config.set_key` (unknown
    keys and wrong types raise ConfigError, a ValueError). `<method>.<field>` keys are checked
    against the method's `Config` dataclass when `raydd.methods.get_method` is importable, and by the
    method's own `check` (allowed values, ranges), on top of the run config `run` (the sweep's base:
    its IPC and the method's other settings; default: the dataclass defaults).
    """
    from raydd import config as C

    top = {f.name for f in dataclasses.fields(C.Config)} - {"methods"}
    parts = name.split(".")
    if parts[0] in top:
        C.set_key(C.Config(), name, value)
        return
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"unknown config key {name!r}; allowed: a config key under "
                         f"{', '.join(sorted(top))}, or <method>.<field> for a method's own settings")
    try:
        from raydd.methods import get_method
    except ImportError:  # no method registry available: the method validates its fields at run time
        return
    method, fld = parts
    try:
        entry = get_method(method)
    except (KeyError, ValueError) as e:
        raise ValueError(f"unknown config key {name!r}: {method!r} is neither a config section nor a "
                         f"method ({e})") from None
    method_cfg = getattr(entry, "Config", None)
    if method_cfg is None or not dataclasses.is_dataclass(method_cfg):
        return
    run = run if run is not None else C.Config(method=method)
    mcfg = C.make_method_config(method_cfg, dict(run.methods.get(method, {})) | {fld: value}, method)
    if getattr(entry, "check", None) is not None:
        entry.check(mcfg, run)
