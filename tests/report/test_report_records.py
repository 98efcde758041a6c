"""Loaders: local run records (every state, torn lines, the cache) and the W&B API (mocked: no network)."""

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from wandb.apis.public.summary import HTTPSummary

from blueberry.report.cache import RunCache
from blueberry.report.records import (
    History,
    ReportError,
    load_local,
    load_wandb,
    read_local_run,
    run_from_wandb,
    select,
    wandb_filters,
)
from blueberry.report.synthetic import write_run


def test_local_run_is_normalised(tmp_path):
    run_dir = write_run(
        tmp_path, "exp1-ablation-cpu", variant="moe", seed=3, lr=0.003, sweep={"id": "s1", "name": "exp1"}, tags=("x",)
    )
    run = read_local_run(run_dir)
    assert (run.experiment, run.variant, run.lr, run.seed, run.state) == (
        "exp1-ablation-cpu",
        "moe",
        0.003,
        3,
        "finished",
    )
    assert run.sweep == {"id": "s1", "name": "exp1"} and run.tags == ["moe", "x"]
    assert run.metric("val/loss") == 4.0 and run.param_count("active") == 1_500_000
    steps, losses = run.history.series("val/loss")
    assert steps.tolist() == [25, 50, 75, 100] and losses[-1] == pytest.approx(4.0)
    assert "moe/layer0/load_e0" not in run.history.columns and "moe/layer0/load_max" in run.history.columns


def test_torn_last_line_and_broken_files_are_never_fatal(tmp_path, alive):
    torn = alive(write_run(tmp_path, "e", seed=1, state="running"))
    with open(torn / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 51, "train/lo')  # killed mid-write
    no_status = write_run(tmp_path, "e", seed=2)
    (no_status / "status.json").unlink()
    bad_spec = write_run(tmp_path, "e", seed=3)
    (bad_spec / "spec.json").write_text("{not json")
    no_summary = write_run(tmp_path, "e", seed=4)
    (no_summary / "summary.json").unlink()
    runs = {r.source: r for r in load_local(tmp_path)}
    assert runs[str(torn)].state == "running" and runs[str(torn)].history.last_step == 50
    assert runs[str(no_status)].state == "unreadable" and "status.json missing" in runs[str(no_status)].reason
    assert runs[str(bad_spec)].state == "unreadable" and "spec.json unreadable" in runs[str(bad_spec)].reason
    assert runs[str(bad_spec)].experiment == "e"  # from the directory when the header is unreadable
    assert runs[str(no_summary)].state == "unreadable" and "summary.json missing" in runs[str(no_summary)].reason


def test_a_running_record_whose_process_died_is_crashed_even_from_the_cache(tmp_path, alive):
    """W&B's "crashed": the record says running, but no live process holds its lock (SIGKILL, the OOM killer)."""
    alive(write_run(tmp_path / "runs", "e", seed=1, state="running"))
    cache = RunCache(tmp_path / "cache")
    (live,) = load_local(tmp_path / "runs", cache)
    assert live.state == "running" and live.reason is None
    alive.release_all()  # the process dies: not a file of its record changes, but its lock goes
    (dead,) = load_local(tmp_path / "runs", cache)
    assert cache.hits == 1 and dead.state == "crashed" and "its process on this host died" in dead.reason
    assert "resumes it" in dead.reason and dead.history.last_step == live.history.last_step


def test_a_run_that_ends_while_the_report_reads_is_not_called_crashed(tmp_path, monkeypatch):
    """Read as running; before its lock is looked at, the run writes its end and lets go of the lock (as every
    run ends): the report reads it again and finds it finished, not dead."""
    import blueberry.report.records as records

    run_dir = write_run(tmp_path, "e", seed=1)
    ended = (run_dir / "status.json").read_text()
    (run_dir / "status.json").write_text(json.dumps({**json.loads(ended), "state": "running"}))

    def ends_meanwhile(path):
        (path / "status.json").write_text(ended)
        return False  # its lock is free now

    monkeypatch.setattr(records, "run_is_live", ends_meanwhile)
    (run,) = load_local(tmp_path)
    assert run.state == "finished" and run.reason is None


def test_a_running_record_copied_from_another_host_stays_running(tmp_path):
    """rsync of a cluster's runs/ while a run goes on there: no lock here says nothing about it."""
    run_dir = write_run(tmp_path, "e", seed=1, state="running")
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "host": "gpu-node-17"}))
    (run,) = load_local(tmp_path)
    assert run.state == "running" and run.reason is None


def test_missing_runs_root_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_local(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ReportError, match="is a file, not a directory"):
        load_local(tmp_path / "file")


