"""Blueberry models: the decoder LM over the attention × feed-forward space, parameter counts, the causality probe.

Exports load on first use (PEP 562): `blueberry.models.registry` is imported by the spec, which must not pay
for torch and transformers.
"""

import importlib

_EXPORTS = {
    "BlueberryLM": "lm",
    "ModelOutput": "lm",
    "OptimizerGroups": "lm",
    "RouterStats": "lm",
    "build_model": "lm",
    "CausalityError": "causality",
    "CausalityReport": "causality",
    "assert_causal": "causality",
    "causality_probe": "causality",
    "ParamCounts": "params",
    "count_parameters": "params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
