"""Token streams, fixed validation windows and the stateless training-window sampler."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from blueberry.data.errors import DataError

ENCODE_CHUNK = 64  # documents per encode call: large enough for the tokenizer's threads, small enough to stop early


def build_stream(
    texts: Sequence[str], encode: Callable[[list[str]], list[list[int]]], eos_id: int, cap: int | None = None
) -> np.ndarray:
    """Concatenate the encoded texts with an EOS after each one; int32, cut to `cap` tokens.

    Encoding stops as soon as the cap is reached, so a small cap on a large corpus stays cheap.
    """
    parts, total = [], 0
    for start in range(0, len(texts), ENCODE_CHUNK):
        for ids in encode(list(texts[start : start + ENCODE_CHUNK])):
            parts.append(np.asarray([*ids, eos_id], dtype=np.int32))
            total += len(parts[-1])
        if cap is not None and total >= cap:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream[:cap] if cap is not None else stream


def val_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Windows of seq_len+1 tokens at stride seq_len, in stream order: [N, seq_len+1], N = (len-1) // seq_len.

    Consecutive windows share one token (the last input of one is the first of the next), so every
    target tokens[1 : N*seq_len + 1] is scored exactly once; the tail of fewer than seq_len targets is dropped.
    """
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"validation split has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}; "
            "raise val_fraction or max_tokens, or lower seq_len"
        )
    return tokens.unfold(0, seq_len + 1, seq_len).contiguous()


def step_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from (seed, step): unrelated seeds for neighbouring steps."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little")


class TrainSampler:
    """Random training windows from a stateless rule: batch(step) depends only on (seed, step, rank, world).

    No iterator state means resume is just "continue at step k", and each rank of a world takes its own
    slice of one global draw, so ranks never share a draw and the global batch does not depend on `world`
    sharding (world × batch_size windows per step in all).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if len(tokens) < seq_len + 1:
            raise DataError(f"training split has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.n_starts = len(tokens) - seq_len  # a window starting at s ends at s + seq_len + 1 <= len(tokens)
        self._offsets = torch.arange(seq_len + 1)

    def starts(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Window start offsets of this rank's share of the step's draw."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        generator = torch.Generator().manual_seed(step_seed(self.seed, step))
        draw = torch.randint(self.n_starts, (world * self.batch_size,), generator=generator)
        return draw[rank * self.batch_size : (rank + 1) * self.batch_size]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """LongTensor [batch_size, seq_len+1]: inputs are [:, :-1], targets [:, 1:]."""
        return self.tokens[self.starts(step, rank, world)[:, None] + self._offsets]
