"""Muon for every hidden weight matrix, routed-expert stacks included, orthogonalised in the precision the hardware has.

The update is torch.optim.Muon's (Nesterov momentum, five quintic Newton–Schulz steps with Keller Jordan's
coefficients, decoupled weight decay, LR scaled by sqrt(max(1, rows / cols))), with two differences:
- a 3-D parameter [experts, out, in] is a stack of matrices, orthogonalised one matrix per expert in one
  batched Newton–Schulz: whatever module holds an expert, its matrix gets the same update; a parameter given
  `row_blocks` n holds n equal matrices stacked by rows in each of its matrices (a fused [gate; up] projection:
  2), each orthogonalised and LR-scaled as the separate matrix it stands for;
- Newton–Schulz runs in `ns_dtype`: torch casts to bf16 unconditionally, which on CPUs without native bf16
  (AVX2 only) made one 512 × 2,048 orthogonalisation take 13.8 s against 0.50 s in fp32 (an AMD EPYC).
  `orthogonaliser_dtype` picks bf16 on Ampere+ GPUs and bf16-capable CPUs (AMX, AVX512-BF16), fp32 elsewhere.
And one difference in how, not what: where Newton–Schulz runs in fp32, a large matrix at least twice as wide as
tall (after transposing a tall one) runs the same five steps as Gram Newton–Schulz (`gram_newton_schulz`), on its
small square Gram matrix.
Neither heavyball nor pytorch-optimizer is a dependency of the project; the loop below is small.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from blueberry.hardware import cpu_supports_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # as torch.optim.Muon (torch/optim/_muon.py)
NS_STEPS = 5
EPS = 1e-7
# Gram Newton–Schulz (see there) in fp32 (or wider) for a matrix at least GRAM_MIN_ASPECT times as wide as tall
# (after transposing) and at least GRAM_MIN_ROWS tall. Five steps with one restart multiply 4r + 14 (short side)³
# blocks against the standard iteration's 10r + 5 (r = long side ÷ short side): fewer from r = 1.5. In fp32 on 2
# AVX512 EPYC cores: an 8 × 512 × 2,048 expert stack 287 ms against 445, 512 × 3,072 44 against 78,
# 8 × 512 × 1,024 214 against 241, 4 × 128 × 512 2.4 against 3.6; its result within 2e-5 of the exact one (the
# standard iteration's: 2e-6). Not in bf16, though it was 1.4-1.7x faster there too: its results came out
# 0.4-0.6 % smaller in norm than the standard iteration's, whatever the restarts (a bias, not noise), and six of
# `make run`'s seven variants ended 0.0014-0.0020 higher in val/loss (means of 3 seeds).
GRAM_MIN_ASPECT = 2
GRAM_MIN_ROWS = 128
GRAM_RESTARTS = (2,)  # steps at which Gram Newton–Schulz rebuilds X and its Gram matrix (see there)


def orthogonaliser_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (Ampere+ GPUs, AMX / AVX512-BF16 CPUs), else fp32.

    A T4 or V100 (compute capability 7.x) has no bf16 tensor cores: torch emulates bf16 there, slower than fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32


def orthogonalise(update: Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> Tensor:
    """Newton–Schulz approximation of U V^T for each matrix of `update` ([rows, cols] or [batch, rows, cols]).

    Each matrix is scaled to Frobenius norm ≤ 1 (so its spectral norm is ≤ 1), then iterated on the wide
    orientation (rows ≤ cols) as torch does: by `newton_schulz`, or by `gram_newton_schulz` where that pays and
    is exact (fp32 or wider, `GRAM_MIN_ASPECT`, `GRAM_MIN_ROWS`).
    """
    x = update.to(dtype)
    x = x.unsqueeze(0) if x.ndim == 2 else x
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)
    rows, cols = x.shape[-2:]
    use_gram = torch.finfo(dtype).bits >= 32 and rows >= GRAM_MIN_ROWS and cols >= GRAM_MIN_ASPECT * rows
    x = gram_newton_schulz(x, steps) if use_gram else newton_schulz(x, steps)
    if tall:  # back in the parameter's layout: adding a transposed bf16 update into it took 1.5x as long as copying
        x = x.mT.contiguous()  # then adding (16 × 1,024 × 512: 25.8 ms against 17.7 ms, 2-core AMX Xeon)
    return x.view(update.shape)


def newton_schulz(x: Tensor, steps: int = NS_STEPS) -> Tensor:
    """torch's iteration on a batch of wide matrices [batch, n, m] (n ≤ m) of norm ≤ 1:
    X <- a X + (b G + c G²) X with G = X Xᵀ."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)  # not `x @ x.mT`: matmul copies the transposed operand first (2x the time on CPU)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def gram_newton_schulz(x: Tensor, steps: int = NS_STEPS, restarts: tuple[int, ...] = GRAM_RESTARTS) -> Tensor:
    """`newton_schulz`'s result, computed on the n × n Gram matrix instead of the n × m X (Gram Newton–Schulz,
    https://tridao.me/blog/2026/gram-newton-schulz/).

    Each step is X <- P X with P = a I + b G + c G², a polynomial in G = X Xᵀ. So X_k = Q X_0 with Q the product
    of the steps' P, and the next Gram matrix is P G P: the steps multiply n × n matrices only, and X is
    multiplied at the start, at each restart and once at the end. Carried along, G drifts from the true Gram
    matrix of Q X_0 (in fp32, on a gradient whose singular values span three decades, 10x the error of a run
    rebuilding X and G at step 2; in bf16, 10-18 times the result's norm); `restarts` rebuild them, at step 2 as
    DeepSpeed's Muon does.
    """
    a, b, c = NS_COEFFICIENTS
    eye = torch.eye(x.size(-2), dtype=x.dtype, device=x.device)
    gram = torch.bmm(x, x.mT)
    product = None  # Q since the last restart
    for step in range(steps):
        if step in restarts and product is not None:
            x = torch.bmm(product, x)
            gram, product = torch.bmm(x, x.mT), None
        # The step's P = a I + Z with Z = b G + c G², applied as a M + Z M: the a M term is then added inside the
        # matmul, before its result is rounded, where a P formed first rounds Z's diagonal against a = 3.4 (in
        # bf16: twice the round-off).
        z = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        product = z + a * eye if product is None else torch.baddbmm(product, z, product, beta=a)  # P Q
        if step + 1 < steps and step + 1 not in restarts:  # the last step and a restart's need no new G
            gram_p = torch.baddbmm(gram, gram, z, beta=a)  # G P
            gram = torch.baddbmm(gram_p, z, gram_p, beta=a)  # P G P
    return torch.bmm(product, x)


