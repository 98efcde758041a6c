"""Our `.wandb` decoder: against W&B's own reader, `wandb leet inspect --json` (wandb 0.31), and on damaged logs
(hypothesis): it decodes or raises WandbLogError, never anything else."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from offline_tracker import fresh_run_dir, offline_tracker

from blueberry.tracking import RunRecord, Trackers
from blueberry.tracking.wandb_log import WandbLogError, held_rows, read_wandb_log


def wandb_cli() -> str:
    beside = Path(sys.executable).parent / "wandb"  # the pinned wandb of this interpreter
    found = str(beside) if beside.exists() else shutil.which("wandb")
    if found is None:
        pytest.fail("the wandb CLI is not installed beside this Python")
    return found


def leet_inspect(path: Path) -> dict:
    """W&B's reading of a run: the run record, config, history rows, summary and exit code, folded in order."""
    out = subprocess.run(
        [wandb_cli(), "leet", "inspect", "--json", str(path)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    config = dict(run.get("config", {}).get("update", {}))
    summary: dict = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"].get("update", {}))
        elif record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    config.pop("_wandb", None)
    return {
        "run": run,
        "config": config,
        "history": [r["history"]["item"] for r in records if r["type"] == "history"],
        "summary": summary,
        "exit_code": next((r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"), None),
    }


def test_decoder_reads_what_wandb_leet_reads(tmp_path):
    run_dir = fresh_run_dir(tmp_path, "exp", "r1")
    tracker = offline_tracker(
        run_dir,
        project="blueberry-test",
        run_id="r1-abc12345",
        tags=["moe", "t"],
        notes="a note",
        config={"model": {"n_experts": 4, "variant": "moe"}, "seed": 1, "train": {"lr": 0.003}},
        system_metrics=False,
    )
    trackers = Trackers(RunRecord(run_dir, {}), tracker)
    # Enough rows, with long keys, to span several 32 KiB blocks (chunks split as FIRST/MIDDLE/LAST).
    for step in range(1, 401):
        trackers.log({"train/loss": 5.0 / step, "trainer/tokens": 128 * step, f"train/expert_{step % 7}": 0.25}, step)
        if step % 100 == 0:
            trackers.log({"val/loss": 4.0 / step, "val/accuracy": step / 1000}, step)
    trackers.summary({"final/val_loss": 0.01, "params/total": 12345})
    trackers.finish("finished")

    (segment,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert segment.stat().st_size > 3 * 32768
    ours, theirs = read_wandb_log(segment), leet_inspect(segment)

    run = theirs["run"]
    assert (ours.run_id, ours.project, ours.group, ours.job_type) == (
        run["run_id"],
        run["project"],
        run["run_group"],
        run["job_type"],
    )
    assert (ours.name, ours.notes, ours.tags) == (run.get("display_name", ""), run.get("notes", ""), run["tags"])
    assert ours.config == theirs["config"]
    assert len(ours.history) == len(theirs["history"]) == 404
    assert ours.history == theirs["history"]
    assert ours.summary == theirs["summary"]
    assert ours.summary["val/loss"] == {"min": 0.01, "last": 0.01}
    assert ours.exit_code == theirs["exit_code"] == 0


set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "blueberry-hypothesis")


@pytest.fixture
def segment_bytes(tmp_path) -> bytes:
    """A real offline W&B log (made inside the hermetic environment: a function-scoped fixture)."""
    run_dir = fresh_run_dir(tmp_path / "made", "exp", "r1")
    tracker = offline_tracker(run_dir, name="r1", run_id="r1", tags=[])
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
