"""The registry of expected tap points, per component: the single list the exporter checks a capture against and
the tests compare. A point the registry names that a run did not record is an error, never a silent pass.

Components register a function ``fn(cfg, st_cfg, settings) -> list[str]`` (config.json dict,
speech_tokenizer/config.json dict, the case settings) with ``@register_taps("component")``.
"""

from __future__ import annotations

from collections.abc import Callable

TapFn = Callable[[dict, dict, dict], list[str]]
REGISTRY: dict[str, TapFn] = {}


def register_taps(component: str) -> Callable[[TapFn], TapFn]:
    def deco(fn: TapFn) -> TapFn:
        if component in REGISTRY:
            raise ValueError(f"tap registry: component {component!r} registered twice")
        REGISTRY[component] = fn
        return fn

    return deco


def expected_taps(component: str, cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    from .cases import all_cases

    all_cases()  # importing the case modules registers every component

    if component not in REGISTRY:
        raise KeyError(f"tap registry: no component {component!r} (have {sorted(REGISTRY)})")
    return REGISTRY[component](cfg, st_cfg, settings)


def missing_taps(expected: list[str], recorded: set[str]) -> list[str]:
    return [t for t in expected if t not in recorded]
