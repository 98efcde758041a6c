"""Tiny model shapes for the model tests: every variant, seconds on a CPU."""

from blueberry.spec import ModelSpec

VOCAB = 64


def tiny(variant: str, **overrides) -> ModelSpec:
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
