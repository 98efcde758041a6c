"""Sparse dropout: the mask is a Bernoulli(p) process, the kept values are scaled by 1/(1-p), and the backward
pass applies the forward's mask."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blueberry.models.dropout import Dropout, dropout, dropped_positions, geometric_gaps


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropped_positions_are_a_bernoulli_process(p):
    torch.manual_seed(0)
    n = 1_000_000
    dropped = dropped_positions(n, p)
    assert dropped.dtype == torch.long and 0 <= dropped.min() and dropped.max() < n
    assert (dropped.diff() > 0).all()  # sorted, each position at most once
    assert _within(len(dropped), n, p)
    for lo, hi in [(0, n // 10), (n // 2, n // 2 + n // 10), (n - n // 10, n)]:  # the same rate everywhere
        assert _within(int(((dropped >= lo) & (dropped < hi)).sum()), hi - lo, p)
    # independent trials: the trial after a dropped one is dropped with probability p too
    after = dropped[:-1] + 1
    assert _within(int(torch.isin(after, dropped).sum()), len(after), p)


@pytest.mark.parametrize("p", [0.001, 0.1, 0.5, 0.9])
def test_gaps_are_geometric(p):
    torch.manual_seed(0)
    n = 200_000
    gaps = geometric_gaps(n, p)
    assert gaps.dtype == torch.float64 and gaps.min() >= 1 and torch.equal(gaps, gaps.floor())
    for k in (0, 1, 5):  # P(gap > k) = (1 - p)^k
        assert _within(int((gaps > k).sum()), n, (1 - p) ** k)


def test_a_round_of_draws_that_falls_short_draws_again():
    torch.manual_seed(1)
    dropped = dropped_positions(10_000, 0.3, draws=7)  # about 430 rounds
    assert (dropped.diff() > 0).all() and dropped.max() < 10_000 and _within(len(dropped), 10_000, 0.3)
    torch.manual_seed(1)
    assert torch.equal(dropped_positions(10_000, 0.3, draws=7), dropped)  # seeded like any torch draw


def test_the_last_position_is_dropped_at_the_rate_of_any_other():
    """A gap that ends exactly at trial n drops position n - 1 (the cut keeps ends <= n)."""
    torch.manual_seed(2)
    last = sum(int(dropped_positions(5, 0.5)[-1:].eq(4).sum()) for _ in range(2_000))
    assert _within(last, 2_000, 0.5)


def test_nothing_to_draw():
    assert dropped_positions(0, 0.5).numel() == 0 and dropped_positions(100, 0.0).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_values_are_scaled_and_the_backward_uses_the_same_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 300).to(dtype).T.requires_grad_()  # not contiguous: flat indices follow logical order
    y = dropout(x, 0.3)
    kept = y != 0
    assert _within(int((~kept).sum()), x.numel(), 0.3)
    torch.testing.assert_close(y[kept], (x.float() * (1 / 0.7)).to(dtype)[kept], rtol=0, atol=0)
    grad = torch.randn(300, 64).to(dtype)
    y.backward(grad)
    expected = torch.where(kept, (grad.float() * (1 / 0.7)).to(dtype), 0)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_mean_is_kept_as_f_dropout_keeps_it():
    torch.manual_seed(0)
    x = torch.ones(2_000_000)
    assert dropout(x, 0.1).mean().item() == pytest.approx(1.0, abs=2e-3)
    assert F.dropout(x, 0.1).mean().item() == pytest.approx(1.0, abs=2e-3)


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(8, 8)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.5).eval()
    assert module(x) is x


def test_the_module_is_an_nn_dropout():
    module = Dropout(0.1)
    assert isinstance(module, nn.Dropout) and repr(module) == repr(nn.Dropout(0.1)) and module.p == 0.1
    torch.manual_seed(3)
    y = module(torch.ones(1000))
    assert torch.isin(y.unique(), torch.tensor([0.0, 1 / 0.9])).all()
