"""Blueberry models: the decoder LM over the attention × feed-forward space, parameter counts, the causality probe.

Exports load on first use (PEP 562): `blueberry.models.registry` is imported by the spec, which must not pay
for torch and transformers.
"""

from blueberry.lazy_exports import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
