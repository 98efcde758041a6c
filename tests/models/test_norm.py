"""RMSNorm: the CPU fp32 path written out computes nn.RMSNorm's output and gradients; everything else is
nn.RMSNorm itself."""

import pytest
import torch
from torch import nn

from blueberry.models.norm import RMSNorm


def _pair(d=24, eps=1e-6):
    ours, torchs = RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        torchs.weight.copy_(ours.weight)
    return ours, torchs


def _float64_norm(x, weight, eps):
    x, weight = x.double(), weight.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
def test_output_and_gradients_equal_float64_math_to_fp32_round_off(shape):
    ours, _ = _pair()
    gen = torch.Generator().manual_seed(0)
    # rows of very different scales, one whose mean square is near eps (where the eps term shows)
    scales = torch.logspace(-3, 2, shape[-2]).view(-1, 1)
    x = (torch.randn(shape, generator=gen) * scales).requires_grad_()
    grad = torch.randn(shape, generator=gen)
    out = ours(x)
    got = torch.autograd.grad(out, (x, ours.weight), grad)
    x64 = x.detach().double().requires_grad_()
    w64 = ours.weight.detach().double().requires_grad_()
    ref = _float64_norm(x64, w64, ours.eps)
    expected = torch.autograd.grad(ref, (x64, w64), grad.double())
    assert out.dtype == torch.float32 and out.grad_fn.name() == "_RMSNormBackward"
    torch.testing.assert_close(out, ref.float(), rtol=2e-6, atol=1e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.float(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_it_matches_nn_rms_norm_under_bf16_autocast_too(autocast):
    ours, torchs = _pair()
    x = torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(1))
    results = []
    for norm in (ours, torchs):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm(inputs)
        out.backward(torch.arange(24.0).expand_as(out))
        results.append((out.detach(), inputs.grad, norm.weight.grad))
    assert results[0][0].dtype == torch.float32
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_gets_no_gradient_and_the_input_still_does():
    ours, torchs = _pair()
    ours.weight.requires_grad_(False)
    torchs.weight.requires_grad_(False)
    x = torch.randn(4, 24, requires_grad=True)
    (grad,) = torch.autograd.grad(ours(x).square().sum(), x)
    (expected,) = torch.autograd.grad(torchs(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_other_dtypes_take_nn_rms_norm_and_the_state_dict_is_nn_rms_norms():
    ours, torchs = _pair()
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    out = ours.to(torch.bfloat16)(x)
    assert out.grad_fn.name() != "_RMSNormBackward"
    assert torch.equal(out, torchs.to(torch.bfloat16)(x))
    assert ours.state_dict().keys() == torchs.state_dict().keys() and repr(ours) == repr(torchs)


def test_a_single_vector_is_normalised_and_several_normalised_dims_take_nn_rms_norm():
    ours, torchs = _pair()
    x = torch.randn(24, requires_grad=True)
    torch.testing.assert_close(torch.autograd.grad(ours(x).sum(), x), torch.autograd.grad(torchs(x).sum(), x))
    wide, wide_torch = RMSNorm((4, 6)), nn.RMSNorm((4, 6))
    x = torch.randn(3, 4, 6)
    out = wide(x)
    assert out.grad_fn.name() != "_RMSNormBackward" and torch.equal(out, wide_torch(x))


def test_a_double_backward_is_refused_not_silently_wrong():
    ours, _ = _pair()
    x = torch.randn(3, 24, requires_grad=True)
    (grad,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|second time|does not require grad"):
        grad.sum().backward()
