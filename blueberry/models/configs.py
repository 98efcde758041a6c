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
        # Never "eager": with no mask it attends to the future (see LatentAttention).
        attn_implementation="sdpa",
    )


# Routing shared by the GLM-4 and DeepSeek-V3 MoE blocks as Blueberry builds them: one expert group (no
# group-limited routing at this size), weights renormalised over the chosen experts, no extra scaling.
SIGMOID_ROUTING = dict(n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, hidden_act="silu")


def _moe_block(spec: ModelSpec, name: str) -> dict:
    """The config values of one routed MoE block built directly (never the whole CausalLM, whose first layers
    are dense): the same for GLM-4 and DeepSeek-V3, whose MoE blocks are the same design."""
    if spec.n_experts < 2:
        raise ValueError(f"the {name} router ranks the top-2 scores of each expert group: it needs n_experts >= 2")
    return dict(
        hidden_size=spec.d_model,
        n_routed_experts=spec.n_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_d_ff,
        n_shared_experts=spec.n_shared_experts,
        first_k_dense_replace=0,
        # a loop over experts (eager) or grouped matmuls: `make bench` measures which wins where
        experts_implementation=spec.experts_implementation,
        **SIGMOID_ROUTING,
    )


def glm4_config(spec: ModelSpec) -> Glm4MoeConfig:
    """GLM-4-MoE config for one MoE block."""
    return Glm4MoeConfig(**_moe_block(spec, "GLM-4"))


def deepseek_moe_config(spec: ModelSpec) -> DeepseekV3Config:
    """DeepSeek-V3 config for one MoE block (routed + shared experts, sigmoid router)."""
    return DeepseekV3Config(**_moe_block(spec, "DeepSeek-V3"))
