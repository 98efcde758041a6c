"""Blueberry models: five decoder-LM variants, parameter counts and the causality probe."""

from .causality import CausalityError, CausalityReport, assert_causal, causality_probe
from .lm import BlueberryLM, ModelOutput, OptimizerGroups, RouterStats, build_model
from .params import ParamCounts, count_parameters

__all__ = [
    "BlueberryLM",
    "CausalityError",
    "CausalityReport",
    "ModelOutput",
    "OptimizerGroups",
    "ParamCounts",
    "RouterStats",
    "assert_causal",
    "build_model",
    "causality_probe",
    "count_parameters",
]
