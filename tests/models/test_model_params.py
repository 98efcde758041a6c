"""Parameter counts against hand arithmetic at the study shape (the study's 49,152-token vocabulary, 512d, 3 layers),
built on the meta device."""

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from blueberry.models import build_model, count_parameters, registry
from blueberry.models.lm import deepseek_config
from blueberry.spec import VARIANTS, ModelSpec, TrainSpec
from blueberry.train.optim import build_optimizers, optimizer_split

V, D, L, E, K, F_EXPERT, D_FF = 49_152, 512, 3, 8, 2, 1_024, 2_048


def study(variant: str) -> ModelSpec:
    return ModelSpec(
        variant=variant,
        d_model=D,
        n_layers=L,
        n_heads=8,
        n_experts=E,
        top_k=K,
        expert_d_ff=F_EXPERT,
        d_ff=D_FF,
        n_shared_experts=1,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=0,
    )


def meta_build(variant: str):
    with torch.device("meta"):  # shapes only, nothing allocated
        return build_model(study(variant), V)


EMBEDDING = V * D  # 25,165,824, tied with lm_head: counted once
MHA = 3 * D * D + D * D  # fused QKV + output projection, no bias: 1,048,576
NORMS = 2 * D  # two RMSNorms per block
SKELETON = EMBEDDING + L * (MHA + NORMS) + D  # + final norm: 28,315,136


def test_baseline_counts():
    expert = 2 * D * F_EXPERT  # Linear d->F and F->d, no gate: 1,048,576
    router = D * E  # 4,096
    moe = E * expert + router  # 8,392,704
    total = SKELETON + L * moe
    active = total - L * (E - K) * expert  # a token visits K of the E experts
    assert (SKELETON, moe, total, active) == (28_315_136, 8_392_704, 53_493_248, 34_618_880)
    counts = count_parameters(meta_build("baseline"))
    assert (counts.total, counts.active, counts.embedding) == (total, active, EMBEDDING)


def test_glm4_moe_counts():
    expert = 3 * D * F_EXPERT  # SwiGLU gate, up, down: 1,572,864
    shared = 3 * D * F_EXPERT  # one shared expert of the same width
    router = E * D  # sigmoid router weight (its e_score_correction_bias is a buffer)
    block = E * expert + shared + router
    active_block = K * expert + shared + router
    assert (block, active_block) == (14_159_872, 4_722_688)
    total = SKELETON + L * block
    active = SKELETON + L * active_block
    assert (total, active) == (70_794_752, 42_483_200)
    counts = count_parameters(meta_build("moe"))
    assert (counts.total, counts.active, counts.embedding) == (total, active, EMBEDDING)


def test_mla_counts():
    q_lora, kv_lora, rope = 128, 128, D // 8
    mla = (
        (D * q_lora + q_lora)
        + q_lora
        + q_lora * 8 * rope  # q_a_proj (bias), q_a_layernorm, q_b_proj (nope = 0)
        + (D * (kv_lora + rope) + kv_lora + rope)
        + kv_lora  # kv_a_proj_with_mqa (bias), kv_a_layernorm
        + kv_lora * 8 * rope  # kv_b_proj: values only, since qk_nope_head_dim = 0
        + (8 * rope * D + D)  # o_proj (bias)
    )
    assert mla == 558_144
    counts = count_parameters(meta_build("attention_mlp"))
    mlp = 3 * D * D_FF  # DeepSeek SwiGLU: 3,145,728
    assert counts.total == counts.active == EMBEDDING + L * (mla + NORMS + mlp) + D == 36_281_024
    assert count_parameters(meta_build("mlp")).total == SKELETON + L * mlp == 37_752_320
    with torch.device("meta"):
        attention = DeepseekV3Attention(deepseek_config(study("attention_mlp")), layer_idx=0)
    assert sum(p.numel() for p in attention.parameters()) == mla


def test_attention_moe_counts():
    counts = count_parameters(meta_build("attention_moe"))
    assert counts.total == EMBEDDING + L * (558_144 + NORMS + 14_159_872) + D == 69_323_456
    assert counts.active == counts.total - L * (E - K) * 3 * D * F_EXPERT


