"""Causal self-attention: our standard multi-head attention and transformers' DeepSeek-V3 MLA.

Both take the RoPE `(cos, sin)` pair that the model computes once per forward with `DeepseekV3RotaryEmbedding`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, apply_rotary_pos_emb

if TYPE_CHECKING:  # annotations only: spec imports the registry, which builds these modules
    from ..spec import ModelSpec


class CausalSelfAttention(nn.Module):
    """Multi-head attention: fused QKV, RoPE, causal SDPA, output projection; no biases."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads = spec.n_heads
        self.dropout = spec.dropout
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=False)
        self.proj = nn.Linear(spec.d_model, spec.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, heads, T, head_dim] tensors
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs of the score (q·k) and value products per token, causal saving not counted (PaLM)."""
        head_dim = self.proj.in_features // self.n_heads
        return 6 * seq_len * self.n_heads * 2 * head_dim


class LatentAttention(nn.Module):
    """transformers' DeepSeek-V3 multi-head latent attention (MLA), run causally.

    The config must select the "sdpa" implementation: with `attention_mask=None`, sdpa applies `is_causal`,
    while "eager" applies no mask at all, which is how the reference model came to see the future.
    `causality_probe` checks this end to end.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.mla = DeepseekV3Attention(config, layer_idx)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        y, _ = self.mla(x, position_embeddings=rope, attention_mask=None, is_causal=True)
        return y

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs of the score (q·k over qk_head_dim) and value products per token, as for MHA."""
        return 6 * seq_len * self.mla.num_heads * (self.mla.qk_head_dim + self.mla.v_head_dim)
