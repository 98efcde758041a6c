"""Checkpoint files: atomic, keep-last-K, weights_only-loadable, tied to one spec; RNG states round-trip."""

import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from blueberry.train.checkpoint import (
    Checkpointer,
    ResumeError,
    checkpoint_paths,
    read_checksums,
    rng_state,
    set_rng_state,
    weights_digest,
)


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


def test_a_checkpoint_from_a_node_of_8_gpus_resumes_on_one(monkeypatch):
    # rng_state saves one CUDA generator state per visible GPU; torch's set_rng_state_all indexes each device.
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    )
    state = rng_state()
    set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"][0])


def test_a_checkpoint_holding_an_older_hash_of_the_spec_is_accepted_when_named(tmp_path):
    Checkpointer(tmp_path, "old" * 16, every=1, keep=1).save({"x": torch.ones(1)}, step=1)
    (path,) = checkpoint_paths(tmp_path)
    assert Checkpointer(tmp_path, "new" * 16, every=1, keep=1, also_accept=("old" * 16,)).load(path)["step"] == 1
    with pytest.raises(ResumeError, match="belongs to another spec"):
        Checkpointer(tmp_path, "new" * 16, every=1, keep=1).load(path)


def test_weights_digest_sees_one_changed_bit():
    model = torch.nn.Linear(3, 2)
    before = weights_digest(model)
    assert weights_digest(model) == before
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(1.0))
    assert weights_digest(model) != before


# ---------------------------------------------------------------- corrupt checkpoints: skipped, kept aside

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "blueberry-hypothesis")


def three_checkpoints(directory) -> Checkpointer:
    ckpt = Checkpointer(directory / "checkpoints", "a" * 64, every=5, keep=3)
    for step in (5, 10, 15):
        ckpt.save({"model": {"w": torch.full((64,), float(step))}}, step)
    return ckpt


def corrupt(path, how: str, where: float = 0.5) -> bytes:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: int(len(data) * where)]
    elif how == "flip":  # same size: only the checksum can tell
        i = min(int(len(data) * where), len(data) - 1)
        data[i] ^= 0x01
    else:
        data = bytearray(b"\0" * len(data))
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("how", ["truncate", "flip", "zeros"])
def test_resume_takes_the_newest_checkpoint_that_verifies_and_keeps_the_bad_one(tmp_path, how):
    ckpt = three_checkpoints(tmp_path)
    bad = corrupt(ckpt.dir / "step-000015.pt", how)
    state, skipped = ckpt.load_newest()
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.full((64,), 10.0))
    ((aside, why),) = skipped
    assert aside.name == "step-000015.pt.corrupt" and aside.read_bytes() == bad  # kept as it was found
    assert ("sha256 differs" in why) if how == "flip" else ("sha256 differs" in why or "cannot read" in why)
    assert [p.name for p in sorted(ckpt.dir.iterdir())] == ["step-000005.pt", "step-000010.pt", aside.name]
    ckpt.save({"model": {"w": torch.zeros(64)}}, 15)  # training on writes step 15 afresh, the bad one stays aside
    assert ckpt.load_newest()[0]["step"] == 15 and aside.exists()


