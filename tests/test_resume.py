"""Fault tolerance end to end: kill -9 and resume bit-exactly, SIGINT/SIGTERM, NaN loss, OOM, wrong spec.

Signals in-process are real ones (`signal.raise_signal`) delivered while the trainer logs a given step.
"""

import gzip
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from on_terminal import OnTerminal
from test_runner import TINY

from blueberry.cli import main
from blueberry.overrides import load_spec
from blueberry.runner import _resumable, execute
from blueberry.tracking import read_metrics
from blueberry.tracking.wandb_log import read_wandb_log

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "experiments/quickstart.json"
BLUEBERRY = Path(sys.executable).parent / "blueberry"
# Dropout and router noise on (the baseline MoE): resuming must restore the RNG exactly. One thread: on a busy
# machine two OpenMP threads per process spin-wait for each other and a run gets many times slower.
SHORT = [*TINY, "--model.variant=baseline", "--train.steps=40", "--train.log_every=3", "--train.eval_every=10"]
SHORT += ["--train.checkpoint_every=5", "--train.keep_checkpoints=3", "--experiment=ft", "--train.threads=1"]
NOT_REPRODUCIBLE = ("perf/", "time/", "cost/")  # wall-clock figures


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """An in-process run with train.threads sets torch's thread count for the whole process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def comparable(run_dir: Path) -> tuple[dict, list[dict]]:
    """The summary and every metrics row without the wall-clock figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    strip = lambda d: {k: v for k, v in d.items() if k != "time" and not k.startswith(NOT_REPRODUCIBLE)}  # noqa: E731
    return strip(summary), [strip(r) for r in rows]


def latest_checkpoint(root: Path) -> int:
    return max((int(p.stem.removeprefix("step-")) for p in root.glob("ft/*/checkpoints/step-*.pt")), default=0)


def start(root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    argv = [str(BLUEBERRY), "run", "experiments/quickstart.json", *SHORT, f"--tracking.runs_root={root}", *extra]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def after_next_checkpoint(process: subprocess.Popen, root: Path, rng: random.Random) -> None:
    """Wait until the run writes a new checkpoint, then a random fraction of a second more (a step or a few)."""
    seen = latest_checkpoint(root)
    deadline = time.monotonic() + 300
    while latest_checkpoint(root) <= seen:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.5))


def test_killed_twice_with_sigkill_resumes_bit_exact(tmp_path):
    """SIGKILL at a random step, SIGKILL again after `--resume`, then automatic resume to the end: the record
    equals that of one uninterrupted run, value for value."""
    reference = execute(load_spec(QUICKSTART, [*SHORT, f"--tracking.runs_root={tmp_path / 'ref'}"]), log=print)
    root, rng = tmp_path / "runs", random.Random()
    resumed_from = []
    for extra in [(), ("--resume",)]:
        process = start(root, *extra)
        after_next_checkpoint(process, root, rng)
        process.kill()
        assert process.wait(timeout=60) == -signal.SIGKILL
        resumed_from.append(latest_checkpoint(root))
    process = start(root)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]

    (run_dir,) = (root / "ft").iterdir()  # every attempt continued the same run directory
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    header = json.loads((run_dir / "spec.json").read_text())
    assert [r["step"] for r in header["resumes"]] == resumed_from
    assert comparable(run_dir) == comparable(reference.run_dir)  # every logged value, weights digest included
    assert len(list((run_dir / "checkpoints").glob("step-*.pt"))) == 3  # keep-last-K

    # One W&B run, resumed: three offline segments. A SIGKILL'd one may hold nothing (wandb-core writes its log
    # every 15 s), so the next attempt re-logged the missing rows: together they hold every step.
    logs = [read_wandb_log(s) for s in sorted((run_dir / "wandb").glob("offline-run-*"))]
    wandb_id = header["wandb"]["id"]  # fresh for the first attempt, stored in spec.json, kept by every resume
    assert wandb_id.startswith(f"{header['name']}-") and header["wandb"]["resume"] == "allow"
    assert len(logs) == 3 and logs[-1].run_id == wandb_id and logs[-1].exit_code == 0
    assert {log.run_id for log in logs} <= {wandb_id, ""}  # "": a segment killed before wandb-core wrote it
    logged = {(row["trainer/step"], "val/loss" in row) for log in logs for row in log.history}
    assert logged == {(row["step"], "val/loss" in row) for row in read_metrics(run_dir / "metrics.jsonl")}


def _interrupt_at(monkeypatch, step: int, signum=signal.SIGINT):
    """Deliver a real signal to this process while the trainer logs `step`."""
    from blueberry.tracking.record import RunRecord

    original = RunRecord.log

    def log(self, metrics, at):
        original(self, metrics, at)
        if at == step and "train/loss" in metrics:
            signal.raise_signal(signum)

    monkeypatch.setattr(RunRecord, "log", log)


def invoke(*args):
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), *args])
    assert "Traceback" not in result.output
    return result


