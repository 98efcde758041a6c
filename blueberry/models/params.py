"""Parameter counts: total, active per token, and the embedding share."""

from __future__ import annotations

from dataclasses import dataclass

from .lm import BlueberryLM


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter once (the tied embedding/lm_head counted once)
    active: int  # used per token: everything except the routed experts a token does not visit
    embedding: int  # the tied embedding


def count_parameters(model: BlueberryLM) -> ParamCounts:
    """Count from the modules: each MoE layer activates top_k of its n_experts equal-sized routed experts.

    Shared experts, routers and everything outside the MoE blocks are active for every token.
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    inactive = 0
    for ffn in model.routed_ffns():
        routed = sum(p.numel() for p in ffn.routed_experts().parameters())
        inactive += routed * (ffn.n_experts - ffn.top_k) // ffn.n_experts
    return ParamCounts(total=total, active=total - inactive, embedding=model.tok_emb.weight.numel())
