"""The check runner: each check in its box, failures and crashes contained, no start without time left."""

import time
from pathlib import Path

import torch

from blueberry.gpu_check.suite import Check, CheckFailed, CheckSkipped, Context, run_checks


def _context(seconds_left=100.0):
    return Context(torch.device("cpu"), Path("."), deadline=time.monotonic() + seconds_left, log=lambda m: None)


def test_outcomes_ok_failed_crashed_skipped_and_results_passed_on():
    seen = {}

    def found(context, box):
        failure = CheckFailed("too slow")
        failure.figures = {"rows": [("speed", "1 token/s")]}
        raise failure

    def later(context, box):
        seen.update(context.results)
        return {"rows": [("box", f"{box:g}")]}

    checks = [
        Check("ok", "", 10, lambda c, box: {"rows": [("a", "1")], "value": 1}),
        Check("found", "", 10, found),
        Check("crash", "", 10, lambda c, box: 1 / 0),
        Check("missing", "", 10, lambda c, box: (_ for _ in ()).throw(CheckSkipped("needs CUDA"))),
        Check("later", "", 7, later),
    ]
    outcomes = run_checks(checks, _context())
    assert [o.status for o in outcomes] == ["ok", "failed", "failed", "skipped", "ok"]
    assert outcomes[1].rows == [("speed", "1 token/s")] and outcomes[1].error == "too slow"
    assert outcomes[2].error == "ZeroDivisionError: division by zero"
    assert outcomes[3].error == "needs CUDA"
    assert seen["ok"]["value"] == 1 and outcomes[4].rows == [("box", "7")]  # its own box: less than time left


def test_no_check_starts_without_time_left_and_boxes_shrink_to_the_budget():
    ran = []
    checks = [
        Check("a", "", 60, lambda c, box: ran.append(box) or {}),
        Check("b", "", 60, lambda c, b: ran.append(b) or {}),
    ]
    outcomes = run_checks(checks, _context(seconds_left=20.0))
    assert 15 < ran[0] <= 20  # the overall budget caps the box
    outcomes = run_checks(checks, _context(seconds_left=2.0))
    assert [(o.status, o.error) for o in outcomes] == [("skipped", "no time left")] * 2 and len(ran) == 2


def test_a_check_boxed_at_a_few_seconds_runs_even_when_the_budget_is_spent():
    # The projection is arithmetic on earlier figures: the check before it may take all the time left.
    checks = [Check("slow", "", 60, lambda c, box: {}), Check("projection", "", 5, lambda c, box: {"rows": []})]
    outcomes = run_checks(checks, _context(seconds_left=2.0))
    assert [o.status for o in outcomes] == ["skipped", "ok"]
