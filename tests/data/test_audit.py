"""Leakage audit and unigram baseline on synthetic streams."""

import math

import numpy as np
import pytest

from blueberry.data.audit import leakage, ngram_hashes, unigram_loss

EOS = 0


def random_stream(n, seed, vocab=500):
    return np.random.default_rng(seed).integers(1, vocab, n).astype(np.int32)


def test_copied_val_leaks_completely_and_disjoint_val_not_at_all():
    train = random_stream(20_000, 0)
    copied = leakage(train, train[5_000:9_000].copy(), n=8, seq_len=64, eos_id=EOS)
    assert copied["val_windows_with_train_ngram"] == 1.0 and copied["val_ngrams_in_train"] == 1.0
    fresh = leakage(train, random_stream(4_000, 1), n=8, seq_len=64, eos_id=EOS)
    assert fresh["val_windows_with_train_ngram"] == 0.0 and fresh["val_ngrams_in_train"] == 0.0


def test_one_shared_ngram_flags_only_its_window():
    train, val = random_stream(5_000, 0), random_stream(64 * 10 + 1, 1)
    val[3 * 64 + 10 : 3 * 64 + 18] = train[100:108]  # one 8-gram planted inside window 3
    report = leakage(train, val, n=8, seq_len=64, eos_id=EOS)
    assert report["val_windows_with_train_ngram"] == pytest.approx(1 / 10)
    assert report["val_ngrams_in_train"] > 0


def test_windows_too_short_for_the_ngram_are_not_measured_not_clean():
    train = random_stream(2_000, 0)
    report = leakage(train, train[:400].copy(), n=13, seq_len=8, eos_id=EOS)  # a window holds 9 tokens
    assert report["val_windows_with_train_ngram"] is None and report["val_ngrams_in_train"] == 1.0


def test_ngrams_across_document_boundaries_are_ignored():
    tokens = np.array([5, 6, EOS, 7, 8, 9], dtype=np.int32)
    hashes, clean = ngram_hashes(tokens, 3, EOS)
    assert len(hashes) == 4 and clean.tolist() == [False, False, False, True]


def test_unigram_loss_matches_the_add_one_formula():
    train = np.array([1, 1, 2, 3], dtype=np.int32)
    targets = np.array([1, 4], dtype=np.int32)
    vocab = 5
    total = len(train) + vocab
    expected = -(math.log(3 / total) + math.log(1 / total)) / 2
    assert unigram_loss(train, targets, vocab) == pytest.approx(expected)
