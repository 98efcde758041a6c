"""`causal_attention`: SDPA where it is fast; in training with dropout on a CPU, the same math computed with a
sparse dropout mask, causal, and taken by both attentions (ours and transformers' MLA)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny

from blueberry.models import attention, build_model
from blueberry.models.dropout import dropped_positions
from blueberry.spec import VARIANTS


def _qkv(dtype=torch.float32, B=2, H=3, T=16, D=8, Dv=None):
    gen = torch.Generator().manual_seed(0)
    shapes = [(B, H, T, D), (B, H, T, D), (B, H, T, Dv or D)]
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _reference(q, k, v, p, seed):
    """float64, written out: scores, causal mask, softmax, the masks `dropped_positions` draws for `seed` (one per
    block of queries, over the keys those may see), values."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.mT * q.shape[-1] ** -0.5
    T, S = scores.shape[-2:]
    scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    torch.manual_seed(seed)
    keep = torch.ones_like(weights).flatten(0, 1)  # [B·H, T, S]
    for start, end in attention.query_blocks(T):  # one draw per block of queries, over the keys they may see
        block = keep[:, start:end, :end]
        block.copy_(block.flatten().index_fill(0, dropped_positions(block.numel(), p), 0).view(block.shape))
    return (weights * keep.view(weights.shape) / (1 - p)) @ v


@pytest.mark.parametrize("Dv", [None, 12])  # MLA's value heads may differ from its query/key heads
def test_with_dropout_it_equals_the_math_written_out_values_and_gradients(Dv):
    q, k, v = _qkv(Dv=Dv)
    torch.manual_seed(7)
    out = attention.causal_attention(q, k, v, dropout_p=0.2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = _reference(q, k, v, 0.2, seed=7)
    expected = torch.autograd.grad(ref, (q, k, v), grad.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.float(), rtol=1e-4, atol=1e-5)


def test_under_bf16_autocast_scores_stay_fp32_and_values_take_bf16():
    q, k, v = _qkv(torch.bfloat16, T=64, D=32)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.causal_attention(q, k, v, dropout_p=0.1)
    assert out.dtype == torch.bfloat16
    ref = _reference(q, k, v, 0.1, seed=7)
    # bf16 inputs, bf16 weights × values: within bf16 round-off of the float64 result (scores in bf16 would not be)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("T", [1, 2, 7, 256])
def test_query_blocks_cover_every_query_once(T):
    blocks = attention.query_blocks(T)
    assert blocks[0][0] == 0 and blocks[-1][1] == T and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(start < end for start, end in blocks) and len(blocks) == (2 if T > 1 else 1)


def test_without_dropout_or_in_eval_it_is_sdpa():
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(attention.causal_attention(q, k, v, dropout_p=0.0), expected)


def test_with_dropout_no_position_depends_on_a_later_one():
    q, k, v = _qkv(T=12)
    for t in (0, 5, 10):
        out = attention.causal_attention(q, k, v, dropout_p=0.5)
        grads = torch.autograd.grad(out[:, :, : t + 1].sum(), (q, k, v))
        for g in grads:
            assert g[:, :, t + 1 :].abs().max() == 0  # exactly: masked weights are exp(-inf) = 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_through_causal_attention_and_stays_causal(variant, monkeypatch):
    """In training (dropout 0.1) both attentions, ours and MLA through transformers' interface, take
    `causal_attention`, and no logit at a position depends on a later token (gradients exactly zero)."""
    calls = []
    causal = attention.causal_attention

    def counted(*args, **kwargs):
        calls.append(args[3] if len(args) > 3 else kwargs["dropout_p"])
        return causal(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_attention", counted)
    torch.manual_seed(0)
    spec = tiny(variant)
    model = build_model(spec, VOCAB).train()
    embedded = []
    model.tok_emb.register_forward_hook(lambda module, args, out: embedded.append(out) or out.retain_grad())
    ids = torch.randint(VOCAB, (2, 16))
    logits = model(ids).logits
    assert calls == [spec.dropout] * spec.n_layers
    for t in (3, 9):
        model.zero_grad()
        embedded[0].grad = None
        logits[:, : t + 1].sum().backward(retain_graph=True)
        assert embedded[0].grad[:, t + 1 :].abs().max() == 0, f"position <= {t} sees a later token"
        assert embedded[0].grad[:, : t + 1].abs().max() > 0


def test_the_transformers_interface_falls_back_to_sdpa_for_masks_and_non_causal_calls():
    """Only plain causal self-attention takes `causal_attention`; a mask or `is_causal=False` (never used by
    the models here) gets transformers' own SDPA function, so "blueberry" is never less than "sdpa"."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    module = torch.nn.Module()
    mask = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    for kwargs in ({"attention_mask": mask}, {"attention_mask": None, "is_causal": False}):
        torch.manual_seed(0)
        got, _ = attention.blueberry_attention_forward(module, q, k, v, dropout=0.3, **kwargs)
        torch.manual_seed(0)
        expected, _ = sdpa_attention_forward(module, q, k, v, dropout=0.3, **kwargs)
        assert torch.equal(got, expected)
    plain, _ = attention.blueberry_attention_forward(module, q, k, v, None, dropout=0.0)
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))


def _rope_inputs(dtype, rope: bool, B=2, H=3, T=10, D=8):
    """q, k as the views of a fused QKV output our attention rotates, and cos/sin for T positions: transformers'
    (whose halves are equal), or any values (the formula is general)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(dtype).requires_grad_()
    if rope:
        config = DeepseekV3Config(hidden_size=H * D, num_attention_heads=H, qk_rope_head_dim=D)
        cos, sin = DeepseekV3RotaryEmbedding(config)(qkv.float(), torch.arange(T)[None])
    else:
        cos, sin = torch.randn(2, 1, T, D, generator=gen)
    grads = [torch.randn(B, H, T, D, generator=gen) for _ in "qk"]
    return qkv, cos, sin, (B, T, 3, H, D), grads


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_transformers_apply_rotary_pos_emb(dtype, rope):
    """Values and gradients of q and k (views of the fused QKV output) as transformers' function computes them
    in float64; in bf16 the gradient is rounded once, so it is at least as close to float64 as transformers'."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb

    qkv, cos, sin, shape, grads = _rope_inputs(dtype, rope)
    results = {}
    for name, fn, inputs in [
        ("ours", attention.rotary, qkv),
        ("theirs", apply_rotary_pos_emb, qkv),
        ("float64", apply_rotary_pos_emb, qkv.detach().double().requires_grad_()),
    ]:
        q, k, _ = inputs.view(shape).permute(2, 0, 3, 1, 4)
        c, s = (cos.double(), sin.double()) if name == "float64" else (cos, sin)
        out = fn(q, k, c, s)
        (grad,) = torch.autograd.grad(out, inputs, [g.to(out[0].dtype) for g in grads])
        results[name] = (*out, grad)
    assert results["ours"][0].dtype == torch.float32 and results["ours"][2].dtype == dtype
    for ours, exact, theirs in zip(results["ours"], results["float64"], results["theirs"]):
        atol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ours, exact.to(ours.dtype), rtol=1e-5, atol=atol)
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() + 1e-6
