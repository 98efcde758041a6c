"""`blueberry bench --against REV`: the interleaving, the summary, the worktree's life, bad input, and one real
measurement of a tree's own code. No timing is asserted."""

import contextlib
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from blueberry.bench import compare as cmp
from blueberry.bench.suite import TINY
from blueberry.cli import main

REPO = Path(cmp.__file__).resolve().parents[2]
IS_CHECKOUT = bool(shutil.which("git")) and (
    subprocess.run(["git", "-C", str(REPO), "rev-parse", "--git-dir"], capture_output=True).returncode == 0
)
needs_git = pytest.mark.skipif(not IS_CHECKOUT, reason="needs a git checkout of Blueberry")


def _worktrees() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "worktree", "list", "--porcelain"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.startswith("worktree ")]


def test_versions_alternate_which_goes_first():
    assert cmp.interleaved_order(3) == [
        (0, "base"),
        (0, "current"),
        (1, "current"),
        (1, "base"),
        (2, "base"),
        (2, "current"),
    ]


def test_speedup_is_taken_within_each_round():
    rows = [
        {"round": 0, "version": "base", "step_s": 2.0},
        {"round": 0, "version": "current", "step_s": 1.0},
        {"round": 1, "version": "current", "step_s": 3.0},
        {"round": 1, "version": "base", "step_s": 4.5},  # a slower moment for both: the ratio is still 1.5
        {"round": 2, "version": "base", "step_s": 2.0},
        {"round": 2, "version": "current", "error": "boom"},
    ]
    s = cmp.summarise(rows)
    assert s["speedup"] == pytest.approx(1.75) and s["speedup_range"] == pytest.approx([1.5, 2.0])
    assert s["rounds"] == 2 and s["failed"] == ["boom"]
    assert s["base_step_s"] == 2.0 and s["current_step_s"] == 2.0
    assert "1.75×" in cmp.format_comparison(
        {
            "against": {"revision": "x", "commit": "0" * 40},
            "precision": "bf16",
            "threads": 2,
            "warmup": 3,
            "repeats": 3,
            "load_average": [0.1, 0.2],
            "summary": {"a.json": s, "b.json": cmp.summarise([rows[-1]])},
        }
    )


@needs_git
def test_compare_checks_out_the_revision_measures_interleaved_and_cleans_up(tmp_path):
    before = _worktrees()
    calls = []

    def fake_measure(tree, spec, overrides, threads, warmup, repeats):
        calls.append((tree, spec))
        assert (tree / spec).is_file() and (tree / "blueberry" / "bench" / "measure.py").is_file()
        assert overrides[0].startswith("--train.precision=") and threads >= 1
        return {"step_s": 2.0 if tree != REPO else 1.0}

    outcome = cmp.compare(
        "HEAD", ("experiments/quickstart.json",), rounds=2, tree=REPO, measure=fake_measure, log=lambda m: None
    )
    base_tree = calls[0][0]
    assert [tree == REPO for tree, _ in calls] == [False, True, True, False]
    assert base_tree != REPO and not base_tree.exists() and _worktrees() == before  # the worktree is gone
    summary = outcome["summary"]["experiments/quickstart.json"]
    assert summary["speedup"] == 2.0 and summary["rounds"] == 2
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert outcome["against"]["commit"] == head.stdout.strip()
    saved = cmp.save_comparison(outcome, tmp_path)
    assert saved.is_file() and saved.with_suffix(".md").read_text().startswith("`HEAD`")


@needs_git
def test_bad_revision_or_spec_is_a_clear_error():
    result = CliRunner().invoke(main, ["bench", "--against", "no-such-revision"])
    assert result.exit_code == 2 and "no such revision" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["bench", "--against", "HEAD", "--spec", "experiments/nope.json"])
    assert result.exit_code == 2 and "no spec file experiments/nope.json" in result.output
    before = _worktrees()  # a file that is no run spec: refused before the base is checked out, not per round
    result = CliRunner().invoke(main, ["bench", "--against", "HEAD", "--spec", "sweeps/cpu/ablation.yaml"])
    assert result.exit_code == 2 and "ablation.yaml: not valid JSON" in result.output, result.output
    assert _worktrees() == before and "round" not in result.output


def test_options_that_do_not_go_together_are_refused():
    result = CliRunner().invoke(main, ["bench", "--against", "HEAD", "--quick"])
    assert result.exit_code == 2 and "does not combine with --ceiling or --quick" in result.output
    result = CliRunner().invoke(main, ["bench", "--rounds", "5"])
    assert result.exit_code == 2 and "give --against REV" in result.output


@needs_git
def test_not_a_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(cmp.CompareError, match="needs a git checkout"):
        cmp.resolve_revision(tmp_path, "HEAD")


def test_a_measurement_runs_the_trees_own_code(tmp_path):
    result = cmp.measure_in(REPO, "experiments/quickstart.json", TINY, threads=1, warmup=1, repeats=1)
    assert result["step_s"] > 0 and result["tokens_per_s"] > 0 and result["precision"] == "fp32"
    # A tree without Blueberry in it cannot be measured, and says so instead of measuring the installed package.
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "quickstart.json").write_text((REPO / "experiments" / "quickstart.json").read_text())
    result = cmp.measure_in(tmp_path, "experiments/quickstart.json", TINY, threads=1, warmup=1, repeats=1)
    assert "error" in result