def test_checksums_are_a_sha256sum_file_and_follow_keep_last_k(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    ckpt.save({"model": {}}, 20)
    sums = read_checksums(ckpt.manifest)
    assert ckpt.manifest == tmp_path / "checkpoints.sha256" and sorted(sums) == [
        "step-000010.pt",
        "step-000015.pt",
        "step-000020.pt",
    ]
    done = subprocess.run(["sha256sum", "-c", str(ckpt.manifest)], cwd=ckpt.dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_good_checkpoint_means_none_and_another_spec_is_still_refused(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    for path in checkpoint_paths(ckpt.dir):
        corrupt(path, "truncate", 0.3)
    state, skipped = ckpt.load_newest()
    assert state is None and [p.name for p, _ in skipped] == [f"step-0000{s}.pt.corrupt" for s in ("15", "10", "05")]
    other = three_checkpoints(tmp_path / "other")
    other.spec_hash = "b" * 64
    with pytest.raises(ResumeError, match="another spec"):
        other.load_newest()
    assert len(checkpoint_paths(other.dir)) == 3  # not corrupt: nothing moved


def test_checkpoints_without_checksums_still_load(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    ckpt.manifest.unlink()  # as written before checksums existed
    assert ckpt.load_newest()[0]["step"] == 15
    ckpt.manifest.write_bytes(b"\xff\xfe garbage")  # an unreadable manifest: torch.load alone judges
    assert ckpt.load_newest()[0]["step"] == 15


def test_without_a_recorded_checksum_flipped_tensor_bytes_are_still_caught(tmp_path):
    """torch.load does not check the zip's CRCs: with the checksum list lost (emptied by a host crash, or a
    checkpoint from before it), a flipped byte in a tensor loaded without a word."""
    import zipfile

    ckpt = three_checkpoints(tmp_path)
    ckpt.manifest.write_text("")
    path = ckpt.dir / "step-000015.pt"
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(data[entry.header_offset + 26 : entry.header_offset + 28], "little")
    name_and_extra += int.from_bytes(data[entry.header_offset + 28 : entry.header_offset + 30], "little")
    data[entry.header_offset + 30 + name_and_extra] ^= 0x01  # the tensor's first byte
    path.write_bytes(bytes(data))
    state, ((aside, why),) = ckpt.load_newest()
    assert state["step"] == 10 and "fails its CRC check" in why and aside.name == "step-000015.pt.corrupt"


def test_a_checkpoint_this_process_cannot_read_is_a_resume_error_and_left_in_place(tmp_path):
    """Not damaged (someone else's 0600 file, a disk error): setting it aside would restart the run silently."""
    ckpt = three_checkpoints(tmp_path)
    (ckpt.dir / "step-000015.pt").unlink()
    (ckpt.dir / "step-000015.pt").mkdir()  # reading it fails with an OSError, as EACCES or EIO would
    with pytest.raises(ResumeError, match=r"cannot read checkpoint .*step-000015\.pt \(Is a directory\): fix that"):
        ckpt.load_newest()
    assert (ckpt.dir / "step-000015.pt").is_dir()


def test_an_earlier_damaged_copy_of_a_step_is_kept_beside_a_new_one(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    (ckpt.dir / "step-000015.pt.corrupt").write_bytes(b"an earlier attempt's damaged step 15")
    corrupt(ckpt.dir / "step-000015.pt", "truncate")
    state, ((aside, _),) = ckpt.load_newest()
    assert state["step"] == 10 and aside.name == "step-000015.pt.corrupt.2"
    assert (ckpt.dir / "step-000015.pt.corrupt").read_bytes() == b"an earlier attempt's damaged step 15"


@pytest.mark.parametrize("cut", [100, 30_000, 60_000])
def test_a_truncated_checkpoint_without_a_checksum_is_skipped_not_a_read_error(tmp_path, cut):
    """Cut short, torch's zip reader raises OSError(EINVAL) at some lengths: damage, not a file it cannot read."""
    ckpt = Checkpointer(tmp_path / "checkpoints", "a" * 64, every=5, keep=3)
    for step in (5, 10, 15):
        ckpt.save({"model": {"w": torch.full((16_384,), float(step))}}, step)  # 64 KiB of tensor each
    ckpt.manifest.unlink()
    path = ckpt.dir / "step-000015.pt"
    path.write_bytes(path.read_bytes()[:cut])
    state, ((aside, _),) = ckpt.load_newest()
    assert state["step"] == 10 and aside.name == "step-000015.pt.corrupt"


def test_a_legacy_non_zip_checkpoint_without_a_checksum_still_loads(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    ckpt.manifest.unlink()
    state = {"model": {"w": torch.zeros(3)}, "step": 20, "spec_hash": "a" * 64}
    torch.save(state, ckpt.dir / "step-000020.pt", _use_new_zipfile_serialization=False)
    assert ckpt.load_newest()[0]["step"] == 20


def test_a_save_killed_while_writing_the_checksum_list_leaves_nothing_after_cleaning(tmp_path):
    ckpt = three_checkpoints(tmp_path)
    (tmp_path / ".checkpoints.sha256.x1y2.tmp").write_text("half a list")
    ckpt.clean_partial()
    assert not list(tmp_path.glob(".*.tmp")) and ckpt.load_newest()[0]["step"] == 15


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    damage=st.dictionaries(
        st.sampled_from([5, 10, 15]),
        st.tuples(st.sampled_from(["truncate", "flip", "zeros"]), st.floats(0, 0.999, allow_subnormal=False)),
        max_size=3,
    )
)
def test_fuzzed_damage_resumes_from_the_newest_intact_checkpoint(damage):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = three_checkpoints(Path(tmp))
        for step, (how, where) in damage.items():
            corrupt(ckpt.dir / f"step-{step:06d}.pt", how, where)
        state, skipped = ckpt.load_newest()
        intact = [s for s in (5, 10, 15) if s not in damage]
        assert (state["step"] if state else None) == (intact[-1] if intact else None)
        newer = sorted((s for s in damage if not intact or s > intact[-1]), reverse=True)
        assert [p.name for p, _ in skipped] == [f"step-{s:06d}.pt.corrupt" for s in newer]
        assert all(p.exists() for p, _ in skipped)
