"""Our Muon equals torch.optim.Muon on matrices (within bf16 round-off), treats each slice of an expert stack as
the matrix it is, and orthogonalises in the dtype the hardware has."""

import pytest
import torch

from blueberry.train import muon
from blueberry.train.muon import Muon, orthogonalise, orthogonaliser_dtype

TORCH_MUON = dict(momentum=0.95, nesterov=True, adjust_lr_fn="original")


def steps(optimizer, params, grads):
    for grad_step in grads:
        for p, g in zip(params, grad_step):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # wide and tall
def test_updates_equal_torch_muon_within_bf16_round_off(shape):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=gen) * 0.02
    grads = [[torch.randn(shape, generator=gen)] for _ in range(3)]
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    steps(Muon([ours], lr=0.01, weight_decay=0.1, ns_dtype=torch.bfloat16), [ours], grads)
    steps(torch.optim.Muon([reference], lr=0.01, weight_decay=0.1, **TORCH_MUON), [reference], grads)
    moved = (reference - start).abs().max()
    # bf16 keeps 8 bits of mantissa: the two Newton–Schulz runs round differently, by ~1 % of the update
    assert (ours - reference).abs().max() <= 0.02 * moved
    assert not torch.equal(ours, start)


def test_fp32_orthogonaliser_matches_bf16_one_and_is_closer_to_orthogonal():
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fp32, bf16 = orthogonalise(g, torch.float32), orthogonalise(g, torch.bfloat16).float()
    assert fp32.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05  # the same map, rounded differently
    # Newton–Schulz leaves singular values in roughly [0.7, 1.2], not exactly 1 (Keller Jordan's coefficients)
    singular = torch.linalg.svdvals(fp32)
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_a_stack_is_orthogonalised_one_expert_at_a_time():
    gen = torch.Generator().manual_seed(2)
    stack = torch.randn(4, 16, 8, generator=gen)
    batched = orthogonalise(stack, torch.float32)
    for e in range(4):
        torch.testing.assert_close(batched[e], orthogonalise(stack[e], torch.float32), rtol=1e-5, atol=1e-6)


def test_stack_update_equals_per_matrix_updates():
    gen = torch.Generator().manual_seed(3)
    stack = torch.nn.Parameter(torch.randn(3, 12, 20, generator=gen) * 0.02)
    slices = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    grads = [torch.randn(3, 12, 20, generator=gen) for _ in range(2)]
    steps(Muon([stack], lr=0.02, ns_dtype=torch.float32), [stack], [[g] for g in grads])
    steps(Muon(slices, lr=0.02, ns_dtype=torch.float32), slices, [list(g.unbind(0)) for g in grads])
    for e in range(3):
        torch.testing.assert_close(stack.detach()[e], slices[e].detach(), rtol=1e-5, atol=1e-6)


def test_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert orthogonaliser_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: bf16 emulated
    assert orthogonaliser_dtype(torch.device("cuda")) == torch.float32
    monkeypatch.setattr(muon, "cpu_supports_bf16", lambda: False)  # AVX2 only
    assert orthogonaliser_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(muon, "cpu_supports_bf16", lambda: True)  # AMX or AVX512-BF16
    assert orthogonaliser_dtype(torch.device("cpu")) == torch.bfloat16


def test_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=0.01)
