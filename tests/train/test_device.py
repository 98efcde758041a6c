"""Device helpers: no TF32 switch and no pinned copy off CUDA."""

import torch

from blueberry.train.device import enable_tf32, to_device


def test_cpu_gets_neither_tf32_nor_pinned_copies():
    before = torch.backends.cuda.matmul.allow_tf32
    assert enable_tf32(torch.device("cpu")) is False and torch.backends.cuda.matmul.allow_tf32 == before
    batch = torch.arange(12).view(3, 4)
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved, batch) and not moved.is_pinned()
