"""transformers configs for the components Blueberry builds directly from transformers' classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import DeepseekV3Config, Glm4MoeConfig

if TYPE_CHECKING:  # annotations only: spec imports the registry, which builds these modules
    from ..spec import ModelSpec


def deepseek_config(spec: ModelSpec) -> DeepseekV3Config:
    """DeepSeek-V3 config for the MLA attention, the RoPE tables and the dense SwiGLU MLP."""
    return DeepseekV3Config(
        hidden_size=spec.d_model,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_heads,
        q_lora_rank=spec.q_lora_rank,
        kv_lora_rank=spec.kv_lora_rank,
        qk_rope_head_dim=spec.head_dim,
        qk_nope_head_dim=spec.qk_nope_head_dim,
        v_head_dim=spec.head_dim,
        attention_bias=True,
        attention_dropout=spec.dropout,
        intermediate_size=spec.d_ff,
        hidden_act="silu",
        max_position_embeddings=spec.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        # `causal_attention` (attention.py registers it). Never "eager": with no mask it attends to the future.
        attn_implementation="blueberry",
    )


# GLM-4-MoE's routing (transformers' Glm4MoeConfig defaults): one expert group, top-k weights renormalised, no
# routed scaling.
GLM4_ROUTING = dict(n_group=1, topk_group=1, routed_scaling_factor=1.0)
# DeepSeek-V3's routing (its config's defaults): 8 expert groups of which the 4 best (by the sum of each group's
# top-2 scores) are kept before the top-k, routed output scaled by 2.5 against the shared expert.
DEEPSEEK_V3_GROUPS, DEEPSEEK_V3_SCALING = 8, 2.5


def deepseek_groups(n_experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group): DeepSeek-V3's 8 groups with half kept, scaled down to few experts as groups of two
    (a group's score is the sum of its top-2 expert scores); one group when the kept groups could not hold
    top_k experts."""
    if n_experts >= 2 * DEEPSEEK_V3_GROUPS and n_experts % DEEPSEEK_V3_GROUPS == 0:
        n_group = DEEPSEEK_V3_GROUPS
    elif n_experts % 2 == 0:
        n_group = n_experts // 2
    else:
        return 1, 1
    topk_group = max(1, n_group // 2)
    return (n_group, topk_group) if topk_group * (n_experts // n_group) >= top_k else (1, 1)


def _moe_block(spec: ModelSpec, name: str) -> dict:
    """The config values of one routed MoE block built directly (never the whole CausalLM, whose first layers
    are dense): GLM-4 and DeepSeek-V3 share the design (sigmoid router with a correction bias, routed + shared
    SwiGLU experts); they differ in routing (GLM4_ROUTING, deepseek_groups)."""
    if spec.n_experts < 2:
        raise ValueError(f"the {name} router ranks the top-2 scores of each expert group: it needs n_experts >= 2")
    return dict(
        hidden_size=spec.d_model,
        n_routed_experts=spec.n_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_d_ff,
        n_shared_experts=spec.n_shared_experts,
        first_k_dense_replace=0,
        # The chosen scores are normalised to sum to 1 (both models' design), except for one chosen expert: its
        # weight would be 1 whatever the score, so the loss would never reach the router (`TopKMoE` likewise).
        norm_topk_prob=spec.top_k > 1,
        hidden_act="silu",
        # a loop over experts (eager) or grouped matmuls: `make bench` measures which wins where
        experts_implementation=spec.experts_implementation,
    )


def glm4_config(spec: ModelSpec) -> Glm4MoeConfig:
    """GLM-4-MoE config for one MoE block."""
    return Glm4MoeConfig(**_moe_block(spec, "GLM-4"), **GLM4_ROUTING)


def deepseek_moe_config(spec: ModelSpec) -> DeepseekV3Config:
    """DeepSeek-V3 config for one MoE block (routed + shared experts, sigmoid router, group-limited routing)."""
    n_group, topk_group = deepseek_groups(spec.n_experts, spec.top_k)
    return DeepseekV3Config(
        **_moe_block(spec, "DeepSeek-V3"),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=DEEPSEEK_V3_SCALING,
    )
