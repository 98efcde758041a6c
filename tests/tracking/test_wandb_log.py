"""The W&B log decoder on damaged logs (hypothesis): it decodes or raises WandbLogError, never anything else."""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from blueberry.tracking import RunRecord, Trackers, WandbTracker, allocate_run_dir
from blueberry.tracking.wandb_log import WandbLogError, held_rows, read_wandb_log

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "blueberry-hypothesis")


@pytest.fixture
def segment_bytes(tmp_path) -> bytes:
    """A real offline W&B log (made inside the hermetic environment: a function-scoped fixture)."""
    run_dir = allocate_run_dir(tmp_path / "made", "exp", "r1")
    tracker = WandbTracker(
        run_dir,
        mode="offline",
        project="blueberry",
        entity=None,
        group="exp",
        job_type="train",
        name="r1",
        run_id="r1",
        tags=[],
        notes=None,
        config={"seed": 1},
    )
    trackers = Trackers(RunRecord(run_dir, {}), tracker)
    for step in range(1, 40):
        trackers.log({"train/loss": 5.0 - step / 10, "note": "x" * 50}, step)
    trackers.finish("finished")
    (segment,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return segment.read_bytes()


DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, allow_subnormal=False), st.binary(max_size=0)),
    st.tuples(st.just("flip"), st.floats(0, 0.999, allow_subnormal=False), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("insert"), st.floats(0, 1, allow_subnormal=False), st.binary(min_size=1, max_size=64)),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(damage=st.lists(DAMAGE, min_size=1, max_size=3))
def test_a_damaged_log_decodes_or_is_a_wandb_log_error(segment_bytes, damage):
    data = bytearray(segment_bytes)
    for how, where, payload in damage:
        i = int(len(data) * where)
        if how == "truncate":
            data = data[:i]
        elif how == "flip" and data:
            data[min(i, len(data) - 1)] ^= payload[0] or 1
        elif how == "insert":
            data[i:i] = payload
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run-r1.wandb"
        path.write_bytes(bytes(data))
        try:
            log = read_wandb_log(path)
            assert all(isinstance(row, dict) for row in log.history)
        except WandbLogError as exc:
            assert str(path) in str(exc)
        held, problems = held_rows([path, Path(tmp) / "missing.wandb"])
        assert any("missing.wandb" in p for p in problems)


def test_the_undamaged_log_is_read_whole(segment_bytes, tmp_path):
    (tmp_path / "run-r1.wandb").write_bytes(segment_bytes)
    held, problems = held_rows([tmp_path / "run-r1.wandb"])
    assert held == {(step, False) for step in range(1, 40)} and problems == []
