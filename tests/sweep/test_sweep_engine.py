"""Proposals come from W&B's engine and learn from the results we feed back."""

import dataclasses

import numpy as np

from blueberry.sweep.config import Sweep
from blueberry.sweep.controller import engine_runs, propose, trial_budget
from blueberry.sweep.state import Trial


def make_sweep(method, parameters, **extra):
    config = {
        "method": method,
        "metric": {"name": "val/loss", "goal": "minimize"},
        "command": ["x"],
        "parameters": parameters,
        **extra,
    }
    return Sweep(path=None, config=config, name="t", sweep_id="t-0")


def test_bayes_proposes_plain_values_from_finished_results():
    sweep = make_sweep(
        "bayes", {"train": {"parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}}}}
    )
    trials = []
    for i, lr in enumerate([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]):  # below 6 results the engine draws at random
        trials.append(
            Trial(
                run_id=f"t{i}",
                params={"train": {"lr": lr}},
                state="finished",
                summary={"val/loss": abs(lr - 3e-3) * 100 + 4.0},
            )
        )
    params = propose(sweep, trials)
    assert type(params["train"]["lr"]) is float and 1e-4 <= params["train"]["lr"] <= 1e-1  # numpy scalars made plain
    # The engine gets each trial's metric and learns from it: under seeded draws its proposals sit near the
    # best LR seen (3e-3), where the same trials without their results give others.
    assert [r.summary_metrics["val/loss"] for r in engine_runs(trials)] == [t.summary["val/loss"] for t in trials]
    blind = [dataclasses.replace(t, summary={}) for t in trials]
    for seed in range(3):
        np.random.seed(seed)
        informed = propose(sweep, trials)["train"]["lr"]
        np.random.seed(seed)
        assert 1e-3 < informed < 1e-2 and propose(sweep, blind)["train"]["lr"] != informed


def test_random_respects_run_cap_and_count():
    sweep = make_sweep("random", {"seed": {"values": [1, 2, 3]}}, run_cap=5)
    assert trial_budget(sweep, None) == 5 and trial_budget(sweep, 2) == 2


def test_running_and_failed_trials_are_passed_back_so_a_grid_never_repeats():
    sweep = make_sweep("grid", {"seed": {"values": [1, 2, 3]}})
    trials = [
        Trial(run_id="a", params={"seed": 1}, state="running"),
        Trial(run_id="b", params={"seed": 2}, state="failed"),
    ]
    assert propose(sweep, trials) == {"seed": 3}
    trials.append(Trial(run_id="c", params={"seed": 3}, state="pending"))
    assert propose(sweep, trials) is None
    assert [str(getattr(r.state, "value", r.state)) for r in engine_runs(trials)] == ["running", "failed", "running"]
