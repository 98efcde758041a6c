"""Token streams, validation windows and the stateless training sampler."""

import numpy as np
import pytest
import torch

from blueberry.data import DataError
from blueberry.data.windows import TrainSampler, build_stream, val_windows


def fake_encode(texts):
    return [[ord(c) for c in t] for t in texts]


def test_stream_puts_eos_after_every_document():
    stream = build_stream(["ab", "c", "de"], fake_encode, eos_id=0)
    assert stream.tolist() == [97, 98, 0, 99, 0, 100, 101, 0]
    assert stream.dtype == np.int32


def test_stream_cap_truncates_and_stops_encoding_early():
    calls = []
    texts = ["abcd"] * 1000

    def encode(batch):
        calls.append(len(batch))
        return fake_encode(batch)

    stream = build_stream(texts, encode, eos_id=0, cap=300)
    assert len(stream) == 300
    assert sum(calls) < len(texts)


@pytest.mark.parametrize("length", [129, 130, 1000, 1025])
def test_val_windows_score_every_target_exactly_once(length):
    seq_len = 128
    tokens = torch.arange(length)
    windows = val_windows(tokens, seq_len)
    n = (length - 1) // seq_len
    assert windows.shape == (n, seq_len + 1)
    targets = windows[:, 1:].flatten()
    # Each target position appears once, in order, with no gaps: non-overlapping, full coverage.
    assert targets.tolist() == list(range(1, n * seq_len + 1))
    assert length - 1 - n * seq_len < seq_len  # only a tail shorter than one window is left unscored
    # Each window's inputs are the true context of its targets.
    assert torch.equal(windows[:, :-1] + 1, windows[:, 1:])


def test_val_windows_need_enough_tokens():
    with pytest.raises(DataError, match="seq_len"):
        val_windows(torch.arange(10), 16)


def test_sampler_is_deterministic_and_stateless():
    tokens = torch.arange(5000)
    a, b = TrainSampler(tokens, 32, 8, seed=1), TrainSampler(tokens, 32, 8, seed=1)
    assert torch.equal(a.batch(7), b.batch(7))
    a.batch(1), a.batch(2)  # no hidden state: earlier calls do not change later batches
    assert torch.equal(a.batch(7), b.batch(7))
    assert not torch.equal(a.batch(7), a.batch(8))
    assert not torch.equal(a.batch(7), TrainSampler(tokens, 32, 8, seed=2).batch(7))


def test_sampler_windows_lie_inside_the_train_stream():
    length, seq_len = 300, 32
    sampler = TrainSampler(torch.arange(length), seq_len, 64, seed=0)
    starts = torch.cat([sampler.starts(step) for step in range(200)])
    assert starts.min() >= 0 and starts.max() <= length - seq_len - 1
    assert starts.max() == length - seq_len - 1 and starts.min() == 0  # the whole stream is reachable
    batch = sampler.batch(3)
    assert batch.shape == (64, seq_len + 1)
    assert torch.equal(batch, batch[:, :1] + torch.arange(seq_len + 1))  # contiguous slices of the stream


def test_sampler_ranks_get_disjoint_shares_of_one_global_draw():
    tokens = torch.arange(100_000)
    per_rank = TrainSampler(tokens, 16, 4, seed=3)
    shards = [per_rank.batch(5, rank=r, world=4) for r in range(4)]
    assert len({tuple(s[:, 0].tolist()) for s in shards}) == 4  # every rank sees different windows
    global_batch = TrainSampler(tokens, 16, 16, seed=3).batch(5)
    assert torch.equal(torch.cat(shards), global_batch)  # sharding does not change what a step trains on
    with pytest.raises(ValueError):
        per_rank.batch(0, rank=4, world=4)
