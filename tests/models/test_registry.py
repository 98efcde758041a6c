"""The model space as data: presets map to the modules they built before the registry, the spec resolves and
checks attention × ffn, and nothing outside the registry names a variant."""

import re
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny

from blueberry.models import build_model, count_parameters, registry
from blueberry.overrides import SpecError, load_spec
from blueberry.perf import flops_per_token
from blueberry.spec import ModelSpec

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments/quickstart.json"

# Measured at c61492f (before the registry): (total, active) at the tiny shape, (total, active, FLOPs per token
# at seq_len 128) at the quickstart shape with vocabulary 8192.
BEFORE = {
    "baseline": (27_040, 18_848, 1_705_600, 1_443_456, 9_050_112),
    "mlp": (22_688, 22_688, 1_573_504, 1_573_504, 9_830_400),
    "attention_mlp": (21_360, 21_360, 1_549_760, 1_549_760, 9_682_944),
    "moe": (41_376, 29_088, 2_164_352, 1_771_136, 11_016_192),
    "attention_moe": (40_048, 27_760, 2_140_608, 1_747_392, 10_868_736),
}
MODULES_BEFORE = {  # the block's (attention, feed-forward) classes at c61492f
    "baseline": ("CausalSelfAttention", "TopKMoE"),
    "mlp": ("CausalSelfAttention", "DeepseekV3MLP"),
    "attention_mlp": ("LatentAttention", "DeepseekV3MLP"),
    "moe": ("CausalSelfAttention", "Glm4MoE"),
    "attention_moe": ("LatentAttention", "Glm4MoE"),
}


@pytest.mark.parametrize("variant", list(BEFORE))
def test_the_study_presets_build_what_they_built_before(variant):
    torch.manual_seed(0)
    model = build_model(tiny(variant), VOCAB)
    counts = count_parameters(model)
    block = model.blocks[0]
    assert (type(block.attn).__name__, type(block.ffn).__name__) == MODULES_BEFORE[variant]
    spec = load_spec(QUICKSTART, [f"--model.variant={variant}"])
    with torch.device("meta"):
        quick = build_model(spec.model, 8192)
    quick_counts = count_parameters(quick)
    measured = (counts.total, counts.active, quick_counts.total, quick_counts.active)
    assert (*measured, flops_per_token(quick, 128).total) == BEFORE[variant]


def test_the_new_presets():
    assert (registry.PRESETS["deepseek_moe"].attention, registry.PRESETS["deepseek_moe"].ffn) == ("mha", "deepseek_moe")
    assert (registry.PRESETS["deepseek_v3"].attention, registry.PRESETS["deepseek_v3"].ffn) == ("mla", "deepseek_moe")
    block = build_model(tiny("deepseek_v3"), VOCAB).blocks[0]
    assert (type(block.attn).__name__, type(block.ffn).__name__) == ("LatentAttention", "DeepseekMoE")
    assert type(block.ffn.moe).__name__ == "DeepseekV3MoE"


def test_spec_resolves_presets_and_pairs():
    assert (ModelSpec().variant, ModelSpec().attention, ModelSpec().ffn) == ("baseline", "mha", "topk_moe")
    assert ModelSpec(attention="mla", ffn="deepseek_moe").variant == "deepseek_v3"  # the pair a preset names
    off_grid = ModelSpec(attention="mla", ffn="topk_moe")
    assert off_grid.variant is None and off_grid.label == "mla-topk_moe"
    assert ModelSpec(variant="moe", ffn="glm4_moe").attention == "mha"  # agreeing with the preset is fine
    assert ModelSpec(ffn="mlp").balance == "none" and ModelSpec(ffn="topk_moe").balance == "aux_loss"
    resolved = ModelSpec(variant="attention_moe")
    assert ModelSpec(**resolved.model_dump()) == resolved  # a recorded spec validates to itself


@pytest.mark.parametrize(
    "model, words",
    [
        ({"variant": "mlp", "ffn": "glm4_moe"}, ["variant 'mlp'", "ffn 'mlp'", "'glm4_moe'", "model.ffn"]),
        ({"variant": "baseline", "attention": "mla"}, ["variant 'baseline'", "'mla'", "model.attention"]),
        ({"variant": "gpt5"}, ["gpt5", "deepseek_v3"]),
        ({"ffn": "switch"}, ["switch", "glm4_moe"]),
        ({"ffn": "topk_moe", "balance": "bias_update"}, ["bias_update", "topk_moe"]),
        ({"ffn": "deepseek_moe", "n_experts": 1, "top_k": 1}, ["deepseek_moe", "n_experts >= 2"]),
    ],
)
def test_contradictions_and_unknown_choices_are_clear_errors(tmp_path, model, words):
    path = tmp_path / "spec.json"
    path.write_text(__import__("json").dumps({"model": model}))
    with pytest.raises(SpecError) as err:
        load_spec(path, [])
    message = err.value.render()
    assert str(path) in message and "model" in message
    for word in words:
        assert word in message


def test_report_categories_come_from_the_registry():
    assert registry.category({"variant": "attention_moe"}) == "DeepSeek Attn+MoE"  # runs from before the fields
    assert registry.category({"variant": None, "attention": "mla", "ffn": "topk_moe"}) == "DeepSeek MLA + top-k MoE"
    assert registry.dense_twin(registry.PRESETS["deepseek_v3"]).name == "attention_mlp"


def test_nothing_outside_the_registry_names_a_variant():
    """Presets are named in registry.py only (a component name may serve to look one up); "baseline" as a run
    tag is not a preset name."""
    preset_only = [name for name in registry.PRESETS if name not in registry.FFNS]
    quoted = re.compile(r"""["'](""" + "|".join(preset_only) + r""")["']""")
    offenders = []
    for path in (REPO / "blueberry").rglob("*.py"):
        if path.name == "registry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if (quoted.search(line) and "tag" not in line) or 'startswith("attention_")' in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_reports_group_by_canonical_choices():
    old_run = {"variant": "attention_moe", "attention": None, "ffn": None, "balance": None}  # before the fields
    assert registry.canonical(old_run) == {"variant": "attention_moe", **_old_balance("glm4_moe")}
    recorded = ModelSpec(variant="attention_moe").model_dump()
    assert registry.canonical(recorded) == {"variant": "attention_moe"}  # the preset stands for its choices
    off_grid = ModelSpec(attention="mla", ffn="topk_moe").model_dump()
    assert registry.canonical(off_grid) == {"variant": None, "attention": "mla", "ffn": "topk_moe"}
    no_loss = ModelSpec(variant="moe", balance="none").model_dump()
    assert registry.canonical(no_loss) == {"variant": "moe", "balance": "none"}
    unknown = {"variant": None, "attention": "mla", "ffn": "gelu_mlp"}  # an ffn of another checkout
    assert registry.canonical({**unknown, "balance": "none"}) == registry.canonical(unknown) == unknown
    assert registry.canonical({**unknown, "balance": "aux_loss"}) == {**unknown, "balance": "aux_loss"}


def _old_balance(ffn):
    """Runs from before model.balance added the Switch loss to every routed FFN."""
    return {} if registry.FFNS[ffn].balance == "aux_loss" else {"balance": "aux_loss"}
