"""The sweep state is one queue: atomic claims, stale claims recovered, malformed entries listed and skipped."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from blueberry.sweep.config import Sweep
from blueberry.sweep.controller import engine_runs, params_problem, propose
from blueberry.sweep.state import SweepState, SweepStateError, Trial, this_worker, worker_alive

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "blueberry-hypothesis")
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
GRID = Sweep(
    path=None,
    config={
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "command": ["x"],
        "parameters": {"train": {"parameters": {"lr": {"values": [0.01, 0.02, 0.03]}}}},
    },
    name="g",
    sweep_id="g-0",
)


def good_trial(i: int, **fields) -> dict:
    trial = Trial(run_id=f"g-0-t{i:03d}", params={"train": {"lr": [0.01, 0.02, 0.03][i]}}, state="finished")
    trial.summary, trial.history = {"val/loss": 4.0 + i}, [{"_step": 3, "val/loss": 4.0 + i}]
    return {**asdict(trial), **fields}


def dead_worker() -> str:
    """A controller that has exited: the pid of a finished child, with the start time it had."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    worker = f"{child.pid}:{open(f'/proc/{child.pid}/stat').read().rsplit(')', 1)[-1].split()[19]}"
    child.wait()
    return worker


def test_a_trial_of_a_live_controller_is_never_claimable_one_of_a_dead_one_is(tmp_path):
    path = tmp_path / "state.json"
    dead = dead_worker()
    entries = [
        good_trial(0, state="running", worker=this_worker()),
        good_trial(1, state="running", worker=dead),
        good_trial(2, state="pending", worker=f"{os.getpid()}:0"),  # our pid, another start time: pid reused
    ]
    path.write_text(json.dumps({"trials": entries}))
    state = SweepState(path, "g-0", "g")
    assert worker_alive(this_worker()) and not worker_alive(dead) and not worker_alive(None)
    assert [t.run_id for t in state.claimable()] == ["g-0-t001", "g-0-t002"]


def test_claims_under_the_lock_see_each_other(tmp_path):
    """Two controllers' views of one state: what one claims and saves, the other sees at its next lock."""
    path = tmp_path / "state.json"
    one, two = SweepState(path, "g-0", "g"), SweepState(path, "g-0", "g")
    with one.locked() as state:
        state.trials.append(Trial(run_id=state.next_run_id(), params={"train": {"lr": 0.01}}, worker=this_worker()))
        state.save()
    with two.locked() as state:
        assert [t.run_id for t in state.trials] == ["g-0-t000"] and state.next_run_id() == "g-0-t001"
        assert propose(GRID, state.trials) == {"train": {"lr": 0.02}}  # the engine skips the claimed point


@pytest.mark.parametrize(
    "entry, why",
    [
        ([1, 2], "trial 1: entry: Input should be"),
        ("text", "trial 1: entry: Input should be"),
        ({"run_id": 5, "params": {}}, "trial 1: run_id"),
        ({"run_id": "x"}, "trial 1: params: Field required"),
        ({**good_trial(1), "state": "exploded"}, "trial 1: state: 'exploded' is not one of"),
        ({**good_trial(1), "pid": "12ab"}, "trial 1: pid"),
        ({**good_trial(1), "history": "rows"}, "trial 1: history"),
    ],
)
def test_a_malformed_trial_is_listed_kept_and_the_rest_goes_on(tmp_path, entry, why):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"trials": [good_trial(0), entry]}))
    state = SweepState(path, "g-0", "g")
    assert [t.run_id for t in state.trials] == ["g-0-t000"]
    ((kept, reason),) = state.unreadable
    assert kept == entry and reason.startswith(why), reason
    state.save()
    assert json.loads(path.read_text())["trials"][1] == entry  # never dropped from the file
    assert state.next_run_id() == "g-0-t002"


@pytest.mark.parametrize("text", ["{", "[1]", '{"trials": 3}', "", '"x"'])
def test_a_wholly_unreadable_state_is_a_clear_error(tmp_path, text):
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(SweepStateError, match="sweep state .*state.json"):
        SweepState(tmp_path / "state.json", "g-0", "g")


@pytest.mark.parametrize("blocked", ["state.json", "sweep", "runs"])
def test_a_state_path_that_is_not_what_it_should_be_is_a_clear_error(tmp_path, blocked):
    """state.json a folder, the sweep's folder or the runs root's a file: named, no traceback from the OS."""
    path = tmp_path / "runs" / "sweep" / "state.json"
    blocker = {"sweep": path.parent, "runs": path.parent.parent}.get(blocked)
    if blocker is None:
        path.mkdir(parents=True)  # a folder where state.json goes
    else:
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("")  # a file where a folder goes
    with pytest.raises(SweepStateError, match="sweep state .*(is not a file|cannot be made)"):
        with SweepState(path, "g-0", "g").locked() as state:
            state.save()


HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_subnormal=False),  # subnormals: see tests/test_fuzz_spec.py (flush-denormal)
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
)
FIELDS = [*good_trial(0), "params.train", "params.train.lr", None]  # None: the whole entry


@FUZZ
@given(index=st.integers(0, 2), field=st.sampled_from(FIELDS), value=HOSTILE)
def test_fuzzed_state_entries_never_stop_the_sweep(index, field, value):
    entries = [good_trial(i) for i in range(3)]
    if field is None:
        entries[index] = value  # the whole entry replaced
    else:
        *parents, leaf = field.split(".")
        node = entries[index]
        for part in parents:
            node = node[part]
        node[leaf] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_text(json.dumps({"trials": entries}))
        state = SweepState(path, "g-0", "g", check=lambda t: params_problem(GRID, t))
        assert len(state.trials) + len(state.unreadable) == 3
        for trial in state.trials:  # what is read is usable: the engine takes it, the queue can claim it
            state.claimable()
            assert isinstance(trial.params, dict) and isinstance(trial.run_id, str)
        try:
            engine_runs(state.trials)
            propose(GRID, state.trials)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            pytest.fail(f"the engine refused a trial the state accepted: {type(exc).__name__}: {exc}")


def test_a_parameter_whose_values_are_dicts_is_one_parameter_and_the_grid_moves_on():
    # W&B allows dict values (`${args}` passes them as --model={...}); opening them as nested parameters made
    # every such trial unreadable, and the engine proposed the first grid point again and again.
    sweep = Sweep(
        path=None,
        config={
            "method": "grid",
            "metric": {"name": "val/loss", "goal": "minimize"},
            "command": ["x"],
            "parameters": {
                "model": {"values": [{"variant": "mlp"}, {"variant": "moe", "n_experts": 4}]},
                "train": {"parameters": {"lr": {"values": [0.01]}, "adam_betas": {"value": {"b1": 0.9}}}},
            },
        },
        name="d",
        sweep_id="d-0",
    )
    trials: list[Trial] = []
    while (params := propose(sweep, trials)) is not None:
        trial = Trial(run_id=f"d-0-t{len(trials):03d}", params=params, state="finished")
        assert params_problem(sweep, trial) is None, params
        trials.append(trial)
    assert [t.params["model"]["variant"] for t in trials] == ["mlp", "moe"]
    assert trials[0].params["train"] == {"lr": 0.01, "adam_betas": {"b1": 0.9}}
    other = Trial(run_id="d-0-t009", params={"model": {"variant": "mlp"}, "train": {"lr": 0.01}}, state="finished")
    assert "are not this sweep's" in params_problem(sweep, other)
