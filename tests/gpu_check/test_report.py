"""gpu-check's table, JSON and Markdown."""

import json

from blueberry.gpu_check.report import datasheet_table, format_table, write_outputs
from blueberry.gpu_check.suite import Outcome
from blueberry.hardware import PRESETS

OUTCOMES = [
    Outcome("doctor", "found", "ok", 0.4, 20, [("device", "NVIDIA H200"), ("preset", "H200")], {"doctor": "GPU 0 …"}),
    Outcome("fp16", "T4 path", "skipped", 0.0, 20, [], {}, "fp16 needs | a GPU"),
    Outcome("run", "real run", "failed", 12.0, 90, [("GPU telemetry", "0 rows")], {"gpu_rows": 0}, "no telemetry"),
]


def test_table_has_one_row_per_finding_and_the_status_once_per_check():
    lines = format_table(OUTCOMES).splitlines()
    assert lines[0] == "| check | item | value | status | s / box |"
    assert lines[2] == "| doctor | device | NVIDIA H200 | ok | 0 / 20 |"
    assert lines[3] == "|  | preset | H200 |  |  |"
    assert lines[4] == "| fp16 |  | fp16 needs \\| a GPU | skipped | 0 / 20 |"  # a pipe in a value is escaped
    assert lines[5] == "| run | GPU telemetry | 0 rows | failed: no telemetry | 12 / 90 |"


def test_outputs_hold_every_figure_and_the_table(tmp_path):
    meta = {"created_at": "2026-12-02T03:00:00+0000", "device_name": "NVIDIA H200", "passed": 1, "failed": 1}
    json_path, md_path = write_outputs(tmp_path / "out", OUTCOMES, {**meta, "skipped": 1, "budget_s": 480})
    data = json.loads(json_path.read_text())
    assert data["device_name"] == "NVIDIA H200" and [c["name"] for c in data["checks"]] == ["doctor", "fp16", "run"]
    assert data["checks"][2]["figures"] == {"gpu_rows": 0} and data["checks"][2]["error"] == "no telemetry"
    markdown = md_path.read_text()
    assert format_table(OUTCOMES) in markdown and "GPU 0 …" in markdown and "PROJECTION" in markdown
    assert datasheet_table() in markdown
    assert oct(md_path.stat().st_mode)[-3:] == "644"


def test_datasheet_table_names_a_source_for_every_gpu():
    rows = datasheet_table().splitlines()[2:]
    assert len(rows) == len(PRESETS)
    for preset, row in zip(PRESETS, rows):
        assert preset.source and row.endswith(f"| {preset.source} |") and row.startswith(f"| {preset.name} |")