def test_select_filters_like_the_wandb_query(tmp_path):
    write_run(tmp_path, "a", seed=1, sweep={"id": "abc123", "name": "lr-grid"}, tags=("exp2",))
    write_run(tmp_path, "a", seed=2)
    write_run(tmp_path, "b", seed=1, tags=("exp2",))
    runs = load_local(tmp_path)
    assert len(select(runs, group="a")) == 2
    assert [r.seed for r in select(runs, sweep="lr-grid")] == [1] == [r.seed for r in select(runs, sweep="abc123")]
    assert sorted(r.experiment for r in select(runs, tags=("exp2",))) == ["a", "b"]
    sweep = {"$or": [{"sweep": "abc123"}, {"tags": {"$in": ["sweep:abc123"]}}]}
    assert wandb_filters("a", "abc123", ("exp2",)) == {"$and": [{"group": "a"}, sweep, {"tags": {"$in": ["exp2"]}}]}
    long = "n" * 70  # the runner's sweep tag is cut to W&B's 64 characters: the filter looks for the same
    assert wandb_filters(sweep=long)["$and"][0]["$or"][1] == {"tags": {"$in": [f"sweep:{long}"[:64]]}}


def test_cache_reuses_unchanged_runs_and_rereads_changed_ones(tmp_path):
    root = tmp_path / "runs"
    first = write_run(root, "e", seed=1)
    write_run(root, "e", seed=2)
    cache = RunCache(tmp_path / "cache")
    fresh = load_local(root, cache)
    assert (cache.hits, cache.misses) == (0, 2)
    cached = load_local(root, cache)
    assert (cache.hits, cache.misses) == (2, 2)
    for a, b in zip(fresh, cached):
        assert a.to_meta() == b.to_meta()
        np.testing.assert_array_equal(a.history.values, b.history.values)
    # A run that changes (here: its status) is parsed again, not served stale.
    status = json.loads((first / "status.json").read_text())
    (first / "status.json").write_text(json.dumps({**status, "state": "failed", "reason": "late"}))
    os.utime(first / "status.json", ns=(1, 1))
    again = {r.source: r for r in load_local(root, cache)}
    assert again[str(first)].state == "failed" and cache.hits == 3
    # A corrupt cache file is ignored.
    for path in (tmp_path / "cache").iterdir():
        path.write_bytes(b"garbage")
    assert len(load_local(root, cache)) == 2


def test_the_parsers_version_skips_an_editors_lock_file_beside_a_module(tmp_path, monkeypatch):
    import blueberry
    from blueberry.report import cache as cache_module

    package = tmp_path / "blueberry"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "records.py").write_text("x = 1\n")
    monkeypatch.setattr(blueberry, "__file__", str(package / "__init__.py"))
    cache_module.parser_version.cache_clear()
    before = cache_module.parser_version()
    (package / ".#records.py").symlink_to("me@host.123:1700000000")  # Emacs's lock: a link to nowhere
    cache_module.parser_version.cache_clear()
    assert cache_module.parser_version() == before
    (package / "records.py").write_text("x = 2\n")
    cache_module.parser_version.cache_clear()
    assert cache_module.parser_version() != before
    monkeypatch.undo()
    cache_module.parser_version.cache_clear()


def test_a_snapshot_parsed_by_other_code_is_parsed_again(tmp_path, monkeypatch):
    # An upgrade (or a fix of the parser) must not keep publishing what the old code read from the same files.
    root = tmp_path / "runs"
    write_run(root, "e", seed=1)
    cache = RunCache(tmp_path / "cache")
    monkeypatch.setattr("blueberry.report.cache.parser_version", lambda: "older code")
    load_local(root, cache)
    monkeypatch.undo()
    load_local(root, cache)
    assert (cache.hits, cache.misses) == (0, 2)
    load_local(root, cache)
    assert cache.hits == 1


