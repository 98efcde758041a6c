"""Expert dispatch: the sorted dispatch computes exactly what a per-token loop computes, and every experts
implementation of the GLM-4 and DeepSeek-V3 blocks gives the same outputs and gradients (a speed choice only);
routing-bias balancing evens a skewed router and resumes exactly."""

import pytest
import torch
from tiny_models import tiny

from blueberry.models import build_model, feedforward
from blueberry.models.feedforward import sorted_dispatch


def test_sorted_dispatch_equals_per_token_loop():
    gen = torch.Generator().manual_seed(0)
    n, d, n_experts, k = 37, 8, 5, 2
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    mats = torch.randn(n_experts, d, d, generator=gen, requires_grad=True)
    top_idx = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(n)])
    top_idx[:, 0] = 1  # a crowded expert; expert 4 may get nothing: empty slices are skipped
    top_weights = torch.rand(n, k, generator=gen)

    out = sorted_dispatch(x, top_idx, top_weights, n_experts, lambda e, rows: rows @ mats[e])
    expected = torch.stack([sum(top_weights[i, j] * (x[i] @ mats[top_idx[i, j]]) for j in range(k)) for i in range(n)])
    torch.testing.assert_close(out, expected)

    grads = torch.autograd.grad(out.square().sum(), (x, mats))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, mats))
    torch.testing.assert_close(grads, expected_grads)


def test_expert_with_no_tokens_gets_zero_gradient():
    x = torch.randn(6, 4, requires_grad=True)
    mats = torch.randn(3, 4, 4, requires_grad=True)
    top_idx = torch.tensor([[0, 1]] * 6)  # expert 2 unused
    out = sorted_dispatch(x, top_idx, torch.full((6, 2), 0.5), 3, lambda e, rows: rows @ mats[e])
    out.sum().backward()
    assert mats.grad[2].abs().sum() == 0 and mats.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("variant", ["moe", "attention_moe", "deepseek_v3"])
def test_glm4_experts_implementations_agree(variant, monkeypatch):
    """sorted (ours, registered with transformers), eager and grouped_mm (transformers'): same numbers, for the
    GLM-4 and the DeepSeek-V3 experts (one layout)."""
    dispatched = []
    monkeypatch.setattr(feedforward, "sorted_dispatch", lambda *a: dispatched.append(1) or sorted_dispatch(*a))
    outputs = []
    for implementation in ("sorted", "eager", "grouped_mm"):
        torch.manual_seed(0)
        model = build_model(
            tiny(variant, dropout=0.0, router_noise_std=0.0, experts_implementation=implementation), 512
        )
        out = model(torch.randint(512, (2, 16), generator=torch.Generator().manual_seed(1)))
        out.logits.sum().backward()
        outputs.append((out.logits.detach(), model.tok_emb.weight.grad))
        assert len(dispatched) == (2 if implementation == "sorted" else 0)  # transformers really called ours
        dispatched.clear()
    for other in outputs[1:]:
        torch.testing.assert_close(outputs[0], other, rtol=1e-4, atol=1e-5)


def skewed_router_moe(seed=0):
    """A DeepSeek-V3 MoE block, top-1 of 4 experts, whose router favours expert 0 for every token."""
    from blueberry.models.configs import deepseek_moe_config
    from blueberry.spec import ModelSpec

    torch.manual_seed(seed)
    spec = ModelSpec(ffn="deepseek_moe", d_model=16, n_heads=2, n_experts=4, top_k=1, expert_d_ff=8)
    moe = feedforward.DeepseekMoE(deepseek_moe_config(spec))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.moe.gate.weight[0] += 0.3  # inputs below have a positive mean: expert 0's score is the highest
    return moe


def balancing_run(moe, steps, rate=0.02, seed=1):
    """Forward fresh batches in train mode and update the routing bias after each; return the eval loads."""
    gen = torch.Generator().manual_seed(seed)
    loads = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen) + 1.0
        moe.eval()
        with torch.no_grad():
            loads.append(moe(x)[1].load)
        moe.train()
        moe(x)
        moe.update_bias(rate)
    return loads


def test_bias_update_evens_a_skewed_router():
    moe = skewed_router_moe()
    loads = balancing_run(moe, 51)
    assert loads[0].max() > 0.9  # nearly every token on expert 0
    assert loads[-1].max() < 0.5 and loads[-1].max() < loads[0].max() - 0.4
    bias = moe.moe.gate.e_score_correction_bias
    assert bias[0] < 0 < bias[1:].min()  # the crowded expert's bias went down, the idle ones' up
    assert not bias.requires_grad  # a buffer, outside backprop


def test_bias_update_resumes_bit_identically():
    straight = skewed_router_moe()
    balancing_run(straight, 30)
    first = skewed_router_moe()
    balancing_run(first, 20)
    state = first.state_dict()
    assert "moe.gate.e_score_correction_bias" in state  # saved with the model's weights in every checkpoint
    resumed = skewed_router_moe(seed=7)  # other weights and bias, then the checkpoint
    resumed.load_state_dict(state)
    gen_state = torch.Generator().manual_seed(1)
    for _ in range(20):  # the batches the first 20 steps consumed
        torch.randn(64, 16, generator=gen_state)
    for _ in range(10):
        x = torch.randn(64, 16, generator=gen_state) + 1.0
        resumed(x)
        resumed.update_bias(0.02)
    assert torch.equal(resumed.moe.gate.e_score_correction_bias, straight.moe.gate.e_score_correction_bias)
