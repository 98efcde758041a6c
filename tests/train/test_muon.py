"""Our Muon equals torch.optim.Muon on matrices (within bf16 round-off), treats each slice of an expert stack as
the matrix it is, orthogonalises in the dtype the hardware has, and its Gram Newton–Schulz (fp32 only) equals the
standard iteration."""

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


# wide and tall; small, and large enough for Gram Newton–Schulz (which bf16 does not take)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (128, 256), (256, 128)])
def test_updates_equal_torch_muon_within_bf16_round_off(shape):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=gen) * 0.02
    grads = [[torch.randn(shape, generator=gen)] for _ in range(3)]
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    exact = torch.nn.Parameter(start.double())
    steps(Muon([ours], lr=0.01, weight_decay=0.1, ns_dtype=torch.bfloat16), [ours], grads)
    steps(torch.optim.Muon([reference], lr=0.01, weight_decay=0.1, **TORCH_MUON), [reference], grads)
    steps(
        Muon([exact], lr=0.01, weight_decay=0.1, ns_dtype=torch.float64),
        [exact],
        [[g.double() for g in s] for s in grads],
    )

    def distance(p, q):  # of two updates, relative to the second
        return ((p.detach().double() - q.detach().double()).norm() / (q.detach().double() - start).norm()).item()

    # bf16 keeps 8 bits of mantissa: torch's update misses the exact (fp64) one by ~1 %, and ours by as much
    # (measured: the same bits; a matmul kernel rounding differently would still keep within these bounds)
    assert distance(reference, exact) < 0.02  # the same map
    assert distance(ours, reference) < 0.03
    assert distance(ours, exact) <= 1.5 * distance(reference, exact)
    assert not torch.equal(ours, start)


def test_fp32_orthogonaliser_matches_bf16_one_and_is_closer_to_orthogonal():
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fp32, bf16 = orthogonalise(g, torch.float32), orthogonalise(g, torch.bfloat16).float()
    assert fp32.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05  # the same map, rounded differently
    # Newton–Schulz leaves singular values in roughly [0.7, 1.2], not exactly 1 (Keller Jordan's coefficients)
    singular = torch.linalg.svdvals(fp32)
    assert singular.min() > 0.5 and singular.max() < 1.3


