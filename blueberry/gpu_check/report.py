"""gpu-check's outputs: one table (stdout and Markdown) and the raw figures as JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from blueberry.fileio import write_results
from blueberry.gpu_check.suite import Outcome
from blueberry.hardware import PRESETS


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(outcomes: list[Outcome]) -> str:
    """One row per finding: check, item, value, and the check's status and time against its box on its first row."""
    lines = ["| check | item | value | status | s / box |", "|---|---|---|---|---:|"]
    for outcome in outcomes:
        rows = outcome.rows or [("", outcome.error or "")]
        status = outcome.status + (f": {outcome.error}" if outcome.error and outcome.rows else "")
        timing = f"{outcome.seconds:.0f} / {outcome.time_box_s:.0f}"
        for i, (item, value) in enumerate(rows):
            first = i == 0
            name, shown_status, shown_time = (outcome.name, status, timing) if first else ("", "", "")
            lines.append(f"| {name} | {_cell(item)} | {_cell(value)} | {_cell(shown_status)} | {shown_time} |")
    return "\n".join(lines)


def datasheet_table() -> str:
    """The data-sheet peaks the MFU figures and the projection use, with their sources."""
    lines = ["| GPU | bf16 | fp16 | tf32 | fp32 | $/h (list) | source |", "|---|---:|---:|---:|---:|---:|---|"]
    for p in PRESETS:
        peaks = [f"{p.peak_tflops[k]:g}" if k in p.peak_tflops else "—" for k in ("bf16", "fp16", "tf32", "fp32")]
        lines.append(f"| {p.name} | {' | '.join(peaks)} | {p.usd_per_hour:.2f} | {p.source} |")
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, outcomes: list[Outcome], meta: dict) -> tuple[Path, Path]:
    """`gpu-check-<time>.json` (every figure) and `.md` (the table, the doctor's view, the data-sheet peaks)."""
    doctor = next((o.figures.get("doctor") for o in outcomes if o.figures.get("doctor")), None)
    parts = [
        f"# gpu-check {meta.get('created_at', '')}",
        f"{meta.get('device_name', '')}: {meta.get('passed', 0)} ok, {meta.get('failed', 0)} failed, "
        f"{meta.get('skipped', 0)} skipped in {meta.get('total_s', 0):.0f} s (budget {meta.get('budget_s', 0):.0f} s). "
        "Rows marked PROJECTION are arithmetic on the measured speeds, not measurements.",
        format_table(outcomes),
    ]
    if doctor:
        parts += ["## What it found", f"```\n{doctor}\n```"]
    parts += ["## Data-sheet peaks (dense TFLOP/s)", datasheet_table()]
    data = {**meta, "checks": [asdict(outcome) for outcome in outcomes]}
    data = json.loads(json.dumps(data, default=str))  # tuples, paths, dtypes as text
    stem = f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = write_results(out_dir, stem, data, "\n\n".join(parts), mode=0o644)  # readable where it is sent
    return json_path, json_path.with_suffix(".md")