def fake_api_run(run_id="r1", state="finished"):
    summary = {"val/loss": {"min": 3.9, "last": 4.0}, "val/accuracy": {"max": 0.3, "last": 0.29}, "_step": 20}
    return SimpleNamespace(
        id=run_id,
        name=f"exp2-{run_id}",
        group="exp2-lr-attention-mlp",
        state=state,
        tags=["attention_mlp", "exp2"],
        path=["me", "blueberry", run_id],
        created_at="2025-10-01T10:00:00",
        heartbeat_at="2025-10-01T10:05:00",
        lastHistoryStep=20,
        sweep=SimpleNamespace(id="sw1", name="lr grid"),
        config={
            "_wandb": {},
            "experiment": "exp2-lr-attention-mlp",
            "seed": 1,
            "model": {"variant": "attention_mlp"},
            "train": {"lr": 0.003},
            "variant": "attention_mlp",
            "params_total": 100,
            "params_active": 80,
        },
        summary_metrics=summary,
        # As wandb.apis.public.Run has it: nested values wrapped in SummarySubDict, not dicts.
        summary=HTTPSummary(SimpleNamespace(dir=""), None, summary=summary),
        scan_history=mock.Mock(
            return_value=iter(
                [
                    {"trainer/step": 10, "_runtime": 5.0, "train/loss": 5.0, "_step": 0},
                    {"trainer/step": 20, "_runtime": 9.0, "val/loss": 4.0, "_step": 1},
                ]
            )
        ),
    )


def test_a_sweep_that_nulls_the_variant_still_names_the_preset_its_pair_makes():
    # sweeps/factorial.yaml sets model.variant null (the pair decides); W&B keeps the sweep's null in the config
    # and the runner's derived top-level `variant` names the preset, as the local record's spec does.
    api_run = fake_api_run()
    api_run.config["model"] = {"variant": None, "attention": "mla", "ffn": "deepseek_moe"}
    api_run.config["variant"] = "deepseek_v3"
    assert run_from_wandb(api_run, []).variant == "deepseek_v3"
    api_run.config["model"], api_run.config["variant"] = {"variant": None, "attention": "mla", "ffn": "mlp"}, "x-y"
    assert run_from_wandb(api_run, []).variant is None  # not a preset: nothing to name
    api_run.config["variant"] = ["deepseek_v3"]  # valid JSON, not what the runner writes
    assert run_from_wandb(api_run, []).variant is None


def test_a_blueberry_sweep_trial_synced_to_wandb_keeps_its_sweep(tmp_path):
    api_run = fake_api_run()
    api_run.sweep = None  # no W&B sweep: `blueberry sweep` ran it offline, `wandb sync` uploaded it
    assert run_from_wandb(api_run, []).sweep is None
    api_run.config.update(sweep_id="lr-grid-1a2b3c4d", sweep_name="lr-grid")  # wandb_config's keys
    assert run_from_wandb(api_run, []).sweep == {"id": "lr-grid-1a2b3c4d", "name": "lr-grid"}


def test_wandb_loader_normalises_runs_and_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    api = mock.Mock()
    api.runs.return_value = [fake_api_run()]
    cache = RunCache(tmp_path / "cache")
    (run,) = load_wandb("me", "blueberry", group="exp2-lr-attention-mlp", cache=cache, api=api)
    kwargs = api.runs.call_args.kwargs
    assert api.runs.call_args.args == ("me/blueberry",) and kwargs["filters"] == {
        "$and": [{"group": "exp2-lr-attention-mlp"}]
    }
    assert kwargs["lazy"] is False
    assert (run.experiment, run.lr, run.seed, run.state) == ("exp2-lr-attention-mlp", 0.003, 1, "finished")
    assert run.summary["val/loss"] == 4.0 and run.summary["val/best_loss"] == 3.9  # define_metric min/last dicts
    assert run.sweep == {"id": "sw1", "name": "lr grid"} and run.param_count("total") == 100
    assert run.history.series("val/loss")[0].tolist() == [20]
    assert run.history.series("train/loss", x="time")[0].tolist() == [5.0]
    # Unchanged (state, heartbeat, last step): served from the cache, history not scanned again.
    again = fake_api_run()
    api.runs.return_value = [again]
    load_wandb("me", "blueberry", cache=cache, api=api)
    again.scan_history.assert_not_called()
    # A finished run edited afterwards (summary, config, tags: the web app, `run.update()`) is read again.
    edited = fake_api_run()
    edited.summary_metrics = {**edited.summary_metrics, "val/loss": {"min": 3.9, "last": 3.95}}
    api.runs.return_value = [edited]
    (run,) = load_wandb("me", "blueberry", cache=cache, api=api)
    assert run.summary["val/loss"] == 3.95
    edited = fake_api_run()
    edited.tags = ["attention_mlp", "exp2", "outlier"]
    api.runs.return_value = [edited]
    (run,) = load_wandb("me", "blueberry", cache=cache, api=api)
    assert "outlier" in run.tags


