"""Expert dispatch: the sorted dispatch computes exactly what a per-token loop computes, and every experts
implementation of the GLM-4 and DeepSeek-V3 blocks gives the same outputs and gradients (a speed choice only);
routing-bias balancing evens a skewed router and resumes exactly."""

import pytest
import torch
from tiny_models import tiny

from blueberry.models import build_model, feedforward
from blueberry.models.feedforward import CPU_ROW_MULTIPLE, sorted_dispatch


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


def _routing(n=40, d=16, n_experts=4, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    top_idx = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(n)])
    top_idx[top_idx == 3] = 2  # expert 3 gets no token: an empty group
    top_idx[:, 1] = torch.where(top_idx[:, 0] == top_idx[:, 1], (top_idx[:, 0] + 1) % 3, top_idx[:, 1])
    return x, top_idx, torch.rand(n, k, generator=gen)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sorted_dispatch_pads_each_experts_rows_where_onednn_computes_them(precision):
    """oneDNN builds a kernel per matmul shape: where it runs the experts (bf16/fp16 on a CPU) every expert sees
    a row count from a short list, and the result is what the unpadded rows give; fp32 is left unpadded."""
    x, top_idx, top_weights = _routing()
    mats = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    counts = [n for n in torch.bincount(top_idx.reshape(-1), minlength=4).tolist() if n]
    results, seen = {}, {}
    for multiple in (None, 1):
        seen[multiple] = []

        def expert(e, rows, seen=seen[multiple]):
            seen.append(rows.shape[0])
            return rows @ mats[e]

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = sorted_dispatch(x, top_idx, top_weights, 4, expert, row_multiple=multiple)
        results[multiple] = (out, *torch.autograd.grad(out.float().square().sum(), (x, mats)))
    padded = [-(-n // CPU_ROW_MULTIPLE) * CPU_ROW_MULTIPLE for n in counts]
    assert seen == {None: padded if precision == "bf16" else counts, 1: counts}
    torch.testing.assert_close(results[None], results[1])


def test_grouped_dispatch_equals_sorted_dispatch_in_values_and_gradients():
    x, top_idx, top_weights = _routing()
    gen = torch.Generator().manual_seed(1)
    w_in = torch.randn(4, 24, 16, generator=gen, requires_grad=True)  # [E, H, d]: Linear weights, out × in
    w_out = torch.randn(4, 16, 24, generator=gen, requires_grad=True)
    silu = torch.nn.functional.silu

    grouped = feedforward.grouped_dispatch(x, top_idx, top_weights, w_in, w_out, silu)
    expected = sorted_dispatch(x, top_idx, top_weights, 4, lambda e, rows: silu(rows @ w_in[e].T) @ w_out[e].T)
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(grouped.square().sum(), (x, w_in, w_out))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, w_in, w_out))
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-4)
    assert grads[1][3].abs().sum() == 0  # the empty group


def test_grouped_dispatch_keeps_the_counts_on_the_device(monkeypatch):
    """No .tolist()/.item() in the grouped path (the sorted path reads the counts to the host once per layer)."""
    x, top_idx, top_weights = _routing()
    w_in, w_out = torch.randn(4, 24, 16), torch.randn(4, 16, 24)

    def host_sync(self, *args):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "tolist", host_sync)
    monkeypatch.setattr(torch.Tensor, "item", host_sync)
    feedforward.grouped_dispatch(x, top_idx, top_weights, w_in, w_out, torch.nn.functional.silu).sum().backward()
    with pytest.raises(AssertionError, match="host sync"):
        sorted_dispatch(x, top_idx, top_weights, 4, lambda e, rows: rows @ w_in[e].T @ w_out[e].T)


def test_expert_counts_equal_bincount():
    _, top_idx, _ = _routing()
    assert torch.equal(feedforward.expert_counts(top_idx, 5), torch.bincount(top_idx.flatten(), minlength=5))