def interrupted(tmp_path, monkeypatch, steps: int, at: int, *extra: str) -> tuple[list[str], Path]:
    """The arguments of a tiny run `ft` (eval at its end; `extra` after them) and its run directory after a SIGINT
    at step `at`."""
    args = [*TINY, f"--train.steps={steps}", "--train.log_every=2", f"--train.eval_every={steps}", "--experiment=ft"]
    args += [f"--tracking.runs_root={tmp_path / 'runs'}", *extra]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step=at)
        assert invoke(*args).exit_code == 130
    (run_dir,) = (tmp_path / "runs" / "ft").iterdir()
    return args, run_dir


# The quickstart as it is, and the DeepSeek-V3 block balancing by routing-bias updates: the biases are buffers
# in the checkpoint, so the resumed run routes (and logs each expert's load) exactly as the clean one.
BIAS_UPDATE = ["--model.variant=deepseek_v3", "--model.balance=bias_update", "--model.bias_update_rate=0.01"]


@pytest.mark.parametrize("model", [[], BIAS_UPDATE], ids=["quickstart", "bias_update"])
def test_sigint_checkpoints_and_resume_matches_a_clean_run(tmp_path, monkeypatch, model):
    args = [*TINY, *model, "--train.steps=8", "--train.log_every=2", "--train.eval_every=4", "--experiment=ft"]
    clean = execute(load_spec(QUICKSTART, [*args, f"--tracking.runs_root={tmp_path / 'clean'}"]), log=print)
    root, handler = tmp_path / "runs", signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step=4)
        result = invoke(*args, f"--tracking.runs_root={root}")  # checkpoint_every unset: saved on the signal only
    assert result.exit_code == 130, result.output
    (run_dir,) = (root / "ft").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["reason"].startswith("SIGINT at step 4")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000004.pt"]
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back
    first = json.loads((run_dir / "spec.json").read_text())["wandb"]
    saved = torch.load(run_dir / "checkpoints" / "step-000004.pt", weights_only=True)
    assert saved["wall_s"] > saved["elapsed_s"] > 0  # the first attempt's wall time (set-up included), for the cost

    result = invoke(*args, f"--tracking.runs_root={root}", "--resume")
    assert result.exit_code == 0, result.output
    assert comparable(run_dir) == comparable(clean.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cost/device_hours"] * 3600 > saved["wall_s"]  # the resumed run's cost covers both attempts
    # The resume continues the W&B run the first attempt created, explicitly; never a new id.
    resumed = json.loads((run_dir / "spec.json").read_text())["wandb"]
    assert (first["resume"], resumed["resume"], resumed["id"]) == ("never", "allow", first["id"])
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [read_wandb_log(s).run_id for s in segments] == [first["id"]] * 2


def test_a_terminal_hangup_checkpoints_and_stops_the_run(tmp_path):
    """`blueberry run` on a terminal that goes away (an ssh session dropping): SIGHUP, then every write to the
    terminal fails. The run saves a checkpoint of its step and stops as interrupted (exit 129), resumable."""
    root = tmp_path / "runs"
    argv = [str(BLUEBERRY), "run", "experiments/quickstart.json", *SHORT, "--train.steps=1000"]
    argv += ["--train.checkpoint_every=1000", f"--tracking.runs_root={root}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    session = OnTerminal(argv, cwd=REPO, env=env)
    process = session.process
    deadline = time.monotonic() + 300
    while not any(path.stat().st_size for path in root.glob("ft/*/metrics.jsonl")):  # a step was logged
        assert process.poll() is None and time.monotonic() < deadline, "the run never logged a step"
        session.drain()
    session.hang_up()
    assert process.wait(timeout=300) == 128 + signal.SIGHUP
    (run_dir,) = (root / "ft").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["reason"].startswith("SIGHUP at step ")
    step = int(status["reason"].split()[3].rstrip(","))
    assert [p.name for p in (run_dir / "checkpoints").glob("*.pt")] == [f"step-{step:06d}.pt"]


def test_nan_loss_fails_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from blueberry.models.lm import BlueberryLM

    forward, calls = BlueberryLM.forward, []

    def poisoned(self, input_ids, targets=None):
        out = forward(self, input_ids, targets)
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 7:  # optimizer step 7 (grad_accum 1)
                out.loss = out.loss * float("nan")  # training computes the loss in the model (chunked LM head)
        return out

    monkeypatch.setattr(BlueberryLM, "forward", poisoned)
    root = tmp_path / "runs"
    result = invoke(
        *TINY,
        "--train.steps=12",
        "--train.log_every=3",
        "--train.eval_every=12",
        "--train.checkpoint_every=5",
        f"--tracking.runs_root={root}",
    )
    assert result.exit_code == 1
    assert "run failed" in result.output and "NaN/inf at step 7" in result.output
    (run_dir,) = (root / "quickstart").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "at step 7" in status["reason"] and "step-000005.pt" in status["reason"]
    assert status["exit_code"] == 1
    (good,) = (run_dir / "checkpoints").iterdir()
    weights = torch.load(good, weights_only=True)["model"]
    assert good.name == "step-000005.pt" and all(torch.isfinite(t).all() for t in weights.values())
    assert max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl")) == 6  # nothing logged after the NaN


def test_gpu_out_of_memory_names_batch_size_and_a_smaller_one(tmp_path, monkeypatch):
    import blueberry.runner as runner

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner, "train", oom)
    root = tmp_path / "runs"
    result = invoke(*TINY, "--train.batch_size=16", "--train.steps=2", f"--tracking.runs_root={root}")
    assert result.exit_code == 1
    assert "train.batch_size=16" in result.output and "--train.batch_size=8 --train.grad_accum=2" in result.output
    (run_dir,) = (root / "quickstart").iterdir()
    assert "out of memory" in json.loads((run_dir / "status.json").read_text())["reason"]


def test_resume_refuses_another_spec_and_needs_something_to_resume(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    args = [*TINY, "--train.steps=6", "--train.eval_every=3", "--train.log_every=2", f"--tracking.runs_root={root}"]
    result = invoke(*args, "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output
    assert not root.exists()  # nothing written

    monkeypatch.setenv("WANDB_RUN_ID", "fixed-id")  # as a sweep does: the run id no longer follows the spec
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step=2, signum=signal.SIGTERM)
        result = invoke(*args)
    assert result.exit_code == 143 and "run the same command again to resume" in result.output
    (run_dir,) = (root / "quickstart").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["reason"].startswith("SIGTERM at step 2, checkpoint ")
    (segment,) = (run_dir / "wandb").glob("offline-run-*")
    # The W&B run was finished, not left dangling, with the process's exit code (W&B's convention for a run
    # stopped by a signal: 128 + its number), and the record says the same.
    assert read_wandb_log(segment).exit_code == status["exit_code"] == 143
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = invoke(*args, "--train.lr=0.03")
    assert result.exit_code == 2 and "another spec" in result.output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # untouched


def test_wandb_checkpoint_artifacts_are_staged_offline(tmp_path):
    from wandb.proto import wandb_internal_pb2

    from blueberry.tracking.wandb_log import _payloads

    spec = load_spec(
        None,
        [
            *TINY,
            "--train.steps=4",
            "--train.eval_every=4",
            "--train.checkpoint_every=2",
            "--train.keep_checkpoints=1",
            "--tracking.wandb_checkpoints=true",
            f"--tracking.runs_root={tmp_path / 'runs'}",
        ],
    )
    result = execute(spec, log=lambda m: None)
    (segment,) = Path(result.wandb_dir).glob("run-*.wandb")
    artifacts = []
    for payload in _payloads(segment.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "artifact":
            artifacts.append((record.artifact.name, record.artifact.type, json.loads(record.artifact.metadata)))
    wandb_id = json.loads((result.run_dir / "spec.json").read_text())["wandb"]["id"]
    checkpoints = [(name, kind, meta["step"]) for name, kind, meta in artifacts if name.startswith("checkpoint-")]
    assert checkpoints == [(f"checkpoint-{wandb_id}", "model", s) for s in (2, 4)]
    assert artifacts[-1][:2] == (f"model-{wandb_id}", "model")  # the final weights
    # keep_checkpoints=1 deleted step 2's file; W&B staged its own copy, so `wandb sync` can still upload it.
    assert [p.name for p in (result.run_dir / "checkpoints").iterdir()] == ["step-000004.pt"]


@pytest.mark.parametrize("state", ["finished", "failed"])
def test_finished_or_failed_runs_are_not_resumed_automatically(tmp_path, state):
    from blueberry.tracking.record import claim_run_dir

    first = claim_run_dir(tmp_path, "exp", "run", reuse=lambda path, s: s != "finished")
    (first.path / "status.json").write_text(json.dumps({"state": state}))
    first.release()
    again = claim_run_dir(tmp_path, "exp", "run", reuse=lambda path, s: s in ("running", "interrupted"))
    assert again.path.name == "run-2" and not again.reused


def test_a_live_run_is_never_claimed_and_a_crashed_one_is(tmp_path):
    from blueberry.tracking.record import claim_run_dir

    live = claim_run_dir(tmp_path, "exp", "run", reuse=lambda path, s: True)
    (live.path / "status.json").write_text(json.dumps({"state": "running"}))
    other = claim_run_dir(tmp_path, "exp", "run", reuse=lambda path, s: True)
    assert other.path.name == "run-2"  # `run` is locked by a live process
    live.release()  # what the kernel does when the process dies, even by SIGKILL
    crashed = claim_run_dir(tmp_path, "exp", "run", reuse=lambda path, s: s == "running")
    assert crashed.path == live.path and crashed.reused and crashed.previous_state == "running"


def test_resume_cuts_metrics_back_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    from blueberry.tracking import RunRecord

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (2, 4, 4, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "train/lo'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "spec.json").write_text(json.dumps({"created_at": "then", "resumes": [{"step": 2}]}))
    record = RunRecord(run_dir, {"created_at": "now", "code": {"git_sha": "abc"}}, resume_step=4)
    record.log({"train/loss": 0.2}, 5)
    record.finish("finished")
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2, 4, 4, 5]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 4  # every line whole
    header = json.loads((run_dir / "spec.json").read_text())
    assert header["created_at"] == "then" and [r["step"] for r in header["resumes"]] == [2, 4]


def test_a_run_that_crashed_before_its_first_checkpoint_restarts_from_step_0(tmp_path):
    args = [*TINY, "--train.steps=4", "--train.eval_every=2", "--train.log_every=2", "--experiment=ft"]
    clean = execute(load_spec(QUICKSTART, [*args, f"--tracking.runs_root={tmp_path / 'clean'}"]), log=print)
    spec = load_spec(QUICKSTART, [*args, f"--tracking.runs_root={tmp_path / 'runs'}"])
    first = execute(spec, log=print)
    # What a kill leaves when no checkpoint was written yet: status still "running", a partial metrics file.
    (first.run_dir / "status.json").write_text(json.dumps({"state": "running", "started_at": 0}))
    lines = (first.run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (first.run_dir / "metrics.jsonl").write_text("".join(lines[:2]))
    again = execute(spec, log=print)
    assert again.run_dir == first.run_dir
    assert json.loads((again.run_dir / "spec.json").read_text())["resumes"][0]["step"] == 0
    assert comparable(again.run_dir) == comparable(clean.run_dir)


def test_a_corrupt_latest_checkpoint_is_skipped_kept_aside_and_the_resume_still_bit_exact(tmp_path, monkeypatch):
    args = [*TINY, "--train.steps=8", "--train.log_every=2", "--train.eval_every=4", "--experiment=ft"]
    args += ["--train.checkpoint_every=2", "--train.keep_checkpoints=3"]
    clean = execute(load_spec(QUICKSTART, [*args, f"--tracking.runs_root={tmp_path / 'clean'}"]), log=print)
    root = tmp_path / "runs"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step=6)
        assert invoke(*args, f"--tracking.runs_root={root}").exit_code == 130
    (run_dir,) = (root / "ft").iterdir()
    latest = run_dir / "checkpoints" / "step-000006.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a truncated write the rename did not protect (disk, copy)
    result = invoke(*args, f"--tracking.runs_root={root}")
    assert result.exit_code == 0, result.output
    assert "skipped a corrupt checkpoint" in result.output and "step-000006.pt.corrupt" in result.output
    assert "from step 4" in result.output
    assert (run_dir / "checkpoints" / "step-000006.pt.corrupt").stat().st_size == 1000  # kept, not deleted
    assert comparable(run_dir) == comparable(clean.run_dir)


def test_resume_on_request_with_every_checkpoint_corrupt_exits_2_and_leaves_the_run(tmp_path, monkeypatch):
    args, run_dir = interrupted(tmp_path, monkeypatch, steps=4, at=2)
    (checkpoint,) = (run_dir / "checkpoints").glob("step-*.pt")
    checkpoint.write_bytes(b"not a checkpoint")
    result = invoke(*args, "--resume")  # --resume promises a checkpoint: not step 0
    assert result.exit_code == 2 and f"{run_dir} has no readable checkpoint" in result.output, result.output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]


@pytest.mark.parametrize(
    "file, text",
    [("metrics.jsonl", "[1, 2]\n"), ("metrics.jsonl", '{"step": "2"}\n{"step": 4}\n'), ("status.json", "[]")]
    + [("spec.json", '{"resumes": 3}'), ("status.json", '{"state": "running", "started_at": "noon"}')],
)
def test_an_unreadable_earlier_attempt_is_left_alone_and_named(tmp_path, monkeypatch, file, text):
    args, crashed = interrupted(tmp_path, monkeypatch, steps=4, at=2)
    (crashed / file).write_text(text)
    # W&B's service appends to its own debug logs (*.log) whenever it shuts down: those are not the record
    record = lambda: {p: p.read_bytes() for p in crashed.rglob("*") if p.is_file() and p.suffix != ".log"}  # noqa: E731
    before = record()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"not resuming {crashed}" in result.output and "unreadable" in result.output
    assert record() == before  # untouched
    assert sorted(p.name for p in (tmp_path / "runs" / "ft").iterdir()) == [crashed.name, crashed.name + "-2"]


def test_one_process_does_not_continue_an_interrupted_torchrun_run(tmp_path, monkeypatch):
    """Its global batch was the ranks' together: a plain `blueberry run` of the same spec starts a new attempt."""
    args, interrupted_run = interrupted(tmp_path, monkeypatch, steps=4, at=2)
    header = json.loads((interrupted_run / "spec.json").read_text())
    header["hardware"]["world_size"] = 2  # as a torchrun run of 2 processes records it
    (interrupted_run / "spec.json").write_text(json.dumps(header))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"not resuming {interrupted_run}: a torchrun run of 2 processes" in result.output
    assert json.loads((interrupted_run / "status.json").read_text())["state"] == "interrupted"  # left as it was
    assert sorted(p.name for p in interrupted_run.parent.iterdir()) == [
        interrupted_run.name,
        interrupted_run.name + "-2",
    ]


@pytest.mark.parametrize("hardware", ["x", {"world_size": "two"}, {"world_size": None}, {"world_size": True}, {}])
def test_a_header_not_saying_several_processes_is_no_torchrun_run(tmp_path, hardware):
    """Valid JSON that is not what the runner writes: no claim of a torchrun run, so nothing said about one."""
    (tmp_path / "spec.json").write_text(json.dumps({"hardware": hardware}))
    said = []
    assert _resumable(None, log=said.append)(tmp_path, "interrupted") and said == []


@pytest.mark.parametrize(
    ("theirs", "ours", "continued"),
    [
        ({"id": "job", "restart": 0}, {"id": "job", "restart": 1}, True),  # torchrun restarted this job's ranks
        ({"id": "job", "restart": 1}, {"id": "job", "restart": 3}, True),
        ({"id": "job", "restart": 0}, {"id": "job", "restart": 0}, False),  # a first start: a failed run stays
        ({"id": "job", "restart": 1}, {"id": "job", "restart": 1}, False),  # not left by an earlier start
        ({"id": "other", "restart": 0}, {"id": "job", "restart": 1}, False),  # another torchrun job's run
        ({"id": "none", "restart": 0}, {"id": "none", "restart": 1}, False),  # no --rdzv-id: any job's
        ({"id": "job", "restart": "0"}, {"id": "job", "restart": 1}, False),
        ("job", {"id": "job", "restart": 1}, False),
        (None, {"id": "job", "restart": 1}, False),
        ({"id": "job", "restart": 0}, None, False),  # not under torchrun
    ],
)
def test_a_torchrun_restart_continues_the_run_its_job_left_failed(tmp_path, theirs, ours, continued):
    (tmp_path / "spec.json").write_text(json.dumps({"hardware": {"world_size": 2}, "torchrun": theirs}))
    assert _resumable(None, world_size=2, job=ours)(tmp_path, "failed") is continued
    assert _resumable(False, world_size=2, job=ours)(tmp_path, "failed") is continued  # --no-resume too
    assert _resumable(False, world_size=2, job=ours)(tmp_path, "running") is continued  # rank 0 died
    assert _resumable(True, world_size=2, job=ours)(tmp_path, "failed") is continued  # --resume, no checkpoint
    assert _resumable(None, world_size=2, job=ours)(tmp_path, "finished") is False
    assert _resumable(None, world_size=4, job=ours)(tmp_path, "failed") is False  # an elastic job, now of other size


def test_an_unreadable_wandb_segment_does_not_stop_the_resume(tmp_path, monkeypatch):
    args, run_dir = interrupted(tmp_path, monkeypatch, steps=6, at=4)
    (segment,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    segment.write_bytes(b"{not a W&B log")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "W&B segment unreadable, its rows are logged again" in result.output
    logs = sorted((run_dir / "wandb").glob("offline-run-*"))
    replayed = {row["trainer/step"] for row in read_wandb_log(logs[-1]).history}
    assert {2, 4} <= replayed  # the rows the unreadable segment held are in the new one


def test_a_replayed_nan_reaches_wandb_as_a_number(tmp_path, monkeypatch):
    # The record writes a diverged step's NaN as the string "nan" (JSON has none); W&B's series must stay numeric.
    args, run_dir = interrupted(tmp_path, monkeypatch, steps=6, at=4)
    (segment,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    segment.write_bytes(b"lost")  # as after a SIGKILL offline: every row up to the checkpoint is logged again
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    diverged = next(row for row in rows if "train/loss" in row)
    diverged["train/loss"] = "nan"
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert invoke(*args).exit_code == 0
    replayed = read_wandb_log(sorted((run_dir / "wandb").glob("offline-run-*"))[-1]).history
    (row,) = [r for r in replayed if r.get("trainer/step") == diverged["step"] and "train/loss" in r]
    assert isinstance(row["train/loss"], float) and math.isnan(row["train/loss"])


def test_wandb_dir_moves_wandb_files_and_the_resume_finds_them_there(tmp_path, monkeypatch):
    """W&B's precedence for its directory: tracking.wandb_dir, else WANDB_DIR, else the run's own directory.
    Under WANDB_DIR the resumed attempt finds the first attempt's log there and re-logs nothing it holds."""
    elsewhere = tmp_path / "wandb files"  # (the printed `wandb sync` line quotes it, so it pastes as one argument)
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    args, run_dir = interrupted(tmp_path, monkeypatch, steps=6, at=4)
    header = json.loads((run_dir / "spec.json").read_text())["wandb"]
    assert header["dir"] == {"value": str(elsewhere), "source": "WANDB_DIR"}
    assert not (run_dir / "wandb").exists()
    time.sleep(1.1)  # W&B names a segment's folder by its start second: the resume must start in a later one
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"wandb sync '{elsewhere}/wandb'/offline-run-*-{header['id']}" in result.output
    first, second = (read_wandb_log(s) for s in sorted((elsewhere / "wandb").glob(f"offline-run-*-{header['id']}")))
    assert {row["trainer/step"] for row in first.history} == {2, 4}
    assert {row["trainer/step"] for row in second.history} == {6}  # rows 2 and 4 were held: not logged again


def test_a_resume_whose_wandb_cannot_start_leaves_the_run_resumable(tmp_path, monkeypatch):
    """W&B starts before the record is touched: a failed start leaves the interrupted run as it was (state,
    header), and the next attempt resumes it from its checkpoint instead of starting a new run at step 0."""
    import wandb

    args, run_dir = interrupted(tmp_path, monkeypatch, steps=4, at=2)
    header = (run_dir / "spec.json").read_text()

    def unreachable(**kwargs):
        raise wandb.errors.CommError("Failed to get resume status: dial tcp: no such host")

    with monkeypatch.context() as patch:
        patch.setattr(wandb, "init", unreachable)
        patch.setenv("WANDB_MODE", "online")
        patch.setenv("WANDB_API_KEY", "x" * 40)
        result = invoke(*args)
    assert result.exit_code == 1 and "W&B could not start the run (online)" in result.output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert (run_dir / "spec.json").read_text() == header
    result = invoke(*args)
    assert result.exit_code == 0 and "resuming the interrupted run from step 2" in result.output, result.output
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    assert [r["step"] for r in json.loads((run_dir / "spec.json").read_text())["resumes"]] == [2]


def test_a_resume_continues_the_wandb_project_of_its_first_attempt(tmp_path, monkeypatch):
    """The W&B run to continue lives in the project its first attempt used, whatever the environment says now."""
    with monkeypatch.context() as patch:
        patch.setenv("WANDB_PROJECT", "proj-a")
        args, run_dir = interrupted(tmp_path, monkeypatch, steps=4, at=2)
    assert json.loads((run_dir / "spec.json").read_text())["wandb"]["project"]["value"] == "proj-a"
    for _ in range(2):  # the source says so once, however many resumes
        monkeypatch.setenv("WANDB_PROJECT", "proj-b")
        result = invoke(*args, "--train.steps=4")
        project = json.loads((run_dir / "spec.json").read_text())["wandb"]["project"]
        assert project == {"value": "proj-a", "source": "WANDB_PROJECT (first attempt)"}, result.output
        (run_dir / "status.json").write_text(
            json.dumps({**json.loads((run_dir / "status.json").read_text()), "state": "interrupted"})
        )
    segments = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {read_wandb_log(s.parent).project for s in segments} == {"proj-a"}


def test_a_run_started_again_with_other_bookkeeping_resumes_and_so_does_one_recorded_under_the_older_hash(
    tmp_path, monkeypatch
):
    """Progress bar, threads, checkpoint interval, kept checkpoints, price and runs root never change the math: a
    crashed run restarted with `--train.progress=false --train.threads=1` (under nohup, say) is the same run.
    Records written before the hash left those out hold the hash of every field: still the same run."""
    args, run_dir = interrupted(tmp_path, monkeypatch, steps=6, at=2)
    result = invoke(*args, "--train.progress=false", "--train.threads=1", "--train.keep_checkpoints=5")
    assert result.exit_code == 0 and "resuming the interrupted run from step 2" in result.output, result.output
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]

    args, run_dir = interrupted(tmp_path / "legacy", monkeypatch, steps=6, at=2)
    header = json.loads((run_dir / "spec.json").read_text())
    spec = load_spec(QUICKSTART, args)
    old_dir = run_dir.with_name(f"{spec.run_name}-{spec.legacy_spec_hash()[:8]}")  # as such a run was named
    run_dir.rename(old_dir)
    (old_dir / "spec.json").write_text(json.dumps({**header, "spec_hash": spec.legacy_spec_hash()}))
    result = invoke(*args)
    assert result.exit_code == 0 and "resuming the interrupted run from step 2" in result.output, result.output
    assert [p.name for p in old_dir.parent.iterdir()] == [old_dir.name]
    assert json.loads((old_dir / "status.json").read_text())["state"] == "finished"


def test_a_resumed_runs_wandb_best_so_far_covers_the_earlier_attempt(tmp_path, monkeypatch):
    """When a resumed run finishes, the runner sets W&B's val/loss min from the whole record: here the best
    evaluation is the first attempt's, which W&B's own min (over the last attempt's rows) would miss."""
    from blueberry.train import trainer

    real, losses = trainer.evaluate, []

    def evaluate(*args, **kwargs):  # the first evaluation is the best, later ones worse
        losses.append(1.0 if not losses else 2.0 + len(losses) / 10)
        return {**real(*args, **kwargs), "val/loss": losses[-1], "val/perplexity": math.exp(losses[-1])}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    args = [*TINY, "--train.steps=6", "--train.log_every=2", "--train.eval_every=2", "--experiment=ft"]
    args += [f"--tracking.runs_root={tmp_path / 'runs'}"]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step=2)
        assert invoke(*args).exit_code == 130
    assert losses == [1.0]  # the first attempt evaluated at step 2 and stopped
    time.sleep(1.1)  # W&B names a segment's folder by its start second
    assert invoke(*args).exit_code == 0
    (run_dir,) = (tmp_path / "runs" / "ft").iterdir()
    assert [r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r] == [1.0, 2.1, 2.2]
    last = read_wandb_log(sorted((run_dir / "wandb").glob("offline-run-*"))[-1])
    assert last.summary["val/loss"] == {"min": 1.0, "last": 2.2}


@pytest.mark.parametrize("section", [["proj"], "proj", {"project": "p", "id": 5}, {"project": ["p"]}])
def test_an_earlier_attempts_wandb_section_of_another_shape_is_read_as_absent(tmp_path, section):
    from blueberry.runner import stored_wandb_place, wandb_identity
    from blueberry.tracking.record import RunDir

    (tmp_path / "spec.json").write_text(json.dumps({"wandb": section}))
    assert stored_wandb_place(tmp_path) == {}
    claimed = RunDir(tmp_path, None, reused=True)
    assert wandb_identity(claimed, None, "offline", "n") == (tmp_path.name, "allow")  # the directory's name


def test_a_failed_run_with_a_checkpoint_is_not_resumed_by_default_and_the_run_says_so(tmp_path):
    """A torchrun run whose other rank was killed records `failed` on rank 0; the same command then starts a new
    run at step 0: it says which run it did not continue and how to (`--resume`)."""
    run_dir, later = tmp_path / "exp" / "run-1", tmp_path / "exp" / "run-1-2"
    for attempt in (run_dir, later):
        (attempt / "checkpoints").mkdir(parents=True)
        (attempt / "checkpoints" / "step-000010.pt").write_bytes(b"")
    said = []
    accept = _resumable(None, said.append)
    assert accept(run_dir, "failed") is False and accept(later, "failed") is False
    # only the first, which `--resume` would take, is named
    assert said == [f"not resuming {run_dir}: it failed; `--resume` continues it from its last checkpoint"]
    assert _resumable(True, said.append)(run_dir, "failed") is True  # --resume takes it


def test_a_resumed_run_keeps_its_first_attempts_measured_peak(tmp_path, monkeypatch):
    """Without a cached `bench --ceiling` each attempt measures a quick GEMM ceiling (2x apart at a resume on a
    shared CPU): one run's MFU rows changed scale at the resume, and its record kept only the latest peak."""
    import blueberry.perf as perf

    monkeypatch.setattr(perf, "read_ceilings", lambda: {})
    monkeypatch.setattr(perf, "measure_gemm_ceiling", lambda *args, **kwargs: 1e9)
    args, run_dir = interrupted(tmp_path, monkeypatch, steps=6, at=4)
    monkeypatch.setattr(perf, "measure_gemm_ceiling", lambda *args, **kwargs: 2e9)  # the resume measures another
    assert invoke(*args).exit_code == 0
    hardware = json.loads((run_dir / "spec.json").read_text())["hardware"]
    assert hardware["peak_flops"] == 1e9 and hardware["peak_source"].endswith("(of the run's first attempt)")
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("perf/mfu")]
    assert len(rows) == 3 and {round(row["perf/tflops"] * 1e12 / row["perf/mfu"], -3) for row in rows} == {1e9}


def test_a_resume_on_changed_data_is_refused_naming_both_fingerprints(tmp_path, monkeypatch):
    """The spec hash covers a dataset's path, not its content: a file rewritten between attempts would continue a
    checkpoint trained on the old data (the BPE, retrained on the new split, gives its token ids other meanings)."""
    with gzip.open(REPO / "blueberry/data/austen.jsonl.gz", "rt", encoding="utf-8") as handle:
        chapters = handle.readlines()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(chapters[:30]))
    args, run_dir = interrupted(tmp_path, monkeypatch, 4, 2, f"--data.dataset={corpus}")
    before = json.loads((run_dir / "spec.json").read_text())["data"]["fingerprint"]
    corpus.write_text("".join(chapters[30:60]))
    record = lambda: {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".log"}  # noqa: E731
    kept = record()
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"data fingerprint {before[:12]}" in result.output and "--no-resume" in result.output
    assert record() == kept  # left as it was, resumable on the data it trained on
    corpus.write_text("".join(chapters[:30]))  # the data restored: the run continues
    result = invoke(*args)
    assert result.exit_code == 0 and "resuming the interrupted run from step 2" in result.output, result.output


