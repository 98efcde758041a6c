"""Checkpoint files: atomic, keep-last-K, weights_only-loadable, tied to one spec; RNG states round-trip."""

import random

import numpy as np
import pytest
import torch

from blueberry.train.checkpoint import Checkpointer, ResumeError, rng_state, set_rng_state, weights_digest


def test_save_keeps_the_last_k_and_loads_weights_only(tmp_path):
    saved = []
    ckpt = Checkpointer(tmp_path / "ck", "a" * 64, every=5, keep=2, on_save=lambda path, step: saved.append(step))
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "rng": rng_state(), "best_val": float("inf")}
    for step in (5, 10, 15):
        ckpt.save(state, step)
    assert [p.name for p in sorted((tmp_path / "ck").iterdir())] == ["step-000010.pt", "step-000015.pt"]
    assert saved == [5, 10, 15] and ckpt.due(10) and not ckpt.due(11)
    # weights_only=True: no pickled code runs on load (Checkpointer.load uses it; check it holds as well).
    loaded = torch.load(ckpt.latest(), weights_only=True)
    assert loaded["step"] == 15 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert ckpt.load(ckpt.latest())["best_val"] == float("inf")


def test_checkpoint_of_another_spec_is_refused(tmp_path):
    Checkpointer(tmp_path, "a" * 64, every=1, keep=1).save({"model": {}}, 1)
    other = Checkpointer(tmp_path, "b" * 64, every=1, keep=1)
    with pytest.raises(ResumeError, match="belongs to another spec"):
        other.load(other.latest())


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "step-000001.pt").write_bytes(b"not a checkpoint")
    ckpt = Checkpointer(tmp_path, "a" * 64, every=1, keep=1)
    with pytest.raises(ResumeError, match="cannot read checkpoint"):
        ckpt.load(ckpt.latest())


def test_a_killed_save_leaves_only_a_temp_file_that_is_cleaned(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", "a" * 64, every=1, keep=3)
    ckpt.save({"model": {}}, 1)
    (tmp_path / "ck" / ".step-000002.pt.x1y2.tmp").write_bytes(b"half")  # what SIGKILL mid-save leaves behind
    assert ckpt.latest().name == "step-000001.pt"
    ckpt.clean_partial()
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-000001.pt"]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    torch.rand(5), random.random(), np.random.rand(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand(), np.random.randn()) == expected[1:]


def test_weights_digest_sees_one_changed_bit():
    model = torch.nn.Linear(3, 2)
    before = weights_digest(model)
    assert weights_digest(model) == before
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(1.0))
    assert weights_digest(model) != before