@pytest.mark.parametrize("variant", ["baseline", "moe", "attention_moe"])
def test_grouped_experts_equal_sorted_in_the_model(variant):
    """experts_implementation 'grouped' (also for the baseline's own MoE) = 'sorted'; 'auto' is sorted on CPU."""
    ids = torch.randint(512, (2, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for implementation in ("sorted", "grouped", "auto"):
        torch.manual_seed(0)
        spec = tiny(variant, dropout=0.0, router_noise_std=0.0, experts_implementation=implementation)
        model = build_model(spec, 512)
        out = model(ids)
        out.logits.square().mean().backward()
        results[implementation] = (out.logits.detach(), [p.grad for p in model.parameters() if p.grad is not None])
    assert torch.equal(results["auto"][0], results["sorted"][0])
    torch.testing.assert_close(results["grouped"], results["sorted"], rtol=1e-4, atol=1e-5)


def test_grouped_mm_is_not_chosen_on_cpu():
    assert not feedforward.grouped_mm_runs_fast(torch.zeros(4, 16, dtype=torch.bfloat16), 16, 32)


def test_grouped_experts_and_chunked_loss_compile_without_graph_breaks():
    """Under bf16 autocast (what 'auto' picks grouped for on CUDA) the whole training forward of a GLM-4 MoE model,
    chunked LM-head loss included, is one graph, and the compiled loss and gradients equal eager's."""
    torch.manual_seed(0)
    model = build_model(tiny("moe", dropout=0.0, router_noise_std=0.0, experts_implementation="grouped"), 64)
    ids = torch.randint(64, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(inputs, targets).loss
        loss.backward()
        results.append((loss.detach(), model.tok_emb.weight.grad.clone()))
        model.zero_grad()
    torch.testing.assert_close(results[0][0], results[1][0])
    # to bf16 round-off: compiled, RoPE is transformers' (each of its two gradient terms rounded to bf16), eager on
    # a CPU our written-out one (rounded once)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch._dynamo.explain(model)(inputs, targets).graph_break_count == 0


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
        moe.note_load(moe(x)[1].load)  # as the trainer does after a training micro-step
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
        resumed.note_load(resumed(x)[1].load)
        resumed.update_bias(0.02)
    assert torch.equal(resumed.moe.gate.e_score_correction_bias, straight.moe.gate.e_score_correction_bias)


def test_deepseek_routing_is_group_limited_and_scaled_unlike_glm4():
    """DeepSeek-V3 keeps the best half of its expert groups before the top-k and scales the routed output by
    2.5; GLM-4 routes over all experts unscaled. With 4 experts in 2 groups of 2, one group is kept, so a
    token's two experts are always a group's pair."""
    from blueberry.models.configs import deepseek_groups, deepseek_moe_config, glm4_config
    from blueberry.spec import ModelSpec

    assert deepseek_groups(256, 8) == (8, 4)  # DeepSeek-V3's own shape
    assert deepseek_groups(8, 2) == (4, 2) and deepseek_groups(5, 2) == (1, 1)
    spec = ModelSpec(ffn="deepseek_moe", d_model=16, n_heads=2, n_experts=4, top_k=2, expert_d_ff=8)
    deepseek, glm4 = deepseek_moe_config(spec), glm4_config(spec)
    assert (deepseek.n_group, deepseek.topk_group, deepseek.routed_scaling_factor) == (2, 1, 2.5)
    assert (glm4.n_group, glm4.topk_group, glm4.routed_scaling_factor) == (1, 1, 1.0)

    torch.manual_seed(0)
    moe = feedforward.DeepseekMoE(deepseek)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    moe(torch.randn(256, 16))
    pairs = {tuple(sorted(row)) for row in moe.moe.gate(torch.randn(256, 16))[2].tolist()}
    assert pairs <= {(0, 1), (2, 3)} and len(pairs) == 2


@pytest.mark.parametrize("variant", ["moe", "deepseek_v3"])
def test_glm4_and_deepseek_routers_score_in_fp32_under_autocast(variant):
    """transformers' routers cast to fp32 for their scores; autocast would compute them in bf16 anyway, where the
    routing bias's steps (1e-3) are below the scores' resolution. The tokens and the rest stay autocast's."""
    model = build_model(tiny(variant), vocab_size=64)
    seen = []
    for block in model.modules():
        if isinstance(block, feedforward.SigmoidRouterMoE):
            block.moe.gate.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    ids = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=ids)
    out.loss.backward()
    assert seen and set(seen) == {torch.float32} and torch.isfinite(out.loss)
    gates = [b.moe.gate.weight for b in model.modules() if isinstance(b, feedforward.SigmoidRouterMoE)]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_slots_is_the_sum_over_each_tokens_slots_bit_for_bit(k, dtype):
    y = torch.randn(5 * k, 7, generator=torch.Generator().manual_seed(k)).to(dtype).requires_grad_()
    grad = torch.randn(5, 7).to(dtype)
    out = feedforward.sum_slots(y, 5, k)
    expected = y.view(5, k, 7).sum(dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(*(torch.autograd.grad(o, y, grad)[0] for o in (out, expected)))
