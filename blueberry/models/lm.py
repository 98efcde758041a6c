"""The Blueberry decoder LM: one pre-norm skeleton; `model.attention` and `model.ffn` pick its components
(`registry.py` maps each choice to its builder; `model.variant` presets name a pair).

embedding * sqrt(d) -> dropout -> blocks -> RMSNorm -> dropout -> lm_head (tied to the embedding).
Block: x + drop(attn(norm1 x)), then x + drop(ffn(norm2 x)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from .configs import deepseek_config
from .dropout import Dropout
from .linear_cross_entropy import linear_cross_entropy
from .norm import RMSNorm
from .registry import ATTENTIONS, FFNS

if TYPE_CHECKING:  # annotations only: spec imports the registry, which builds these modules
    from ..spec import ModelSpec

RMS_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default


def rms_norm(d_model: int) -> RMSNorm:
    """torch's RMSNorm, its CPU path written out (norm.py), which computes what transformers' DeepseekV3RMSNorm
    does on our fp32 residual stream (the same output) in fewer passes: forward + backward of 16 × 256 × 512 in
    5.0 ms, nn.RMSNorm's 9.8-10.9 ms, DeepseekV3RMSNorm's 13.2 ms (2-core AMX Xeon), seven norms per micro-batch."""
    return RMSNorm(d_model, eps=RMS_EPS)


@dataclass
class RouterStats:
    layer: int
    load: torch.Tensor  # [E] share of token-assignments per routed expert, sums to 1 (detached)
    balance_loss: torch.Tensor  # scalar Switch balance loss, unweighted (detached)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when the loss was computed from `targets` in chunks
    aux_loss: torch.Tensor  # scalar: sum over layers of balance_loss_weight * balance loss (model.balance aux_loss)
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer
    loss: torch.Tensor | None = None  # mean next-token cross-entropy, when `targets` were given


class OptimizerGroups(NamedTuple):
    matrices: list[nn.Parameter]  # every hidden weight matrix, routed-expert stacks [E, out, in] included
    no_decay: list[nn.Parameter]  # the tied embedding, norm gains, biases
    # matrices that hold several equal matrices stacked by rows: a fused expert stack [E, 2 × I, H] holds each
    # expert's gate and up projections (blocks 2), which Muon orthogonalises one by one
    row_blocks: dict[nn.Parameter, int]


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.norm1 = rms_norm(spec.d_model)
        self.norm2 = rms_norm(spec.d_model)
        self.attn = ATTENTIONS[spec.attention].build(spec, layer_idx)
        self.ffn = FFNS[spec.ffn].build(spec)
        self.routed = FFNS[spec.ffn].routed
        self.drop = Dropout(spec.dropout)

    def forward(self, x, rope):
        x = x + self.drop(self.attn(self.norm1(x), rope))
        if self.routed:
            h, routing = self.ffn(self.norm2(x))
        else:
            h, routing = self.ffn(self.norm2(x)), None
        return x + self.drop(h), routing


class BlueberryLM(nn.Module):
    def __init__(self, spec: ModelSpec, vocab_size: int):
        super().__init__()
        self.spec, self.vocab_size = spec, vocab_size
        self.tok_emb = nn.Embedding(vocab_size, spec.d_model)
        self.rope = DeepseekV3RotaryEmbedding(deepseek_config(spec))  # cos/sin over head_dim, shared by all layers
        self.drop = Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec, i) for i in range(spec.n_layers))
        self.norm = rms_norm(spec.d_model)
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
                if self.spec.balance == "aux_loss":
                    aux_loss = aux_loss + self.spec.balance_loss_weight * routing.balance_loss
                router_stats.append(RouterStats(i, routing.load.detach(), routing.balance_loss.detach()))
        h = self.drop(self.norm(x))
        if targets is not None:
            loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
            return ModelOutput(None, aux_loss, router_stats, loss)
        return ModelOutput(self.lm_head(h), aux_loss, router_stats)

    def routed_ffns(self) -> list[nn.Module]:
        """The routed feed-forward blocks: they expose n_experts, top_k and routed_experts() for the accounting."""
        return [block.ffn for block in self.blocks if block.routed]

    @property
    def may_skip_parameters(self) -> bool:
        """Whether a step can leave parameters without a gradient: a routed block whose idle experts sit out."""
        return any(getattr(ffn, "skips_idle_experts", False) for ffn in self.routed_ffns())

    def attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token of the attention score and value products, summed over layers."""
        return sum(block.attn.flops_per_token(seq_len) for block in self.blocks)

    def after_optimizer_step(self) -> None:
        """Called by the Trainer after each optimizer step: model.balance = bias_update moves each routed layer's
        routing bias toward equal load, outside backprop (see `SigmoidRouterMoE.update_bias`); otherwise nothing."""
        if self.spec.balance == "bias_update":
            for ffn in self.routed_ffns():
                ffn.update_bias(self.spec.bias_update_rate)

    def note_routing(self, router_stats: list[RouterStats]) -> None:
        """Called by the Trainer after each training micro-step's forward, with its `router_stats`: with
        model.balance = bias_update each routed layer keeps its load for the next `after_optimizer_step`."""
        if self.spec.balance == "bias_update":
            for stats in router_stats:
                self.blocks[stats.layer].ffn.note_load(stats.load)

    def optimizer_groups(self) -> OptimizerGroups:
        """One recipe for every variant: the hidden weight matrices (Muon, or decayed AdamW) and the rest.

        Whatever module holds an expert, its matrix is a hidden matrix: a routed-expert stack [E, out, in]
        (GLM-4, DeepSeek-V3) is E of them, as the top-k MoE's Linear experts are, and transformers' fused
        `gate_up_proj` [E, 2 × I, H] is 2E: each expert's gate and up projection, separate Linear layers in the
        shared experts, the dense SwiGLU and the reference's experts. The tied embedding (= lm_head), norm gains
        and biases never decay.
        """
        groups = OptimizerGroups([], [], {})
        for name, p in self.named_parameters():  # the tied weight appears once
            if p.numel() == 0:  # GLM-4 still builds a (0-wide) shared expert when n_shared_experts = 0
                continue
            if p is self.tok_emb.weight or p.ndim < 2:
                groups.no_decay.append(p)
            else:
                groups.matrices.append(p)
                if p.ndim == 3 and name.endswith("gate_up_proj"):
                    groups.row_blocks[p] = 2
        return groups


def build_model(spec: ModelSpec, vocab_size: int) -> BlueberryLM:
    """Build the model `spec` describes (attention × feed-forward), initialised from the current torch RNG state."""
    return BlueberryLM(spec, vocab_size)
