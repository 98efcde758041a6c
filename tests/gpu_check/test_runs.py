"""The launched-run checks' parts: what a run record says about the GPU, resume comparison, time boxes."""

import json
import py_compile
import sys

import pytest

from blueberry.gpu_check.runs import (
    compare_records,
    run_process,
    slowest_imports,
    telemetry,
    without_bytecode_cache,
)
from blueberry.gpu_check.suite import CheckFailed


def _record(run_dir, rows, summary):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_telemetry_counts_gpu_rows_and_reads_energy_and_cost(tmp_path):
    rows = [
        {"step": 5, "train/loss": 5.0, "gpu/util_pct": 97.0, "gpu/power_w": 410.0},
        {"step": 10, "train/loss": 4.0, "gpu/util_pct": 98.0},
        {"step": 10, "val/loss": 4.1},
    ]
    summary = {"gpu/energy_wh": 1.5, "cost/usd": 0.01, "perf/tokens_per_s": 1e5, "trainer/tokens": 4e5}
    found = telemetry(_record(tmp_path / "run", rows, summary))
    assert found["metric_rows"] == 3 and found["gpu_rows"] == 2
    assert found["gpu_keys"] == ["gpu/power_w", "gpu/util_pct"]
    assert (found["energy_wh"], found["cost_usd"], found["tokens"]) == (1.5, 0.01, 4e5)
    (tmp_path / "run" / "summary.json").write_text("[]")  # valid JSON, not a run's summary
    with pytest.raises(CheckFailed, match="holds a JSON list, not an object"):
        telemetry(tmp_path / "run")


def test_compare_records_reports_the_largest_relative_difference(tmp_path):
    rows = [
        {"step": 5, "train/loss": 4.0, "train/grad_norm": 1.0, "perf/tokens_per_s": 10},
        {"step": 5, "val/loss": 4.5},
    ]
    reference = _record(tmp_path / "a", rows, {"weights/sha256": "x"})
    changed = [{**rows[0], "train/loss": 4.0004, "perf/tokens_per_s": 99}, rows[1]]  # wall-clock figures ignored
    resumed = _record(tmp_path / "b", changed, {"weights/sha256": "y"})
    found = compare_records(reference, resumed)
    assert found["same_steps"] and found["max_rel_diff"] == pytest.approx(1e-4) and not found["weights_equal"]
    assert compare_records(reference, reference) == {"same_steps": True, "max_rel_diff": 0.0, "weights_equal": True}
    missing = _record(tmp_path / "c", rows[:1], {})
    assert compare_records(reference, missing)["same_steps"] is False


def test_a_process_past_its_time_box_is_killed(tmp_path):
    with pytest.raises(CheckFailed, match="timed out after 1 s"):
        run_process([sys.executable, "-c", "import time; time.sleep(60)"], {}, 1)
    done = run_process([sys.executable, "-c", "print('hi')"], {}, 30)
    assert done.returncode == 0 and done.stdout == "hi\n"


def test_slowest_imports_adds_up_each_packages_own_import_times():
    done = run_process([sys.executable, "-X", "importtime", "-c", "import json, email.message"], {}, 30)
    found = dict(slowest_imports(done.stderr, n=100))
    assert found["json"] > 0 and found["email"] > 0 and "email.message" not in found  # by top-level package
    lines = [
        "import time: self [us] | cumulative | imported package",
        "import time:    300000 |     300000 |   torch._C",
        "import time:   1000000 |    1300000 | torch",
        "import time:     10000 |    1510000 | transformers",
        "progress 10% | loss 3.2",  # a line of the run's own
        "import time:   1500000 |    1500000 |     torch._dynamo",  # imported later, by transformers
        "import time:   1200000 |    1200000 | transformers.models.deepseek_v3",  # a lazy import, later still
    ]
    assert slowest_imports("\n".join(lines)) == [("torch", pytest.approx(2.8)), ("transformers", pytest.approx(1.21))]
    assert [name for name, _ in slowest_imports("\n".join(lines), n=1)] == ["torch"]


def test_without_bytecode_cache_names_the_packages_python_compiles_from_source(tmp_path, monkeypatch):
    for name in ("cached", "uncached"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("x = 1\n")
    py_compile.compile(str(tmp_path / "cached" / "__init__.py"), doraise=True)  # writes __pycache__/*.pyc
    monkeypatch.syspath_prepend(str(tmp_path))
    assert without_bytecode_cache(["cached", "uncached", "no_such_package", "sys"]) == ["uncached"]  # sys: built in