def test_wandb_loader_fails_clearly_offline_or_unreachable(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ReportError, match="WANDB_MODE=offline") as info:
        load_wandb("me", "blueberry", api=mock.Mock())
    assert info.value.code == 2
    monkeypatch.setenv("WANDB_MODE", "online")
    api = mock.Mock()
    api.runs.side_effect = ConnectionError("Name or service not known")
    with pytest.raises(ReportError, match="could not read runs from W&B .*ConnectionError") as info:
        load_wandb("me", "blueberry", api=api)
    assert info.value.code == 1


def test_history_keeps_non_finite_values_as_nan():
    # write_json_atomic stores NaN/inf as strings; a diverged run logs them before it stops.
    history = History.from_rows([{"step": 1, "time": 0.5, "train/loss": "inf"}, {"step": 2, "time": 1, "val/loss": 3}])
    assert history.columns == ["step", "time", "train/loss", "val/loss"]
    assert history.series("train/loss")[1].tolist() == [np.inf] and history.series("val/loss")[0].tolist() == [2.0]


@pytest.mark.parametrize(
    "tail",
    [
        "",  # the Arrow path
        '{"step": 4, "time": 2.0, "train/loss": "nan"}\n',  # a NaN string in a number column: row by row
        '{"step": 5, "time": 2.5, "train/lo',  # a torn last line (crash mid-write): row by row, line skipped
    ],
)
def test_history_from_jsonl_matches_row_by_row(tmp_path, tail):
    rows = [
        {"step": 1, "time": 0.5, "train/loss": 4.0, "moe/layer0/load_e0": 0.5, "moe/layer0/load_max": 0.5},
        {"step": 1, "time": 0.6, "val/loss": 4.5, "val/accuracy": 0.1},
        {"step": 2, "time": 1.0, "train/loss": 3.5, "trainer/tokens": 4096, "note": "text is not a metric"},
        {"step": 3, "time": 1.5, "train/loss": 3.0, "train/lr": 1e-3},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    fast = History.from_jsonl(path)
    expected = History.from_rows([json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")])
    assert fast.columns == expected.columns
    assert "moe/layer0/load_e0" not in fast.columns and "moe/layer0/load_max" in fast.columns
    np.testing.assert_array_equal(fast.values, expected.values)  # NaN where a row did not log a column


def test_history_from_empty_jsonl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    history = History.from_jsonl(tmp_path / "metrics.jsonl")
    assert history.columns == ["step", "time"] and history.values.shape == (0, 2)


# ---------------------------------------------------------------- malformed records: listed, never fatal

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "blueberry-hypothesis")
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
STATES = {"finished", "running", "failed", "interrupted", "crashed", "unreadable"}
HOSTILE = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1e308, "", "nan", "text", [], {}, [1, 2], {"a": [1]}, 2**70]),
    st.integers(),
    st.floats(allow_subnormal=False),  # subnormals: see tests/test_fuzz_spec.py (flush-denormal)
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3),
)
RECORD = ("spec.json", "status.json", "summary.json")


def _paths(tree, prefix=""):
    out = []
    for key, value in tree.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict):
            out += _paths(value, f"{prefix}{key}.")
    return out


@st.composite
def mutations(draw):
    """One change a crash, a bug or a hand edit could leave in a run record."""
    kind = draw(st.sampled_from(["field", "whole", "truncate", "line", "row_field"]))
    if kind == "field":
        return kind, draw(st.sampled_from(RECORD)), draw(st.integers(0, 10_000)), draw(HOSTILE)
    if kind == "whole":
        return kind, draw(st.sampled_from(RECORD)), 0, draw(HOSTILE)
    if kind == "truncate":
        return (
            kind,
            draw(st.sampled_from([*RECORD, "metrics.jsonl"])),
            draw(st.floats(0, 1, allow_subnormal=False)),
            None,
        )
    return kind, "metrics.jsonl", draw(st.integers(0, 10_000)), draw(HOSTILE)


def mutate(run_dir: Path, mutation) -> None:
    kind, name, where, value = mutation
    path = run_dir / name
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * where)])
    elif kind == "whole":
        path.write_text(json.dumps(value))
    elif kind == "field":
        tree = json.loads(path.read_text())
        dotted = _paths(tree)[where % len(_paths(tree))]
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
        path.write_text(json.dumps(tree))
    else:
        lines = path.read_text().splitlines()
        i = where % len(lines)
        if kind == "line":
            lines[i] = json.dumps(value)
        else:
            row = json.loads(lines[i])
            row[sorted(row)[where % len(row)]] = value
            lines[i] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "3", "null", '{"time": 1}', '{"step": "5"}', '{"step": true}'])