class Muon(torch.optim.Optimizer):
    """Muon over 2-D matrices and 3-D stacks of matrices (see the module docstring)."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.bfloat16,
        row_blocks: dict[Tensor, int] | None = None,
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
        # neither is a group entry: checkpoints hold only plain values
        self.ns_dtype = ns_dtype
        self.row_blocks = dict(row_blocks or {})  # parameter -> equal matrices stacked by rows (module docstring)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices or stacks of matrices, got a parameter of shape {p.shape}")
                if p.shape[-2] % self.row_blocks.get(p, 1):
                    raise ValueError(f"{p.shape[-2]} rows do not split into {self.row_blocks[p]} equal matrices")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Matrices of one shape are orthogonalised together, in one batched Newton–Schulz: a 512d dense model's 15
        # matrices in 4 calls, its Newton–Schulz 200 -> 165 ms a step in bf16 (2-core AMX Xeon), the same results.
        # A stack (expert stacks, fused gate/up blocks) is a batch already and stays alone: joining the 512d MoE's
        # stacks into 54- and 27-matrix batches (a copy of them all, working sets past the caches) made its step
        # 0.95x as fast.
        batches = defaultdict(list)  # (device, rows, cols), or a stack's id -> [(parameter, its matrices, its LR step)]
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                blocks = self.row_blocks.get(p, 1)
                rows, cols = p.shape[-2] // blocks, p.shape[-1]
                matrices = update.reshape(-1, rows, cols)  # [blocks of every matrix, rows, cols]
                p.mul_(1 - lr * decay)
                batch = (p.device, rows, cols) if len(matrices) == 1 else id(p)
                batches[batch].append((p, matrices, -lr * math.sqrt(max(1, rows / cols))))
        for members in batches.values():
            matrices = [m for _, m, _ in members]
            orthogonal = orthogonalise(torch.cat(matrices) if len(matrices) > 1 else matrices[0], self.ns_dtype)
            for (p, _, step), own in zip(members, orthogonal.split([len(m) for m in matrices]), strict=True):
                p.view(own.shape).add_(own, alpha=step)
        return loss
