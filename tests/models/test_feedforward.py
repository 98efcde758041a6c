"""Expert dispatch: the sorted dispatch computes exactly what a per-token loop computes, and every experts
implementation of the GLM-4 block gives the same outputs and gradients (a speed choice only)."""

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


@pytest.mark.parametrize("variant", ["moe", "attention_moe"])
def test_glm4_experts_implementations_agree(variant, monkeypatch):
    """sorted (ours, registered with transformers), eager and grouped_mm (transformers'): same numbers."""
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
