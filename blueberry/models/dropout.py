"""Dropout on CPUs: the same Bernoulli(p) mask as `F.dropout`, drawn several times faster.

On a CPU, `F.dropout` draws one Bernoulli sample per element (`bernoulli_`, 5-7 ns each on 2 cores), then
divides and multiplies in two more passes. With the study's p = 0.1 that was 14 % of a bf16 step at 512d on
a 2-core AVX512-BF16 EPYC (torch profiler). Here only the dropped positions are drawn: in a sequence of
independent Bernoulli(p) trials the gaps between successes are independent Geometric(p) variables, so
about p·n draws (`geometric_gaps`, from torch's generator: seeded and checkpointed like any other draw) give the
exact distribution of the whole mask. The kept elements are scaled by 1/(1-p) in one pass, in fp32 arithmetic
(`F.dropout` on a bf16 tensor scales by bf16(1/(1-p)): 1.109 instead of 1.111 for p = 0.1).

GPUs keep `F.dropout` (one fused kernel there), and so does `torch.compile`, which fuses dropout itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropped_positions(n: int, p: float, device: torch.device | str = "cpu", draws: int | None = None) -> torch.Tensor:
    """The sorted indices in [0, n) that a Bernoulli(p) process over n trials selects (int64).

    `draws`: gaps drawn at a time; by default about p·n plus 8 standard deviations, so that one round almost
    always reaches n.
    """
    if n == 0 or p == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    draws = draws or int(n * p + 8 * math.sqrt(n * p * (1 - p)) + 16)
    ends = geometric_gaps(draws, p, device).cumsum_(0)  # exact below 2**53
    while ends[-1] < n:
        ends = torch.cat([ends, geometric_gaps(draws, p, device).cumsum_(0).add_(ends[-1])])
    kept = int(torch.searchsorted(ends, float(n), right=True))  # ends is sorted: a slice, not a mask
    return ends[:kept].long().sub_(1)  # gap g ends at trial g: the index g - 1


def geometric_gaps(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """n independent Geometric(p) draws on {1, 2, ...} (float64), 0 < p < 1: floor(log(1 - U) / log(1 - p)) + 1,
    U uniform on [0, 1).

    P(gap > k) = P(1 - U <= (1 - p)^k) = (1 - p)^k. The inversion torch's `geometric_` computes element by
    element, here in vectorised passes over one `uniform_` draw: 4.6 ms against 11.2 ms for 845,827 draws.
    """
    u = torch.empty(n, dtype=torch.float64, device=device).uniform_()
    return u.neg_().log1p_().mul_(1 / math.log1p(-p)).floor_().add_(1)


class _SparseDropout(torch.autograd.Function):
    """x · 1/(1-p), with zeros at the dropped positions; the backward pass applies the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        dropped = dropped_positions(x.numel(), p, x.device)
        out = x.contiguous().mul(1 / (1 - p))  # flat indices address the logical order: contiguous
        out.view(-1).index_fill_(0, dropped, 0)
        ctx.save_for_backward(dropped)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        grad = grad.contiguous().mul(1 / (1 - ctx.p))
        grad.view(-1).index_fill_(0, dropped, 0)
        return grad, None


def zero_dropped_(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero a Bernoulli(p) draw of the elements of a contiguous `x` in place, unscaled, and return x; autograd
    masks the gradient the same way."""
    x.view(-1).index_fill_(0, dropped_positions(x.numel(), p, x.device), 0)
    return x


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, drawn sparsely on CPUs (module docstring)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or p >= 1 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _SparseDropout.apply(x, p)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same repr and state), drawn sparsely on CPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
