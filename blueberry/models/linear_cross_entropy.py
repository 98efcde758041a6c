"""The LM head and its cross-entropy in chunks of tokens: the whole batch's fp32 logits never exist at once.

At the study's shape (16 × 256 tokens, a 49,152-token vocabulary) the plain path holds 4,096 × 49,152 fp32
logits (805 MB) plus their gradient, more than the model and its optimizer state together. Here each chunk of
rows is projected, reduced to its loss, and turned into its share of the input and weight gradients at once
(forward-time gradients, as Liger-Kernel's fused linear cross-entropy does), so the peak holds one chunk's
logits and the backward pass only rescales the stored gradients: three matmuls per chunk, as the plain path.

Precision follows autocast as the plain path does: the matmuls run in the autocast dtype (bf16/fp16) and the
softmax, the loss and the weight-gradient sum in fp32.
"""

from __future__ import annotations

import torch

CHUNK_LOGIT_BYTES = 128 * 2**20  # one chunk's fp32 logits: ≤ 128 MiB, e.g. 682 rows of a 49,152-token vocabulary
# On a CPU the passes over a chunk's logits are memory-bound: chunks that stay in the cache are faster, down to
# where the per-chunk work (the weight gradient's accumulation, smaller matmuls) takes over. Forward + backward
# of 4,096 rows of 512, bf16, on a 2-core AVX512-BF16 EPYC: 8,192-token vocabulary 324 ms in one chunk, 232 ms
# in chunks of 512 rows, 259 ms of 256; 49,152-token vocabulary (1,024 rows) 671 ms in chunks of 682 rows
# (the 128 MiB bound), 706 ms of 512.
CPU_CHUNK_ROWS = 512


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_LOGIT_BYTES, device_type: str | None = None) -> int:
    """Rows per chunk: ≤ `chunk_bytes` of fp32 logits, and ≤ CPU_CHUNK_ROWS where `device_type` is "cpu"."""
    rows = max(1, chunk_bytes // (4 * vocab_size))
    return min(rows, CPU_CHUNK_ROWS) if device_type == "cpu" else rows


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, rows_per_chunk):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_rows = hidden.shape[0]
        w = weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, rows_per_chunk):
                h = hidden[start : start + rows_per_chunk].to(compute_dtype)
                t = targets[start : start + rows_per_chunk]
                logits = (h @ w.T).float()  # [chunk, V]
                lse = torch.logsumexp(logits, dim=-1)
                loss_sum += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not needs_grad:
                    continue
                # d(mean CE)/d(logits) = (softmax - onehot) / N. The 1/N is applied after the matmuls: in fp16,
                # (softmax - onehot) / N would flush small probabilities to zero before any GradScaler scale.
                grad_logits = logits.sub_(lse[:, None]).exp_()  # in place in the logits' buffer
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1
                grad_logits = grad_logits.to(compute_dtype)
                grad_hidden[start : start + rows_per_chunk] = (grad_logits @ w).float() / n_rows
                grad_weight.add_(grad_logits.T @ h)  # accumulated in fp32
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.div_(n_rows).to(weight.dtype))
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
    under autocast too. `rows_per_chunk` defaults to ≤ 128 MiB of fp32 logits per chunk, ≤ 512 rows on a CPU.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows_per_chunk or chunk_rows(weight.shape[0], device_type=device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, rows)
