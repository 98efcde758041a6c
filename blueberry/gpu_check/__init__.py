"""`blueberry gpu-check` (= `make gpu-check`): prove and measure the CUDA path in one command, within 8 minutes on
one H100/H200-class GPU. The checks, in order, each with its time box (seconds); all share one overall budget.
The compiled measurements come late: they take what time the others leave, up to their box."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from blueberry.gpu_check import runs, speed
from blueberry.gpu_check.report import format_table, write_outputs
from blueberry.gpu_check.suite import Check, Context, Outcome, run_checks

BUDGET_S = 460.0  # 8 minutes on an H100/H200-class GPU, less ~20 s for imports and writing the outputs

CHECKS = [
    Check("doctor", "what it found and the plan it would choose", 20, speed.check_doctor),
    Check("throughput_eager", "every Experiment 1 preset at the study shape, bf16, eager", 75, speed.check_eager),
    Check("fp16_gradscaler", "one preset in fp16 + GradScaler (the T4 path)", 20, speed.check_fp16),
    Check("chunked_loss", "peak memory: chunked LM-head loss vs full fp32 logits", 25, speed.check_chunked_loss),
    Check("experts", "routed experts: sorted dispatch vs grouped_mm", 25, speed.check_experts),
    Check("batch_auto", "batch_size 'auto': the size it picks, and steps at it", 40, speed.check_batch_auto),
    Check(
        "blueberry_run", "a real `blueberry run`, W&B offline: telemetry, energy, cost", 90, runs.check_blueberry_run
    ),
    # Three and two processes, each paying Python's start-up: 52-62 s and 36-45 s on three H200 hosts whose
    # Python compiled every module from source (docs/performance.md, "A third H200"); the boxes leave a slower
    # host room.
    Check("kill_resume", "SIGKILL and resume vs an uninterrupted run", 100, runs.check_kill_resume),
    Check("torchrun", "torchrun on every GPU: NCCL all-reduce and a run", 75, runs.check_torchrun),
    # The seven presets compile in 12-30 s each on an H200 (209 s with the warm recompile on a slower host; a
    # preset starts only if the slowest so far still fits). The overall budget still caps it.
    Check("throughput_compiled", "every preset at the study shape, bf16, torch.compile", 240, speed.check_compiled),
    Check(
        "projection",
        "PROJECTION: Experiment 1's wall time and cost here, on a T4, on an RTX 4090",
        5,
        speed.check_projection,
    ),  # fmt: skip
]


def run_gpu_check(
    device: torch.device,
    out_dir: str | Path,
    *,
    checks: list[Check] | None = None,
    shape: list[str] | None = None,
    run_shape: list[str] | None = None,
    budget_s: float = BUDGET_S,
    log=print,
) -> tuple[list[Outcome], str, tuple[Path, Path]]:
    """Run the checks on `device`; returns the outcomes, the table and the (JSON, Markdown) paths written."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blueberry-gpu-check-") as work:
        context = Context(
            device=device,
            work_dir=Path(work),
            shape=speed.STUDY_SHAPE if shape is None else shape,
            run_shape=run_shape or [],
            deadline=started + budget_s,
            log=log,
        )
        outcomes = run_checks(CHECKS if checks is None else checks, context)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("ok", "failed", "skipped")}
    meta = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "budget_s": budget_s,
        "total_s": time.monotonic() - started,
        "passed": counts["ok"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
    }
    paths = write_outputs(out_dir, outcomes, meta)
    return outcomes, format_table(outcomes), paths