def wide_of_norm_one(shape, dtype, singular_values=None, seed=4):
    """A batch of wide matrices of Frobenius norm 1 (what `orthogonalise` hands an iteration); with
    `singular_values`, those of each matrix's top part (a gradient's spectrum decays fast) over a little noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if singular_values is not None:
        rank = len(singular_values)
        u = torch.linalg.qr(torch.randn(*shape[:-1], rank, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], rank, generator=gen, dtype=torch.float64)).Q
        x = (u * singular_values.double()) @ v.mT + 1e-4 * x
    return (x / x.norm(dim=(-2, -1), keepdim=True)).to(dtype)


def relative_error(x, reference):
    return ((x.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("shape", [(1, 16, 64), (3, 24, 96), (1, 128, 256)])
def test_gram_newton_schulz_is_the_standard_iteration(shape):
    x = wide_of_norm_one(shape, torch.float64)
    torch.testing.assert_close(muon.gram_newton_schulz(x), muon.newton_schulz(x), rtol=1e-9, atol=1e-12)


def test_gram_newton_schulz_in_fp32_stays_within_its_round_off_thanks_to_the_restart():
    # a gradient-like spectrum over three decades: without the restart the carried Gram matrix drifts
    shape, singular_values = (2, 128, 512), torch.logspace(0, -3, 48)
    exact = muon.newton_schulz(wide_of_norm_one(shape, torch.float64, singular_values))
    x = wide_of_norm_one(shape, torch.float32, singular_values)
    gram = relative_error(muon.gram_newton_schulz(x), exact)
    assert gram < 5e-5  # measured 1.4e-5 (the standard iteration: 6e-6)
    assert relative_error(muon.gram_newton_schulz(x, restarts=()), exact) > 3 * gram  # measured 10x


def test_fp32_muon_with_gram_newton_schulz_equals_the_exact_update():
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(256, 128, generator=gen) * 0.02
    grads = [torch.randn(256, 128, generator=gen) for _ in range(3)]
    ours, exact = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.double())
    steps(Muon([ours], lr=0.01, ns_dtype=torch.float32), [ours], [[g] for g in grads])
    steps(Muon([exact], lr=0.01, ns_dtype=torch.float64), [exact], [[g.double()] for g in grads])
    moved = (exact.detach() - start.double()).norm()
    assert (ours.detach().double() - exact.detach()).norm() < 1e-4 * moved


def test_large_wide_matrices_take_the_gram_iteration_in_fp32_only(monkeypatch):
    taken = []
    monkeypatch.setattr(muon, "gram_newton_schulz", lambda x, steps: taken.append(tuple(x.shape)) or x)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(128, 200), (200, 128), (16, 64), (128, 256), (512, 128), (3, 128, 384)]:
            orthogonalise(torch.randn(shape), dtype)
    assert taken == [(1, 128, 256), (1, 128, 512), (3, 128, 384)]  # the fp32 ones


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


def test_matrices_of_one_shape_are_orthogonalised_in_one_call_each_as_alone(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    shapes = [(12, 20), (30, 8), (12, 20), (2, 12, 20)]  # a stack, a batch already, stays one
    start = [torch.randn(shape, generator=gen) * 0.02 for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(2)]
    together = [torch.nn.Parameter(t.clone()) for t in start]
    calls = []
    real = muon.orthogonalise
    monkeypatch.setattr(muon, "orthogonalise", lambda m, dtype: calls.append(tuple(m.shape)) or real(m, dtype))
    # two groups (their own LR and weight decay): shapes meet across them
    groups = [{"params": together[:2]}, {"params": together[2:], "lr": 0.03, "weight_decay": 0.1}]
    steps(Muon(groups, lr=0.02, ns_dtype=torch.float32), together, grads)
    assert calls == [(2, 12, 20), (1, 30, 8), (2, 12, 20)] * 2
    for i, (lr, decay) in enumerate([(0.02, 0.0), (0.02, 0.0), (0.03, 0.1), (0.03, 0.1)]):
        alone = torch.nn.Parameter(start[i].clone())
        steps(Muon([alone], lr=lr, weight_decay=decay, ns_dtype=torch.float32), [alone], [[g[i]] for g in grads])
        torch.testing.assert_close(together[i].detach(), alone.detach(), rtol=1e-5, atol=1e-6)


def test_a_fused_gate_up_stack_is_updated_as_its_separate_gate_and_up_matrices():
    """transformers stores each routed expert's gate and up projections as one [2 × I, H] matrix; Muon updates
    them as the reference's separate gate_proj and up_proj Linear layers (orthogonalised, LR-scaled by I / H)."""
    gen = torch.Generator().manual_seed(4)
    fused = torch.nn.Parameter(torch.randn(3, 2 * 24, 16, generator=gen) * 0.02)  # 3 experts, I = 24, H = 16
    joint = torch.nn.Parameter(fused.detach().clone())
    halves = [torch.nn.Parameter(half.clone()) for e in range(3) for half in fused.detach()[e].chunk(2)]
    grads = [torch.randn(3, 48, 16, generator=gen) for _ in range(2)]
    steps(Muon([fused], lr=0.02, ns_dtype=torch.float32, row_blocks={fused: 2}), [fused], [[g] for g in grads])
    steps(Muon(halves, lr=0.02, ns_dtype=torch.float32), halves, [[h for e in g for h in e.chunk(2)] for g in grads])
    steps(Muon([joint], lr=0.02, ns_dtype=torch.float32), [joint], [[g] for g in grads])
    torch.testing.assert_close(fused.detach(), torch.stack([h.detach() for h in halves]).view(3, 48, 16))
    assert (joint - fused).abs().max() > 1e-3  # one orthogonalisation of [gate; up] is another update
    with pytest.raises(ValueError, match="do not split into 2"):
        Muon([odd := torch.nn.Parameter(torch.zeros(2, 5, 4))], lr=0.01, row_blocks={odd: 2})


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
