"""The LM head and its cross-entropy in chunks of tokens: the whole batch's fp32 logits never exist at once.

At the study's shape (16 × 256 tokens, a 49,152-token vocabulary) the plain path holds 4,096 × 49,152 fp32
logits (805 MB) plus their gradient, more than the model and its optimizer state together. Here each chunk of
rows is projected and reduced to its loss and its logits' gradient at once (forward-time gradients, as
Liger-Kernel's fused linear cross-entropy does); the logits' gradients of a block of chunks, kept in the matmuls'
dtype (≤ GRAD_BLOCK_BYTES), then give that block's share of the input and weight gradients in two matmuls, so
the peak holds one chunk's logits and their fp32 probabilities, one block's gradient and the input in the
matmuls' dtype, and the backward pass only rescales the stored gradients: three matmuls per row, as the plain path.

Precision follows autocast as the plain path does: the matmuls run in the autocast dtype (bf16/fp16) and the
softmax, the loss and the sum of the blocks' weight gradients in fp32 (in fp16 a block is one chunk). The loss
comes from the same `softmax` pass as the gradient (`nll_from_softmax`), rather than a `logsumexp` pass of its own.
"""

from __future__ import annotations

import torch

CHUNK_LOGIT_BYTES = 128 * 2**20  # one chunk's fp32 logits: ≤ 128 MiB, e.g. 682 rows of a 49,152-token vocabulary
# On a CPU the passes over a chunk's probabilities are memory-bound: chunks that stay in the cache are faster,
# down to where the per-chunk work (the logits' matmul) takes over. Forward + backward, bf16, 2-core AMX Xeon:
# 4,096 rows of 512 at an 8,192-token vocabulary 159 ms in chunks of 64 rows, 141 ms of 128, 146 ms of 256,
# 172 ms of 512, 229 ms of 1,024; 1,024 rows at 49,152 tokens 443-467 ms in chunks of 128 to 512.
CPU_CHUNK_ROWS = 256
# The logits' gradients kept for one block's input- and weight-gradient matmuls: a whole micro-batch of the
# study's 4,096 rows at its 8,192-token vocabulary in bf16 (64 MiB), 1,280 rows (whole chunks) at 49,152. Per
# chunk, those matmuls were slower (the whole loss 169 ms against 152 ms, 4,096 rows, 8,192 tokens, chunks of
# 512, 2-core AMX Xeon), and each chunk's weight gradient was added into fp32 in a pass of its own.
GRAD_BLOCK_BYTES = 128 * 2**20


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_LOGIT_BYTES, device_type: str | None = None) -> int:
    """Rows per chunk: ≤ `chunk_bytes` of fp32 logits, and ≤ CPU_CHUNK_ROWS where `device_type` is "cpu"."""
    rows = max(1, chunk_bytes // (4 * vocab_size))
    return min(rows, CPU_CHUNK_ROWS) if device_type == "cpu" else rows


def block_rows(vocab_size: int, rows_per_chunk: int, itemsize: int, block_bytes: int = GRAD_BLOCK_BYTES) -> int:
    """Rows per block of stored logits' gradients: whole chunks, ≤ `block_bytes` (at least one chunk)."""
    return max(1, block_bytes // (itemsize * vocab_size * rows_per_chunk)) * rows_per_chunk


def nll_from_softmax(probs: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """lse - logit(target) per row, from the fp32 softmax `probs` of a row's logits and `gap` = its largest logit m
    minus its target's: m's probability is 1/Σexp(logit - m) ≥ 1/V, so lse = m - log p(max). Exact to fp32
    round-off where p(target) itself is below fp32's range, and no data-dependent branch for torch.compile."""
    return gap - probs.amax(dim=-1).log()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, rows_per_chunk):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        w, h_all = weight.to(compute_dtype), hidden.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        # The weight gradient is summed transposed, [d, V]: each block's h.T @ grads adds in its own layout (4,096
        # rows, 49,152 tokens, blocks of 1,280, 2-core AMX Xeon: the whole loss 1,648 ms against 1,745 ms with a
        # transposed add per block), and is transposed once at the end into the weight's own layout: autograd adds
        # it to the tied embedding's gradient and to .grad, and a transposed operand made each of those adds
        # strided (8,192 × 512 fp32: 15.7 ms against 0.7 ms; the transposition 5.6 ms).
        grad_weight_t = None
        if needs_grad:
            grad_weight_t = torch.zeros(weight.shape[::-1], dtype=torch.float32, device=weight.device)
        if not needs_grad:
            per_block = n_rows
        elif compute_dtype == torch.float16:
            # A block's weight-gradient product is rounded to fp16 before the 1/N and any GradScaler scale, which
            # cannot then bring an inf back: in fp16 a block is one chunk, the rows one such sum covered before blocks
            per_block = rows_per_chunk
        else:
            per_block = block_rows(vocab, rows_per_chunk, w.element_size(), GRAD_BLOCK_BYTES)
        on_cpu = hidden.device.type == "cpu"
        with torch.autocast(hidden.device.type, enabled=False):
            for first in range(0, n_rows, per_block):
                last = min(first + per_block, n_rows)
                grads = torch.empty(last - first, vocab, dtype=compute_dtype, device=w.device) if needs_grad else None
                for start in range(first, last, rows_per_chunk):
                    end = min(start + rows_per_chunk, last)
                    t = targets[start:end]
                    logits = h_all[start:end] @ w.T  # [chunk, V] in the compute dtype, as F.linear under autocast
                    # On a CPU they are cast to fp32 once (as softmax(dtype=float32) would; amax over bf16 took 1.6x
                    # as long) and the softmax overwrites them: the loss of the study's micro-batch 157 -> 148 ms
                    # (2-core AMX Xeon). A GPU's fused softmax reads fp16/bf16 and writes fp32: one buffer less.
                    logits = logits.float() if on_cpu else logits
                    gap = logits.amax(dim=-1).float() - logits.gather(1, t[:, None]).squeeze(1).float()
                    if on_cpu:
                        probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
                    else:
                        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                    loss_sum += nll_from_softmax(probs, gap).sum()
                    if needs_grad:
                        # d(mean CE)/d(logits) = (softmax - onehot) / N. The 1/N is applied after the matmuls: in
                        # fp16, (softmax - onehot) / N would flush small probabilities to zero before any GradScaler.
                        probs[torch.arange(len(t), device=t.device), t] -= 1
                        grads[start - first : end - first] = probs
                if needs_grad:
                    grad_hidden[first:last] = (grads @ w).float() / n_rows
                    # h.T made contiguous (a small copy): grads.T @ h, its large operand transposed, ran at half
                    # the speed on oneDNN
                    grad_weight_t.add_(h_all[first:last].T.contiguous() @ grads)  # summed over blocks in fp32
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight_t.div_(n_rows).T.contiguous().to(weight.dtype))
        return loss_sum / n_rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()
        return (grad_hidden * scale).to(grad_hidden.dtype), grad_weight * scale, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int | None = None
) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight.T, targets_i) without the full [N, V] logits; hidden [N, d], weight [V, d].

    Equals `F.cross_entropy(F.linear(hidden, weight).float(), targets)` in value and gradients (to round-off),
    under autocast too. `rows_per_chunk` defaults to ≤ 128 MiB of fp32 logits per chunk, ≤ 256 rows on a CPU.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows_per_chunk or chunk_rows(weight.shape[0], device_type=device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, rows)