def test_a_result_line_that_is_not_a_measurement_is_a_failed_row(tmp_path):
    for line in ["[]", "{}", '{"package": 1, "step_s": 1.0}', f'{{"package": "{tmp_path}/b.py", "step_s": "x"}}']:
        assert "not a step time" in cmp.read_result(line, tmp_path)["error"]
    assert cmp.read_result("", tmp_path) == {"error": "the measurement printed no result"}
    good = f'{{"package": "{tmp_path}/blueberry/__init__.py", "step_s": 1.5, "tokens_per_s": 10, "precision": "fp32"}}'
    assert cmp.read_result(good, tmp_path) == {"step_s": 1.5, "tokens_per_s": 10, "precision": "fp32"}
    assert "outside" in cmp.read_result(good, tmp_path / "other")["error"]


def _no_full_bench(monkeypatch):
    """The full bench takes an hour: a test that would start it fails at once instead."""
    import blueberry.bench

    def started(**kwargs):
        raise AssertionError("the full bench started")

    monkeypatch.setattr(blueberry.bench, "run_bench", started)


def test_an_empty_against_is_refused_not_read_as_no_comparison(monkeypatch):
    _no_full_bench(monkeypatch)
    for empty in ("", " "):
        result = CliRunner().invoke(main, ["bench", "--against", empty])
        assert result.exit_code == 2, result.output
        assert result.output == "error: --against needs a git revision (a branch, tag or commit), not an empty one\n"


def test_a_bad_price_variable_is_refused_before_anything_is_measured(monkeypatch, tmp_path):
    """Every case's plan prices its device: a bad value failed them all, then the bench with a traceback."""
    _no_full_bench(monkeypatch)
    monkeypatch.setattr(cmp, "compare", lambda *args, **kwargs: pytest.fail("the comparison started"))
    monkeypatch.setenv("BLUEBERRY_PRICE_PER_HOUR", "abc")
    for args in (["bench", "--quick"], ["bench", "--against", "HEAD"]):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.output.startswith("error: BLUEBERRY_PRICE_PER_HOUR='abc' is not a number")
        assert len(result.output.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_kill_stops_the_full_bench_as_ctrl_c_does(monkeypatch, tmp_path):
    """SIGTERM's default ends the process at once: the contention measurement's busy processes spun on."""
    import blueberry.bench
    from blueberry import terminal

    def run_bench(**kwargs):
        assert signal.getsignal(signal.SIGTERM) is terminal._raise_stop
        raise terminal.StopSignal(signal.SIGTERM)  # what the handler raises on `kill`

    monkeypatch.setattr(blueberry.bench, "run_bench", run_bench)
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path / "out")])
    assert result.exit_code == 143 and result.output == "error: bench interrupted\n", result.output


def _spec_tree(root: Path, *files: str) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text((REPO / name).read_text())
    return root


def test_a_base_without_what_the_comparison_runs_is_refused(tmp_path):
    """A revision from before the bench (or without a spec): every base measurement failed, each round."""
    spec = "experiments/quickstart.json"
    with pytest.raises(cmp.CompareError) as refused:
        cmp.check_base(_spec_tree(tmp_path / "old", spec), "old", (spec,))
    assert str(refused.value) == (
        "--against 'old' cannot be measured: it has no measure_throughput in blueberry/bench/measure.py, "
        "load_spec in blueberry/overrides.py"
    )
    base = _spec_tree(tmp_path / "base", "blueberry/bench/measure.py", "blueberry/overrides.py")
    with pytest.raises(cmp.CompareError, match=f"it has no {spec}$"):
        cmp.check_base(base, "base", (spec,))
    cmp.check_base(_spec_tree(base, spec), "base", (spec,))


@needs_git
def test_compare_refuses_a_base_it_cannot_measure_before_measuring(monkeypatch, tmp_path):
    @contextlib.contextmanager
    def checked_out(tree, commit):
        yield tmp_path  # a checkout with no Blueberry in it

    monkeypatch.setattr(cmp, "checked_out", checked_out)
    measured = []
    with pytest.raises(cmp.CompareError, match="cannot be measured"):
        cmp.compare("HEAD", ("experiments/quickstart.json",), measure=lambda *a: measured.append(a), log=print)
    assert measured == []


def test_a_spec_with_no_measured_pair_is_a_failed_comparison(monkeypatch, tmp_path):
    """The table and the file say which measurements failed; the exit code says the comparison did not happen."""
    rows = [{"spec": "a.json", "round": 0, "version": "base", "error": "boom"}]
    outcome = {
        "against": {"revision": "x", "commit": "0" * 40},
        **{"precision": "fp32", "threads": 1, "warmup": 1, "repeats": 1, "load_average": [0.0, 0.0]},
        "summary": {"a.json": cmp.summarise(rows)},
    }
    monkeypatch.setattr(cmp, "compare", lambda *args, **kwargs: outcome)
    result = CliRunner().invoke(main, ["bench", "--against", "x", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "| a.json | — | — | — | failed: boom | 0 |" in result.output, result.output
    assert result.output.endswith("error: no round measured both versions of a.json\n")
    assert len(list(tmp_path.glob("compare-*.json"))) == 1
