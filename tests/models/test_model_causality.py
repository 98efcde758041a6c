"""The causality probe passes for every attention × feed-forward pair and catches the reference's non-causal
attention."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import PAIRS, VOCAB, tiny

from blueberry.models import CausalityError, assert_causal, build_model, causality_probe
from blueberry.spec import VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_variants_are_causal(variant):
    torch.manual_seed(0)
    model = build_model(tiny(variant), VOCAB)
    assert model.training  # built in train mode, with dropout and router noise active
    report = causality_probe(model, VOCAB, seq_len=16)
    assert report.ok, report
    assert report.max_abs_diff <= 1e-5
    assert model.training  # the probe restores the mode it found
    assert_causal(model, VOCAB, seq_len=16)


@pytest.mark.parametrize("attention, ffn", PAIRS)
def test_every_attention_ffn_pair_is_causal(attention, ffn):
    torch.manual_seed(0)
    model = build_model(tiny(None, attention=attention, ffn=ffn), VOCAB)
    report = causality_probe(model, VOCAB, seq_len=16)
    assert report.ok and report.max_abs_diff <= 1e-5, report


def test_probe_catches_mla_without_mask():
    """The reference's bug: DeepSeek-V3 MLA under the eager implementation with no mask attends to the future."""
    torch.manual_seed(0)
    model = build_model(tiny("attention_mlp"), VOCAB)
    model.blocks[0].attn.mla.config._attn_implementation = "eager"  # layer 0 only (each has its config): enough
    report = causality_probe(model, VOCAB, seq_len=16)
    assert not report.ok
    assert report.max_abs_diff > 1e-4
    with pytest.raises(CausalityError, match="not causal"):
        assert_causal(model, VOCAB, seq_len=16)


def test_probe_catches_standard_attention_without_causal_flag(monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **{**kw, "is_causal": False}))
    torch.manual_seed(0)
    report = causality_probe(build_model(tiny("baseline"), VOCAB), VOCAB, seq_len=16)
    assert not report.ok
    assert 0 <= report.worst_position < 15
