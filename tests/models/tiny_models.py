"""Tiny model shapes for the model tests: every variant, seconds on a CPU."""

from blueberry.models import registry
from blueberry.spec import ModelSpec

VOCAB = 64
PAIRS = [(a, f) for a in registry.ATTENTIONS for f in registry.FFNS]  # every attention × feed-forward


def tiny(variant: str | None, **overrides) -> ModelSpec:
    """A preset (variant) or, with variant None, the attention and ffn given in `overrides`."""
    fields = dict(
        variant=variant,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_experts=4,
        top_k=2,
        expert_d_ff=32,
        d_ff=64,
        q_lora_rank=16,
        kv_lora_rank=16,
        max_seq_len=64,
        dropout=0.1,
    )
    return ModelSpec(**{**fields, **overrides})
