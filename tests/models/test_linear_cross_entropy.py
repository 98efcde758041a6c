"""The chunked LM-head cross-entropy equals the plain one (full logits) in loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from blueberry.models import linear_cross_entropy as lce
from blueberry.models.linear_cross_entropy import block_rows, chunk_rows, linear_cross_entropy


def _inputs(n=37, d=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, d, generator=gen)).requires_grad_()
    targets = torch.randint(vocab, (n,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 37, 1000])  # one row per chunk, ragged tail, exact, one chunk
def test_loss_and_gradients_equal_full_logits_fp32(rows_per_chunk):
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, rows_per_chunk)
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))  # a non-unit upstream gradient, as GradScaler gives
    expected = F.cross_entropy(F.linear(hidden, weight), targets)
    expected_grads = torch.autograd.grad(3.0 * expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-7)


def test_several_blocks_of_stored_gradients_equal_one(monkeypatch):
    """Blocks of 2 chunks of 5 rows (the last one ragged) sum to the same gradients as the full logits."""
    hidden, weight, targets = _inputs()
    monkeypatch.setattr(lce, "GRAD_BLOCK_BYTES", 2 * 5 * 50 * 4)  # two chunks of 5 rows × 50 tokens, fp32
    assert block_rows(50, 5, 4, lce.GRAD_BLOCK_BYTES) == 10
    test_loss_and_gradients_equal_full_logits_fp32(5)


def test_block_rows_are_whole_chunks_within_the_bytes():
    assert block_rows(8192, 256, 2) == 8192 and block_rows(49_152, 256, 2) == 1280
    assert block_rows(49_152, 256, 2) * 49_152 * 2 <= 128 * 2**20
    assert block_rows(10**9, 7, 2) == 7  # at least one chunk


def test_a_target_far_below_the_top_logit_keeps_its_exact_loss():
    """p(target) = e^-500 is 0 in fp32; the loss is still lse - logit, not inf."""
    hidden, weight, targets = _inputs(n=4, d=2, vocab=3)
    with torch.no_grad():
        hidden.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
        weight.copy_(torch.tensor([[0.0, 0.0], [250.0, 0.0], [-250.0, 0.0]]))
    targets = torch.tensor([2, 0, 2, 1])  # rows 0 and 3: 500 nats below the top logit
    loss = linear_cross_entropy(hidden, weight, targets, rows_per_chunk=2)
    expected = F.cross_entropy(F.linear(hidden, weight), targets)
    assert expected > 250
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)


def test_bf16_autocast_matches_the_plain_autocast_path():
    """Under bf16 autocast both paths run the matmuls in bf16 and the softmax in fp32."""
    hidden, weight, targets = _inputs(n=64, d=32, vocab=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, rows_per_chunk=16)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    assert loss.dtype == torch.float32 and grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-4)


def test_fp16_keeps_the_gradient_of_small_probabilities():
    """fp16 (the T4 path): with 4,096 rows and a 16,384-token vocabulary, softmax / N is ~1.5e-8, below the bottom of
    fp16's range. The weight rows of never-targeted tokens get only those terms; the 1/N is applied after the
    matmuls, so they still match fp32's."""
    hidden, weight, _ = _inputs(n=4096, d=16, vocab=16384)
    targets = torch.zeros(
        4096, dtype=torch.long
    )  # every row targets token 0: rows 1.. of the gradient are softmax only
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(hidden, weight, targets, rows_per_chunk=1024)
    (grad,) = torch.autograd.grad(loss, (weight,))
    (expected,) = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight), targets), (weight,))
    torch.testing.assert_close(grad[1:], expected[1:], rtol=2e-2, atol=2e-2 * expected[1:].abs().max().item())


def test_fp16_sums_the_weight_gradient_over_one_chunk_at_a_time():
    """A weight-gradient product over a whole block of 8,192 rows (half targeting one token, a hidden unit near 20)
    rounds to -inf in fp16 before the 1/N, and no GradScaler scale brings it back; over 256-row chunks it is finite."""
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(8192, 8, generator=gen) + torch.tensor([20.0] + [0.0] * 7)).requires_grad_()
    weight = (0.02 * torch.randn(64, 8, generator=gen)).requires_grad_()
    targets = torch.zeros(8192, dtype=torch.long)
    targets[::2] = torch.randint(64, (4096,), generator=gen)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(hidden, weight, targets)
    (grad,) = torch.autograd.grad(loss, (weight,))
    (expected,) = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight), targets), (weight,))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_no_gradients_asked_for_gives_the_same_loss():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, rows_per_chunk=4)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), targets))


def test_chunk_rows_bounds_the_logits_of_one_chunk():
    assert chunk_rows(49_152) * 49_152 * 4 <= 128 * 2**20 < (chunk_rows(49_152) + 1) * 49_152 * 4
    assert chunk_rows(10**12) == 1
