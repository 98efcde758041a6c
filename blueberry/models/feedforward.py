"""Mixture-of-Experts feed-forward blocks: the repo's own top-k MoE and transformers' GLM-4 MoE.

(The dense variants use transformers' `DeepseekV3MLP` as is.) Both MoE blocks return `(output, Routing)`
so the model can log each layer's expert load and add a Switch-style balance loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import Glm4MoeConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

from ..spec import ModelSpec


class Routing(NamedTuple):
    load: torch.Tensor  # [E] share of token-assignments per expert; sums to 1
    balance_loss: torch.Tensor  # scalar, differentiable through the router probabilities


def switch_balance(probs: torch.Tensor, top_idx: torch.Tensor) -> Routing:
    """Switch Transformer balance loss E * sum_e f_e * P_e.

    probs: [N, E] router probabilities per token; top_idx: [N, k] chosen experts.
    f_e = share of the N*k assignments that went to e, P_e = mean probability of e. Equals 1 when balanced.
    Only P carries gradient: f comes from a discrete top-k.
    """
    n_experts = probs.shape[-1]
    # fp32 even under autocast: the loads are logged and bf16 would round them to ~3 digits
    load = torch.bincount(top_idx.flatten(), minlength=n_experts).float() / top_idx.numel()
    return Routing(load, n_experts * (load * probs.float().mean(0)).sum())


class TopKMoE(nn.Module):
    """The repo's own MoE (variant `baseline`).

    Router: bias-free Linear(d, E) plus Gaussian noise in training. Each token goes to its top-k experts,
    weighted by a softmax over the k chosen logits. Expert: Linear, SiLU, dropout, Linear; no biases.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_experts, self.top_k, self.noise_std = spec.n_experts, spec.top_k, spec.router_noise_std
        self.router = nn.Linear(spec.d_model, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(spec.d_model, spec.expert_d_ff, bias=False),
                nn.SiLU(),
                nn.Dropout(spec.dropout),
                nn.Linear(spec.expert_d_ff, spec.d_model, bias=False),
            )
            for _ in range(spec.n_experts)
        )

    def routed_experts(self) -> nn.Module:
        return self.experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d], one row per token
        logits = self.router(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        y = torch.zeros_like(x)
        # Loop over experts (not tokens): each expert runs once on the rows that chose it.
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_idx == e)
            out = expert(x[token]) * weights[token, slot, None]
            y.index_add_(0, token, out.to(y.dtype))  # under autocast the experts may run in bf16/fp16
        return y.view(shape), switch_balance(logits.softmax(dim=-1), top_idx)


class Glm4MoE(nn.Module):
    """transformers' `Glm4MoeMoE`, unchanged, plus the routing statistics its forward drops.

    Routing stays GLM-4's own (sigmoid scores, top-k, renormalised weights, shared experts): a forward hook on
    its router keeps the router logits and chosen experts of the current call.
    """

    def __init__(self, config: Glm4MoeConfig):
        super().__init__()
        self.moe = Glm4MoeMoE(config)
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self._router_output = None
        self.moe.gate.register_forward_hook(self._keep_router_output)

    def _keep_router_output(self, module, args, output) -> None:
        self._router_output = output  # (router_logits [N, E], top-k weights [N, k], top-k indices [N, k])

    def routed_experts(self) -> nn.Module:
        return self.moe.experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        y = self.moe(x)
        router_logits, _, top_idx = self._router_output
        self._router_output = None
        # GLM-4 and DeepSeek-V3 balance experts without an auxiliary loss, through the `e_score_correction_bias`
        # buffer that their training code nudges outside backprop (transformers keeps it at 0 here). We add the
        # Switch-style auxiliary loss instead, on the sigmoid scores normalised per token; with
        # balance_loss_weight = 0 it is only logged.
        scores = router_logits.sigmoid()
        return y, switch_balance(scores / scores.sum(dim=-1, keepdim=True), top_idx)
