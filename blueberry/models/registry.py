"""The model space as data: each attention and feed-forward choice, and the presets (`model.variant`) naming a pair.

Every other part of Blueberry asks this table: the spec validates `model.attention`, `model.ffn`,
`model.variant` and `model.balance` against it, the model builds its blocks from it, the report takes its
category labels from it and the bench its cases. Adding a feed-forward touches its component and an entry in
FFNS; adding a preset an entry in PRESETS (plus an experiment file if the bench measures it at the 512d shape).
The study's sweep files name every preset (sweeps/ablation.yaml, ablation_quick.yaml, cpu/ablation.yaml) and
every attention and feed-forward (factorial.yaml, cpu/factorial.yaml), and tests/sweep/test_sweep_files.py
holds them to that: add a new one there too, or those tests say which file lacks it.

Accounting stays with the modules: an attention module reports `flops_per_token(seq_len)`, a routed
feed-forward exposes `n_experts`, `top_k` and `routed_experts()` (see `BlueberryLM.routed_ffns`).

This module imports no torch code, so validating a spec stays fast; a builder imports its component when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from blueberry.spec import ModelSpec


def _mha(spec: ModelSpec, layer_idx: int) -> nn.Module:
    from .attention import CausalSelfAttention

    return CausalSelfAttention(spec)


def _mla(spec: ModelSpec, layer_idx: int) -> nn.Module:
    from .attention import LatentAttention
    from .configs import deepseek_config

    return LatentAttention(deepseek_config(spec), layer_idx)


def _mlp(spec: ModelSpec) -> nn.Module:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

    from .configs import deepseek_config

    return DeepseekV3MLP(deepseek_config(spec))


def _topk_moe(spec: ModelSpec) -> nn.Module:
    from .feedforward import TopKMoE

    return TopKMoE(spec)


def _glm4_moe(spec: ModelSpec) -> nn.Module:
    from .configs import glm4_config
    from .feedforward import Glm4MoE

    return Glm4MoE(glm4_config(spec))


def _deepseek_moe(spec: ModelSpec) -> nn.Module:
    from .configs import deepseek_moe_config
    from .feedforward import DeepseekMoE

    return DeepseekMoE(deepseek_moe_config(spec))


@dataclass(frozen=True)
class Attention:
    name: str
    label: str  # in report categories
    build: Callable[[ModelSpec, int], nn.Module]  # (spec, layer index) -> module(x, rope) -> y


@dataclass(frozen=True)
class FeedForward:
    name: str
    label: str  # in report categories
    build: Callable[[ModelSpec], nn.Module]  # routed: module(x) -> (y, Routing); else module(x) -> y
    routed: bool  # tokens go to top_k of n_experts routed experts
    balance: str  # default model.balance
    bias_router: bool = False  # a sigmoid router with an `e_score_correction_bias`: model.balance may be bias_update
    transformers_experts: bool = False  # its experts run through model.experts_implementation (the bench compares)
    min_experts: int = 1


@dataclass(frozen=True)
class Preset:
    name: str
    attention: str
    ffn: str
    category: str  # the report's Category column
    bench_spec: str | None = None  # experiments/ file the bench measures it at (512d); None: quickstart shape only


ATTENTIONS = {
    a.name: a
    for a in (
        Attention("mha", "MHA", _mha),
        Attention("mla", "DeepSeek MLA", _mla),
    )
}

FFNS = {
    f.name: f
    for f in (
        FeedForward("mlp", "DeepSeek-V3 SwiGLU MLP", _mlp, routed=False, balance="none"),
        FeedForward("topk_moe", "top-k MoE", _topk_moe, routed=True, balance="aux_loss"),
        # GLM-4's and DeepSeek-V3's routers rank the top-2 scores of each expert group: at least 2 experts.
        # Both balance as their models were trained, by routing-bias updates rather than an auxiliary loss.
        FeedForward(
            "glm4_moe",
            "GLM4 MoE",
            _glm4_moe,
            routed=True,
            balance="bias_update",
            bias_router=True,
            transformers_experts=True,
            min_experts=2,
        ),
        FeedForward(
            "deepseek_moe",
            "DeepSeek-V3 MoE",
            _deepseek_moe,
            routed=True,
            balance="bias_update",
            bias_router=True,
            transformers_experts=True,
            min_experts=2,
        ),
    )
}

PRESETS = {
    p.name: p
    for p in (
        Preset("baseline", "mha", "topk_moe", "Baseline", "baseline.json"),
        Preset("mlp", "mha", "mlp", "DeepSeek MLP", "mlp_512d.json"),
        Preset("attention_mlp", "mla", "mlp", "DeepSeek Attn+MLP", "attention_mlp_512d.json"),
        Preset("moe", "mha", "glm4_moe", "GLM4 MoE", "moe_8e_2k_512d.json"),
        Preset("attention_moe", "mla", "glm4_moe", "DeepSeek Attn+MoE", "attention_moe_8e_2k_512d.json"),
        Preset("deepseek_moe", "mha", "deepseek_moe", "DeepSeek MoE"),
        Preset("deepseek_v3", "mla", "deepseek_moe", "DeepSeek-V3 block"),
    )
}
DEFAULT_PRESET = "baseline"
# The Blueberry report's five variants, in the order its Experiment 1 table ranked them (best first): what
# the report's claims table checks against (blueberry/report/claims.py).
REPORT_RANKING = ("attention_moe", "attention_mlp", "moe", "baseline", "mlp")


def preset_for(attention: str, ffn: str) -> Preset | None:
    """The preset naming this pair, if any."""
    return next((p for p in PRESETS.values() if (p.attention, p.ffn) == (attention, ffn)), None)


CHOICE_FIELDS = ("variant", "attention", "ffn", "balance")


def canonical(model: dict) -> dict:
    """A run's model choices (`CHOICE_FIELDS` of its spec, None where absent) with what they imply left out:
    attention and ffn when a preset names them, the balance when it is the ffn's default. What a report groups
    and labels runs by; a run from before these fields (variant only) balanced with aux_loss."""
    variant, attention, ffn, balance = (model.get(name) for name in CHOICE_FIELDS)
    if variant is None and attention is None and ffn is None:
        variant = DEFAULT_PRESET
    preset = PRESETS.get(variant)
    out = {"variant": variant}
    if preset is None:
        default = PRESETS[DEFAULT_PRESET]
        attention, ffn = attention or default.attention, ffn or default.ffn
        out.update(attention=attention, ffn=ffn)
    else:
        ffn = preset.ffn
    choice = FFNS.get(ffn)
    if choice is None:  # an ffn this checkout does not know (a colleague's, a renamed one): its default unknown,
        # a balance is kept where it balances something, so a dense model of ours does not read as balanced otherwise
        return {**out, "ffn": ffn, **({"balance": balance} if balance not in (None, "none") else {})}
    balance = balance or ("aux_loss" if choice.routed else "none")
    if balance != choice.balance:
        out["balance"] = balance
    return out


def category(model: dict) -> str:
    """Report label of a run's model (its spec's `model` section, possibly from before attention/ffn existed)."""
    preset = PRESETS.get(model.get("variant"))
    if preset is not None:
        return preset.category
    attention, ffn = ATTENTIONS.get(model.get("attention")), FFNS.get(model.get("ffn"))
    return f"{attention.label} + {ffn.label}" if attention and ffn else "—"


def dense_twin(preset: Preset) -> Preset | None:
    """The dense preset with the same attention as a routed one: what the bench compares its step time with."""
    return preset_for(preset.attention, "mlp") if FFNS[preset.ffn].routed else None