@pytest.mark.parametrize("variant", ["baseline", "attention_moe"])
def test_optimizer_groups_partition_parameters(variant):
    model = meta_build(variant)
    groups = model.optimizer_groups()
    ids = [id(p) for group in (groups.matrices, groups.no_decay) for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert any(p is model.tok_emb.weight for p in groups.no_decay)
    assert all(p.ndim in (2, 3) for p in groups.matrices)
    assert all(p.ndim < 2 or p is model.tok_emb.weight for p in groups.no_decay)
    # GLM-4 stores experts as [E, out, in] stacks: with the other matrices
    assert any(p.ndim == 3 for p in groups.matrices) == (variant == "attention_moe")
    # its fused gate_up_proj [E, 2 × I, H] holds each expert's gate and up projections: two matrices, not one
    fused = {p for name, p in model.named_parameters() if name.endswith("gate_up_proj")}
    assert set(groups.row_blocks) == fused and set(groups.row_blocks.values()) <= {2}
    assert bool(fused) == (variant == "attention_moe") and fused <= set(groups.matrices)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_one_recipe_every_hidden_matrix_under_muon_nothing_1d_decays(variant, optimizer):
    """Every ≥2-D hidden weight, each routed expert's slice of a 3-D stack included, is trained by Muon at the
    one LR (or decays under AdamW alone); the embedding, norm gains and biases never decay."""
    model = meta_build(variant)
    spec = TrainSpec(optimizer=optimizer)
    optimizers = build_optimizers(model, spec)
    placed = {
        id(p): (type(opt).__name__, group) for opt in optimizers for group in opt.param_groups for p in group["params"]
    }
    hidden = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2 and p is not model.tok_emb.weight]
    assert {p.ndim for _, p in hidden} >= (
        {2, 3} if registry.PRESETS[variant].ffn in ("glm4_moe", "deepseek_moe") else {2}
    )
    for name, p in hidden:
        kind, group = placed[id(p)]
        if optimizer == "muon":
            assert kind == "Muon" and group["lr"] == spec.lr, name
        else:
            assert group["weight_decay"] == spec.weight_decay > 0, name
    for name, p in model.named_parameters():
        if p.ndim < 2 or p is model.tok_emb.weight:
            assert placed[id(p)][1]["weight_decay"] == 0.0, name
    split = optimizer_split(model, spec)
    total = sum(p.numel() for p in model.parameters())
    assert split["muon"] + split["adamw"] == total
    assert split["muon"] == (sum(p.numel() for _, p in hidden) if optimizer == "muon" else 0)


def test_deepseek_v3_counts_and_flops():
    """MLA + DeepSeek-V3 MoE (8 routed experts, top-2, one shared expert) by hand at the study shape."""
    from blueberry.perf import flops_per_token

    mla, mla_vectors = 558_144, 128 + 128 + 192 + 128 + D  # q_a bias + norm, kv_a bias + norm, o_proj bias
    expert = 3 * D * F_EXPERT  # SwiGLU gate, up, down of one routed expert (3-D stacks): 1,572,864
    shared, router = 3 * D * F_EXPERT, E * D  # e_score_correction_bias is a buffer, not a parameter
    block = mla + NORMS + E * expert + shared + router
    total = EMBEDDING + L * block + D
    active = total - L * (E - K) * expert
    assert (total, active) == (69_323_456, 41_011_904)
    model = meta_build("deepseek_v3")
    counts = count_parameters(model)
    assert (counts.total, counts.active, counts.embedding) == (total, active, EMBEDDING)

    T = 256
    matmul = EMBEDDING + L * (mla - mla_vectors + router + shared + K * expert)  # tied embedding once, as LM head
    attention = L * 6 * T * 8 * (D // 8 + D // 8)  # qk head dim (rope 64 + nope 0) + v head dim 64, per head
    flops = flops_per_token(model, T)
    assert flops.active_matmul_params == matmul == 41_005_056
    assert (flops.matmul, flops.attention) == (6 * matmul, attention) == (246_030_336, 4_718_592)
