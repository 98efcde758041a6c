"""Forward/backward for every preset, router statistics, balance loss and initialisation."""

import pytest
import torch
from tiny_models import VOCAB, tiny

from blueberry.models import build_model, registry
from blueberry.models.feedforward import switch_balance
from blueberry.spec import VARIANTS


def train_step(model):
    ids = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
    loss.backward()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(variant):
    torch.manual_seed(0)
    model = build_model(tiny(variant), VOCAB)
    out = train_step(model)
    assert out.logits.shape == (2, 16, VOCAB)
    assert out.aux_loss.shape == ()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_router_stats_and_aux_loss(variant):
    torch.manual_seed(0)
    spec = tiny(variant, **({"balance": "aux_loss"} if tiny(variant).is_moe else {}))
    out = train_step(build_model(spec, VOCAB))
    if not spec.is_moe:
        assert out.router_stats == [] and out.aux_loss.item() == 0.0
        return
    assert [s.layer for s in out.router_stats] == [0, 1]
    for stats in out.router_stats:
        assert stats.load.shape == (spec.n_experts,) and not stats.load.requires_grad
        assert stats.load.sum().item() == pytest.approx(1.0)
        assert stats.load.max().item() < 1.0  # tokens are spread over several experts
        # E · Σ f_i P_i: at initialisation the router is near uniform (P_i ≈ 1/E), so the Switch loss is ≈ Σ f_i = 1
        assert stats.balance_loss.item() == pytest.approx(1.0, abs=0.01)
    assert out.aux_loss.requires_grad
    weighted = spec.balance_loss_weight * sum(s.balance_loss for s in out.router_stats)
    assert out.aux_loss.item() == pytest.approx(weighted.item()) and out.aux_loss.item() > 0


def test_zero_balance_weight_still_logs():
    out = train_step(build_model(tiny("moe", balance_loss_weight=0.0), VOCAB))
    assert out.aux_loss.item() == 0.0
    assert all(s.balance_loss.item() > 0 for s in out.router_stats)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if registry.FFNS[registry.PRESETS[v].ffn].routed])
def test_gradient_reaches_several_experts(variant):
    torch.manual_seed(0)
    model = build_model(tiny(variant), VOCAB)
    train_step(model)
    experts = model.blocks[0].ffn.routed_experts()
    if isinstance(experts, torch.nn.ModuleList):  # one module per expert
        per_expert = [sum(p.grad.abs().sum() for p in expert.parameters()) for expert in experts]
    else:  # the experts' weights stacked, the expert first
        per_expert = sum(p.grad.abs().flatten(1).sum(1) for p in experts.parameters())
    assert sum(g > 0 for g in per_expert) >= 2  # (the routers: test_the_language_models_loss_reaches_every_router)


def test_switch_balance_extremes():
    n, experts = 12, 4
    uniform = switch_balance(torch.full((n, experts), 1 / experts), torch.arange(n * 2).view(n, 2) % experts)
    assert uniform.load.tolist() == [0.25] * 4 and uniform.balance_loss.item() == pytest.approx(1.0)
    collapsed = switch_balance(torch.eye(experts)[[0] * n], torch.zeros(n, 1, dtype=torch.long))
    assert collapsed.balance_loss.item() == pytest.approx(experts)


def test_init_keeps_norms_and_buffers():
    torch.manual_seed(0)
    model = build_model(tiny("attention_moe", init_std=0.02), VOCAB)
    moe = model.blocks[0].ffn.moe
    assert torch.equal(moe.gate.e_score_correction_bias, torch.zeros(4))
    assert torch.equal(model.norm.weight, torch.ones(32))
    assert model.blocks[0].attn.mla.q_a_proj.bias.abs().sum() == 0
    for p in (model.tok_emb.weight, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj):
        assert p.std().item() == pytest.approx(0.02, rel=0.2)


def test_eval_is_deterministic():
    torch.manual_seed(0)
    model = build_model(tiny("baseline"), VOCAB).eval()  # no dropout, no router noise
    ids = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("balance", ["bias_update", "none"])
def test_without_the_aux_loss_the_balance_loss_is_only_logged(balance):
    spec = tiny("deepseek_v3", balance=balance)
    out = train_step(build_model(spec, VOCAB))
    assert out.aux_loss.item() == 0.0 and all(s.balance_loss.item() > 0 for s in out.router_stats)


@pytest.mark.parametrize("ffn", [name for name, f in registry.FFNS.items() if f.routed])
@pytest.mark.parametrize("n_experts,top_k", [(2, 1), (2, 2), (4, 1), (4, 2)])  # Experiment 3's expert search
def test_the_language_models_loss_reaches_every_router(ffn, n_experts, top_k):
    """The router learns from the loss, not only from a balance term: with one chosen expert a weight normalised
    over the chosen ones is 1 whatever the router says, so top-1 weights a token by its router score instead."""
    torch.manual_seed(0)
    model = build_model(tiny(None, attention="mha", ffn=ffn, n_experts=n_experts, top_k=top_k), VOCAB)
    ids = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten()).backward()  # no aux loss
    routers = [p for name, p in model.named_parameters() if name.endswith((".router.weight", ".gate.weight"))]
    assert len(routers) == 2  # one per layer
    for router in routers:
        assert router.grad.abs().max() > 1e-6


@pytest.mark.parametrize("autocast", [False, True])
def test_our_rms_norm_computes_transformers_deepseek_v3_norm(autocast):
    """Our RMSNorm (norm.py) in our blocks: the output and gradients of DeepseekV3RMSNorm on the fp32 residual
    stream, under bf16 autocast too."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from blueberry.models.lm import rms_norm

    ours, theirs = rms_norm(32), DeepseekV3RMSNorm(32)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    # one sequence of large values, one of values whose mean square is near eps (where a wrong eps shows)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1e-3])[:, None, None]
    results = []
    for norm in (ours, theirs):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm(inputs)
        out.backward(torch.ones_like(out) * torch.arange(32.0))
        results.append((out.detach(), inputs.grad, norm.weight.grad))
    assert results[0][0].dtype == torch.float32
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