@pytest.mark.parametrize("free", [(2**40, 1), (1, 2**40)], ids=["less-memory-now", "more-memory-now"])
def test_a_resumed_auto_batch_keeps_its_first_attempts_split(tmp_path, monkeypatch, free):
    """batch_size auto chooses from the memory free at the start: a resume choosing 1 x 8 where its first attempt
    chose 8 x 1 drew other windows (the sampler draws per micro-step), so it ended unlike an uninterrupted run."""
    import blueberry.plan as plan

    auto = ["--train.batch_size=auto", "--train.effective_batch=8", "--train.log_every=2", "--train.eval_every=3"]
    monkeypatch.setattr(plan, "memory_available_bytes", lambda: free[0])
    clean = [*TINY, *auto, "--train.steps=6", "--experiment=ft", f"--tracking.runs_root={tmp_path / 'clean'}"]
    clean = execute(load_spec(QUICKSTART, clean), log=print)
    first = json.loads((clean.run_dir / "spec.json").read_text())["hardware"]["batch"]
    args, run_dir = interrupted(tmp_path, monkeypatch, 6, 2, *auto)
    monkeypatch.setattr(plan, "memory_available_bytes", lambda: free[1])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    batch = json.loads((run_dir / "spec.json").read_text())["hardware"]["batch"]
    assert (batch["micro_batch"], batch["grad_accum"]) == (first["micro_batch"], first["grad_accum"]), result.output
    assert comparable(run_dir) == comparable(clean.run_dir)
    assert ("the memory free now fits only 1 x 8" in result.output) == (free[1] < free[0])