def test_a_metrics_row_that_is_not_a_row_makes_the_run_unreadable_not_the_report(tmp_path, line):
    good = write_run(tmp_path, "e", seed=1)
    bad = write_run(tmp_path, "e", seed=2)
    rows = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    runs = {r.source: r for r in load_local(tmp_path)}
    assert runs[str(good)].state == "finished"
    assert runs[str(bad)].state == "unreadable" and "metrics.jsonl line 2" in runs[str(bad)].reason


@settings(FUZZ, max_examples=400)
@given(mutation=mutations())
def test_fuzzed_records_are_read_or_listed_unreadable(mutation):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = write_run(tmp, "e", seed=1)
        mutate(run_dir, mutation)
        run = read_local_run(run_dir)
        assert run.state in STATES
        if run.state == "unreadable":
            assert isinstance(run.reason, str) and run.reason
        select([run], group="e", sweep="s", tags=("x",))  # what the report does first with every run


@settings(FUZZ, max_examples=60)
@given(mutation=mutations())
def test_fuzzed_records_never_stop_the_report(mutation):
    """The whole `blueberry report` over a good run and a mutated one: exit 0, both listed (every plot's data
    computed from the records, none drawn: drawing is the slow part and reads no record)."""
    from click.testing import CliRunner

    from blueberry.cli import main
    from blueberry.report import plots

    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(plots, "render_all", lambda jobs, cache_dir=None: {"reused": 0, "drawn": 0}),
    ):
        root = Path(tmp) / "runs"
        write_run(root, "e", seed=1)
        mutate(write_run(root, "e", seed=2), mutation)
        result = CliRunner().invoke(main, ["report", "--runs-root", str(root), "--out", f"{tmp}/out"])
        assert result.exit_code == 0, (result.output, result.exception)
        assert "2 runs" in result.output


@pytest.mark.parametrize(
    ("dotted", "value", "says"),
    [
        ("hardware.precision", ["bf16"], "spec.json: hardware.precision: list where str or NoneType belongs"),
        ("data.leakage.val_docs_in_train", {"n": 3}, "data.leakage.val_docs_in_train: dict where int or NoneType"),
    ],
)
def test_a_header_value_the_report_groups_or_prints_by_must_have_its_type(tmp_path, dotted, value, says):
    """Valid JSON of the wrong shape: listed unreadable with the field, never a configuration named "['bf16']"."""
    run_dir = write_run(tmp_path, "e", seed=1)
    header = json.loads((run_dir / "spec.json").read_text())
    *parents, leaf = dotted.split(".")
    node = header
    for part in parents:
        node = node[part]
    node[leaf] = value
    (run_dir / "spec.json").write_text(json.dumps(header))
    run = read_local_run(run_dir)
    assert run.state == "unreadable" and says in run.reason


def test_folders_this_user_may_not_look_into_are_listed_unreadable_not_a_traceback(tmp_path, monkeypatch):
    """On a shared runs root a colleague's run or experiment folder may be closed to this user (mode 700):
    Path.exists raises PermissionError there (it hides only a missing file). Simulated: tests may run as root."""
    import pathlib

    good = write_run(tmp_path, "e", seed=1)
    closed_run = write_run(tmp_path, "e", seed=2)
    closed_experiment = write_run(tmp_path, "theirs", seed=1).parent
    closed = (closed_run, closed_experiment)
    real_stat, real_iterdir, real_read = os.stat, pathlib.Path.iterdir, pathlib.Path.read_text

    def refused(path):
        if any(path != folder and folder in path.parents for folder in closed):
            raise PermissionError(13, "Permission denied", str(path))

    def stat(path, *args, **kwargs):
        refused(Path(path))
        return real_stat(path, *args, **kwargs)

    def iterdir(path):
        refused(path / "x")
        return real_iterdir(path)

    monkeypatch.setattr(os, "stat", stat)  # (pathlib's stat, exists and is_dir call it too)
    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    monkeypatch.setattr(pathlib.Path, "read_text", lambda path, **kw: refused(path) or real_read(path, **kw))
    runs = {r.source: r for r in load_local(tmp_path)}
    assert runs[str(good)].state == "finished"
    for folder in closed:
        assert runs[str(folder)].state == "unreadable" and "Permission denied" in runs[str(folder)].reason
    assert runs[str(closed_run)].experiment == "e"
    theirs = runs[str(closed_experiment)]  # its own experiment, not one named after the runs root
    assert (theirs.experiment, theirs.id) == ("theirs", "theirs/*") and "cannot be listed" in theirs.reason
    closed = (tmp_path,)
    with pytest.raises(ReportError, match="cannot be read: Permission denied"):  # the runs root itself
        load_local(tmp_path)
