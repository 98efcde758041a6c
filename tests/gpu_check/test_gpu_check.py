"""The programme end to end on CPU at a tiny shape: checks, table, JSON and Markdown (gpu-check itself runs on CUDA)."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from blueberry.bench.suite import TINY
from blueberry.gpu_check import CHECKS, run_gpu_check

# The first 60K tokens: a 7K-token validation set instead of the corpus's 137K (seconds per evaluation on one core)
RUN_SHAPE = [a for a in TINY if a.startswith(("--model.", "--data."))]
RUN_SHAPE += ["--data.max_tokens=60000", "--train.threads=1"]


def _checks(*names, box_s=None):
    """The named checks; with box_s, in a time box of that size (a busy 2-core CPU is no H200)."""
    return [replace(check, time_box_s=box_s or check.time_box_s) for check in CHECKS if check.name in names]


def test_checks_write_the_table_json_and_markdown(tmp_path):
    outcomes, table, (json_path, md_path) = run_gpu_check(
        torch.device("cpu"), tmp_path, checks=_checks("doctor", "fp16_gradscaler"), shape=[*TINY], log=lambda m: None
    )
    assert [(o.name, o.status) for o in outcomes] == [("doctor", "ok"), ("fp16_gradscaler", "skipped")]
    assert (
        table in md_path.read_text()
        and "| fp16_gradscaler |  | fp16 + GradScaler needs a CUDA GPU | skipped |" in table
    )
    data = json.loads(json_path.read_text())
    assert (data["device"], data["passed"], data["skipped"], data["failed"]) == ("cpu", 1, 1, 0)


def test_real_run_and_kill_resume_checks_on_cpu(tmp_path):
    """A real `blueberry run` (no GPU telemetry expected on CPU) and SIGKILL + resume: bit-exact on CPU."""
    outcomes, _, _ = run_gpu_check(
        torch.device("cpu"), tmp_path, checks=_checks("blueberry_run", "kill_resume", box_s=300), shape=[*TINY],
        run_shape=RUN_SHAPE, budget_s=900, log=lambda m: None,
    )  # fmt: skip
    run, resume = outcomes
    assert run.status == "ok", run.error
    assert run.figures["metric_rows"] > 0 and run.figures["gpu_rows"] == 0 and run.figures["startup_s"] > 0
    before = dict(run.rows)["before training (s)"]  # the run's own record of its start-up, stage by stage
    assert [part.split()[0] for part in before.split(", ")] == ["start", "device", "build", "tracking"]
    slowest = run.figures["slowest_imports"]  # where "start" went, from the run's -X importtime
    assert "torch" in dict(slowest) and dict(run.rows)["slowest imports (s)"].startswith(slowest[0][0])
    assert dict(run.rows)["bytecode caches"].startswith(
        "missing for" if run.figures["without_bytecode_cache"] else "present"
    )
    assert resume.status == "ok", resume.error
    assert resume.figures["max_rel_diff"] == 0.0 and resume.figures["weights_equal"]
    assert resume.figures["killed_after_checkpoint"] >= 10


def test_the_collective_probe_all_reduces_over_every_rank_with_gloo_on_a_cpu():
    """gpu-check's NCCL probe forms a process group of its own; on a CPU the same code runs over gloo."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    argv = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "blueberry.gpu_check.nccl_probe"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "backend": "gloo",
        "world_size": 2,
        "sum": 3.0,
        "ok": True,
    }