def test_the_best_checkpoint_alias_after_a_resume_is_that_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """W&B's `best` alias goes to the checkpoint with the lowest val loss among checkpointed evaluations. A resume
    went on from the best of every evaluation (step 2's 1.0, never checkpointed), so no later checkpoint beat it
    and `best` stayed on step 4 (3.0) where an uninterrupted run moves it to step 8 (2.0)."""
    from blueberry.train import trainer

    real, losses = trainer.evaluate, [1.0, 3.0, 2.5, 2.0, 2.8, 2.9]  # at steps 2, 4, ..., 12

    def evaluate(*args, **kwargs):
        loss = losses.pop(0)
        return {**real(*args, **kwargs), "val/loss": loss, "val/perplexity": math.exp(loss)}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    args = [*TINY, "--train.steps=12", "--train.log_every=1", "--train.eval_every=2", "--train.checkpoint_every=4"]
    args += ["--tracking.wandb_checkpoints=true", "--experiment=ft", f"--tracking.runs_root={tmp_path / 'runs'}"]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step=5)
        assert invoke(*args).exit_code == 130
    time.sleep(1.1)  # W&B names a segment's folder by its start second
    assert invoke(*args).exit_code == 0 and losses == []
    (run_dir,) = (tmp_path / "runs" / "ft").iterdir()
    logs = [read_wandb_log(s) for s in sorted((run_dir / "wandb").glob("offline-run-*"))]
    versions = [a for log in logs for a in log.artifacts if a["name"].startswith("checkpoint-")]
    assert [(a["metadata"]["step"], "best" in a["aliases"]) for a in versions] == [
        (4, True),
        (5, False),
        (8, True),  # 2.0 < 3.0, the best checkpointed loss so far
        (12, False),
    ]


