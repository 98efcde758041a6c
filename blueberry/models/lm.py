"""The Blueberry decoder LM: one pre-norm skeleton, five variants.

    variant         attention               feed-forward
    baseline        standard MHA            our top-k MoE
    mlp             standard MHA            DeepSeek-V3 SwiGLU MLP (d_ff)
    attention_mlp   DeepSeek-V3 MLA         DeepSeek-V3 SwiGLU MLP (d_ff)
    moe             standard MHA            GLM-4 MoE (routed + shared experts)
    attention_moe   DeepSeek-V3 MLA         GLM-4 MoE

embedding * sqrt(d) -> dropout -> blocks -> RMSNorm -> dropout -> lm_head (tied to the embedding).
Block: x + drop(attn(norm1 x)), then x + drop(ffn(norm2 x)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from transformers import DeepseekV3Config, Glm4MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3MLP,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

from ..spec import ModelSpec
from .attention import CausalSelfAttention, LatentAttention
from .feedforward import Glm4MoE, TopKMoE
from .linear_cross_entropy import linear_cross_entropy


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


def glm4_config(spec: ModelSpec) -> Glm4MoeConfig:
    """GLM-4-MoE config for one MoE block built directly (never the whole CausalLM, whose layer 0 is dense)."""
    if spec.n_experts < 2:
        raise ValueError("the GLM-4 router ranks the top-2 scores of each expert group: it needs n_experts >= 2")
    return Glm4MoeConfig(
        hidden_size=spec.d_model,
        n_routed_experts=spec.n_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_d_ff,
        n_shared_experts=spec.n_shared_experts,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        first_k_dense_replace=0,
        hidden_act="silu",
        # a loop over experts (eager) or grouped matmuls: `make bench` measures which wins where
        experts_implementation=spec.experts_implementation,
    )


@dataclass
class RouterStats:
    layer: int
    load: torch.Tensor  # [E] share of token-assignments per routed expert, sums to 1 (detached)
    balance_loss: torch.Tensor  # scalar Switch balance loss, unweighted (detached)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when the loss was computed from `targets` in chunks
    aux_loss: torch.Tensor  # scalar: sum over layers of balance_loss_weight * balance loss
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer
    loss: torch.Tensor | None = None  # mean next-token cross-entropy, when `targets` were given


class OptimizerGroups(NamedTuple):
    muon: list[nn.Parameter]  # 2-D hidden matrices: attention, router, experts stored as Linear
    muon_3d: list[nn.Parameter]  # GLM-4 expert stacks [E, out, in]: one matrix per expert; torch.optim.Muon is 2-D only
    adamw: list[nn.Parameter]  # the tied embedding, norm weights, biases


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, deepseek: DeepseekV3Config, glm4: Glm4MoeConfig | None):
        super().__init__()
        self.norm1 = DeepseekV3RMSNorm(spec.d_model)
        self.norm2 = DeepseekV3RMSNorm(spec.d_model)
        if spec.variant.startswith("attention_"):
            self.attn = LatentAttention(deepseek, layer_idx)
        else:
            self.attn = CausalSelfAttention(spec)
        if spec.variant == "baseline":
            self.ffn = TopKMoE(spec)
        elif spec.is_moe:
            self.ffn = Glm4MoE(glm4)
        else:
            self.ffn = DeepseekV3MLP(deepseek)
        self.is_moe = spec.is_moe
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x, rope):
        x = x + self.drop(self.attn(self.norm1(x), rope))
        if self.is_moe:
            h, routing = self.ffn(self.norm2(x))
        else:
            h, routing = self.ffn(self.norm2(x)), None
        return x + self.drop(h), routing


class BlueberryLM(nn.Module):
    def __init__(self, spec: ModelSpec, vocab_size: int):
        super().__init__()
        self.spec, self.vocab_size = spec, vocab_size
        deepseek = deepseek_config(spec)
        glm4 = glm4_config(spec) if spec.variant in ("moe", "attention_moe") else None
        self.tok_emb = nn.Embedding(vocab_size, spec.d_model)
        self.rope = DeepseekV3RotaryEmbedding(deepseek)  # cos/sin over head_dim, shared by all layers
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec, i, deepseek, glm4) for i in range(spec.n_layers))
        self.norm = DeepseekV3RMSNorm(spec.d_model)
        self.lm_head = nn.Linear(spec.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """normal(0, init_std) for every matrix (Linear, Embedding, GLM-4 router and 3-D expert stacks), zero biases.

        Going by parameter shape covers transformers' modules too (their router starts at zero, their experts
        uninitialised). Norm weights (1-D) keep their ones; buffers such as RoPE's inv_freq and GLM-4's
        e_score_correction_bias are not parameters and stay untouched.
        """
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, mean=0.0, std=self.spec.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """Logits, or with `targets` the mean cross-entropy through the chunked LM head (no full logits)."""
        T = input_ids.shape[1]
        assert T <= self.spec.max_seq_len, f"sequence length {T} exceeds max_seq_len {self.spec.max_seq_len}"
        x = self.drop(self.tok_emb(input_ids) * math.sqrt(self.spec.d_model))
        rope = self.rope(x, torch.arange(T, device=input_ids.device)[None])
        aux_loss = x.new_zeros(())
        router_stats = []
        for i, block in enumerate(self.blocks):
            x, routing = block(x, rope)
            if routing is not None:
                aux_loss = aux_loss + self.spec.balance_loss_weight * routing.balance_loss
                router_stats.append(RouterStats(i, routing.load.detach(), routing.balance_loss.detach()))
        h = self.drop(self.norm(x))
        if targets is not None:
            loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
            return ModelOutput(None, aux_loss, router_stats, loss)
        return ModelOutput(self.lm_head(h), aux_loss, router_stats)

    def optimizer_groups(self) -> OptimizerGroups:
        """Split the parameters for Muon + AdamW: Muon takes the hidden matrices, AdamW the rest.

        The tied embedding (= lm_head) goes to AdamW. GLM-4 stores its routed experts as 3-D stacks, which
        torch.optim.Muon rejects: they get their own group, to orthogonalise per expert or give to AdamW.
        """
        groups = OptimizerGroups([], [], [])
        for p in self.parameters():  # the tied weight appears once
            if p.numel() == 0:  # GLM-4 still builds a (0-wide) shared expert when n_shared_experts = 0
                continue
            if p is self.tok_emb.weight or p.ndim < 2:
                groups.adamw.append(p)
            elif p.ndim == 2:
                groups.muon.append(p)
            else:
                groups.muon_3d.append(p)
        return groups


def build_model(spec: ModelSpec, vocab_size: int) -> BlueberryLM:
    """Build the variant `spec.variant`, initialised from the current torch RNG state."""
    return BlueberryLM(spec, vocab_size)
