"""Methods registry. A method is one file: a `Config` dataclass (paper defaults, a comment per
field) and `run(ctx, cfg) -> DistilledSet` (or the StagedSet `ctx.generate` returns: its images stay in the
sampling stage's files), registered with `@register_method(name, Config)`.
`check(cfg, run_cfg)`, optional: raises ConfigError for values the Config's types allow but the method does
not (allowed values, ranges, what depends on the run's IPC). raydd.distill.check_method calls it before Ray
or MLflow start, and a sweep's search-space loader calls it for every value a trial can reach.
`prepare(ctx, cfg)`, optional: the cached training jobs `run` needs whatever the values a sweep searches
(IGDS's estimator); a sweep calls it once, with all of a node's CPUs, before its trials."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from raydd.config import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    Config: type
    run: Callable[[Any, Any], Any]
    summary: str
    prepare: Callable[[Any, Any], Any] | None = None
    check: Callable[[Any, Any], None] | None = None


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, prepare: Callable[[Any, Any], Any] | None = None,
                    check: Callable[[Any, Any], None] | None = None):
    def deco(run: Callable) -> Callable:
        doc = (sys.modules[run.__module__].__doc__ or name).strip()
        _METHODS[name] = Method(name, config_cls, run, doc.splitlines()[0], prepare, check)
        return run
    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; allowed: {', '.join(list_methods())}")
    return _METHODS[name]


# importing the method files registers them
from raydd.methods import dit, random, igds, rsm_cgs, cao2, lgd, ims3  # noqa: E402,F401