def test_a_resume_whose_compile_decision_follows_this_attempts_split_says_so(tmp_path):
    """compile auto is decided from the split this attempt's memory gives (the model is built before the record is
    read): a CUDA resume keeping its first attempt's 32 x 2 (2,000 micro-steps: eager) after choosing 8 x 8 (8,000:
    compiled) trains compiled, and says so."""
    from dataclasses import replace

    from blueberry import plan
    from blueberry.hardware import BatchChoice
    from blueberry.runner import earlier_batch

    spec = load_spec(None, [*TINY, "--train.steps=1000", "--train.batch_size=auto", "--train.effective_batch=64"])
    built = plan.build(spec, torch.device("cpu"), 512, check_causal=False, peak=False)
    on_cuda = replace(built.plan, batch=BatchChoice(8, 8, 64, "auto"), compile=True)
    built = replace(built, device=torch.device("cuda"), plan=on_cuda)
    batch = {"micro_batch": 32, "grad_accum": 2, "effective_batch": 64, "how": "auto"}
    (tmp_path / "spec.json").write_text(json.dumps({"hardware": {"batch": batch}}))
    said = []
    kept = earlier_batch(built, tmp_path, said.append)
    assert (kept.plan.batch.micro_batch, kept.plan.batch.grad_accum) == (32, 2)
    assert said[-1] == (  # (after the line saying the memory free now fits only 8 x 8)
        "train.compile auto: this attempt compiles, decided from the 8 x 8 split the memory free now gives, unlike "
        "its first attempt: set train.compile for a resume that runs as the first attempt did"
    )
    eager = replace(built, plan=replace(on_cuda, batch=BatchChoice(16, 4, 64, "auto"), compile=False))
    said.clear()  # chosen 16 x 4 (4,000 micro-steps), yet told eager, as 32 x 2 is: nothing to say of compiling
    assert earlier_batch(eager, tmp_path, said.append).plan.batch.micro_batch == 32
    assert not [line for line in said if "train.compile" in line]
