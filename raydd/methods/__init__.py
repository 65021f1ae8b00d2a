"""Methods registry. A method is one file: a `Config` dataclass (paper defaults, a comment per
field) and `run(ctx, cfg) -> DistilledSet`, registered with `@register_method(name, Config)`.
`prepare(ctx, cfg)`, optional: the cached training jobs `run` needs whatever the values a sweep searches
(IGDS's estimator); a sweep calls it once, with all of a node's CPUs, before its trials."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    name: str
    Config: type
    run: Callable[[Any, Any], Any]
    summary: str
    prepare: Callable[[Any, Any], Any] | None = None


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, prepare: Callable[[Any, Any], Any] | None = None):
    def deco(run: Callable) -> Callable:
        doc = (sys.modules[run.__module__].__doc__ or name).strip()
        _METHODS[name] = Method(name, config_cls, run, doc.splitlines()[0], prepare)
        return run
    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(list_methods())}")
    return _METHODS[name]


# importing the method files registers them
from raydd.methods import dit, random, igds, rsm_cgs, cao2, lgd, ims3  # noqa: E402,F401
