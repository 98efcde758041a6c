"""Causal self-attention: our standard multi-head attention and transformers' DeepSeek-V3 MLA.

Both take the RoPE `(cos, sin)` pair that the model computes once per forward with `DeepseekV3RotaryEmbedding`,
and both attend through `causal_attention`: PyTorch's SDPA, except in training with dropout on a CPU. There
SDPA's fused kernel cannot drop attention weights and falls back to its math path, which upcasts bf16 to fp32
throughout and draws the dropout mask element by element: 3x the time of the fused kernel at the study's shape.
`causal_attention` then computes the same thing itself: scores and softmax in fp32 (as the math path), the
dropout mask drawn sparsely (`dropout.py`), and the weights-times-values product in the values' dtype (bf16
under autocast, as SDPA's fused CPU kernel does), for each half of the queries over the keys it may see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DeepseekV3Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, apply_rotary_pos_emb

from .dropout import zero_dropped_

if TYPE_CHECKING:  # annotations only: spec imports the registry, which builds these modules
    from ..spec import ModelSpec


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)`, [B, H, T, D];
    in training with dropout on a CPU, computed here (module docstring)."""
    if dropout_p == 0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    B, H, T, S = *q.shape[:3], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    with torch.autocast(q.device.type, enabled=False):  # CPU autocast would run the scores in bf16
        q, k, v = q.float().flatten(0, 1), k.float().flatten(0, 1), v.flatten(0, 1)
        for start, end in query_blocks(T):
            keys = min(end, S)  # SDPA's upper-left causal mask: query i sees keys 0..i
            future = torch.full((end - start, keys), float("-inf"), device=q.device).triu_(start + 1)
            scores = torch.baddbmm(future, q[:, start:end], k[:, :keys].mT, alpha=scale)
            # A copy in the values' dtype, which the dropout zeroes in place (softmax keeps its own output for the
            # backward pass); its 1/(1-p) scales the product, a quarter of the elements at head_dim 64.
            weights = zero_dropped_(torch.softmax(scores, dim=-1).to(v.dtype, copy=True), dropout_p)
            outs.append(torch.bmm(weights, v[:, :keys]))
        out = torch.cat(outs, dim=1).mul_(1 / (1 - dropout_p))
    return out.view(B, H, T, v.shape[-1])


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` for q, k [B, H, T, D] and cos, sin [B, T, D]; on a CPU
    written out (`_Rotary`)."""
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return apply_rotary_pos_emb(q, k, cos, sin)
    return _Rotary.apply(q, k, cos.unsqueeze(1), sin.unsqueeze(1))


class _Rotary(torch.autograd.Function):
    """x · cos + rotate_half(x) · sin for q and k, with rotate_half(x) = (-x₂, x₁) over the halves of head_dim:
    two products per half, into the output's halves, and the backward as its transpose (x₁ ↔ x₂, sin ↔ -sin)
    rounded once to the input's dtype (autograd rounds each of its two terms). On a CPU, fwd+bwd of q and k
    16 × 8 × 256 × 64 (bf16, as views of the fused QKV output; fp32 cos/sin): 12 ms against 21 ms through
    autograd, whose rotate_half is a slice, a negation and a concatenation (2-core AMX Xeon)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return _rotate(q, cos, sin, transpose=False), _rotate(k, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = (_rotate(g, cos, sin, transpose=True).to(dtype) for g, dtype in zip((grad_q, grad_k), ctx.dtypes))
        return *grads, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """(x₁c₁ - x₂s₁, x₂c₂ + x₁s₂), or transposed (x₁c₁ + x₂s₂, x₂c₂ - x₁s₁), in the promoted dtype."""
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    (x1, x2), (c1, c2), (s1, s2) = ((t[..., :half], t[..., half:]) for t in (x, cos, sin))
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, c1, out=first).addcmul_(x2, s2 if transpose else s1, value=1 if transpose else -1)
    torch.mul(x2, c2, out=second).addcmul_(x1, s1 if transpose else s2, value=-1 if transpose else 1)
    return out


def query_blocks(n_queries: int) -> list[tuple[int, int]]:
    """The query rows `causal_attention` computes at a time: two halves, so the first half's scores, softmax and
    dropout skip the keys it may not see (a quarter of the score matrix). Fwd+bwd of 16 × 8 heads × 256 × 64,
    bf16, p = 0.1, 2-core AVX512-BF16 EPYC: 71 ms in one block, 57-61 ms in two, 59-63 ms in four, 71-79 in eight."""
    half = n_queries // 2
    return [(0, half), (half, n_queries)] if half else [(0, n_queries)]


def blueberry_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface (registered as "blueberry"): `causal_attention` where the call is plain
    causal self-attention (no mask, no grouped heads), transformers' SDPA function otherwise."""
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    plain = attention_mask is None and is_causal and getattr(module, "num_key_value_groups", 1) == 1
    if not plain or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return causal_attention(query, key, value, dropout, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register("blueberry", blueberry_attention_forward)


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
        q, k = rotary(q, k, *rope)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs of the score (q·k) and value products per token, causal saving not counted (PaLM)."""
        head_dim = self.proj.in_features // self.n_heads
        return 6 * seq_len * self.n_heads * 2 * head_dim


class LatentAttention(nn.Module):
    """transformers' DeepSeek-V3 multi-head latent attention (MLA), run causally.

    The config must select the "blueberry" implementation (or "sdpa"): with `attention_mask=None`, both apply
    `is_causal`, while "eager" applies no mask at all, which is how the reference model came to see the future.
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
