"""torchrun + DDP on CPU (gloo, 2 processes): one spec, rank 0 records, results equal one process's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
import torch.distributed as dist

from blueberry import distributed
from blueberry.overrides import load_spec
from blueberry.runner import execute
from blueberry.tracking import read_metrics

# A tiny MoE with no dropout, router noise or balance loss: the sum over ranks then equals one process's
# global batch exactly, up to floating-point reduction order.
DDP_TINY = [
    "--model.variant=moe",
    "--model.d_model=32",
    "--model.n_layers=1",
    "--model.n_heads=2",
    "--model.n_experts=4",
    "--model.expert_d_ff=64",
    "--model.dropout=0",
    "--model.balance_loss_weight=0",
    "--data.vocab_size=512",
    "--data.seq_len=32",
    "--data.max_tokens=20000",
    "--train.steps=12",
    "--train.grad_accum=2",
    "--train.log_every=4",
    "--train.eval_every=12",
    "--train.precision=fp32",
    "--train.threads=1",
    "--train.progress=False",
    "--seed=7",
]


def test_single_process_helpers_are_no_ops():
    assert not dist.is_initialized()
    assert distributed.env_world().size == 1 and distributed.current().is_main
    assert distributed.mean_metrics({"a": 1.0}) == {"a": 1.0}
    assert distributed.torchrun_job() is None and distributed.restart_hazard() is None


def test_a_torchrun_job_and_its_restart_hazard_come_from_the_environment_torchrun_sets(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert distributed.torchrun_job() == {"id": "job-7", "restart": 2}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in distributed.restart_hazard()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # each start has a store of its own
    assert distributed.restart_hazard() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts
    assert distributed.restart_hazard() is None


def test_minus_one_for_every_torchrun_variable_is_one_process_that_records_its_run(tmp_path, monkeypatch):
    """-1, which some launchers set for "not distributed" (and the preflight accepts), made a rank that followed a
    rank 0 that does not exist: it trained, recorded nothing and exited 0."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "-1")
    tiny = [*DDP_TINY, "--train.batch_size=2", "--train.steps=2", "--train.log_every=2", "--train.eval_every=2"]
    result = execute(load_spec(None, [*tiny, f"--tracking.runs_root={tmp_path}"]))
    assert result.run_dir is not None  # rank 0's record, where a follower's is None
    assert json.loads((result.run_dir / "status.json").read_text())["state"] == "finished"
    assert json.loads((result.run_dir / "spec.json").read_text())["hardware"]["world_size"] == 1
    assert distributed.env_world() == distributed.World() and distributed.env_world().is_main


def two_ranks(tmp_path, code: str, *values: str) -> list[str]:
    """Run `code` as ranks 0 and 1 of a gloo group (argv: rendezvous, rank, the rank's value); their stdouts."""
    join = "import sys, torch.distributed as dist\n"
    join += "dist.init_process_group('gloo', init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)\n"
    # leave the group before exiting as the runner does: a gloo process that exits inside its group, or just
    # after a collective, can abort at interpreter teardown (`distributed.shutdown`)
    leave = "\nfrom blueberry import distributed\ndistributed.shutdown()\n"
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", join + code + leave, rendezvous, str(rank), value],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, value in enumerate(values)
    ]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    return [out.strip() for out, _ in outputs]


def test_two_ranks_agree_on_the_smaller_value(tmp_path):
    code = "from blueberry import distributed; print(distributed.smallest_across_ranks(int(sys.argv[3])))"
    assert two_ranks(tmp_path, code, "8", "2") == ["2", "2"]


def test_a_signal_one_rank_received_stops_every_rank_after_the_same_step(tmp_path):
    """Rank 1's signal arrives during step 1, after its vote was sent: neither rank stops after step 1, both after
    step 2. A rank that stopped alone would leave the other waiting in the next step's collectives."""
    code = """
from blueberry import distributed
received = [None]
vote = distributed.StopVote(lambda: received[0])
answers = []
for step in (1, 2, 3):
    vote.send()
    if step == 1 and sys.argv[3] == "15":
        received[0] = 15  # SIGTERM, on this rank only, while the step runs
    answers.append(vote.result())
    if answers[-1]:
        break
print(answers)
"""
    assert two_ranks(tmp_path, code, "0", "15") == ["[None, 15]"] * 2


def test_a_rank_whose_rank_0_is_gone_before_training_stops_quietly_and_as_its_signal_says(tmp_path):
    """Rank 0 gone while rank 1 waits for its resume point (runner.execute): a SIGTERM to torchrun, which hands it
    to every rank, kills a rank 0 still setting up, and rank 1's broadcast failed in gloo with a traceback. Now
    rank 1 ends quietly: exit 1 (rank 0 failed, and says why), or 128 + the signal it received too."""
    code = """
import os, signal
from blueberry import distributed
from blueberry.runner import resume_point_from_main
from blueberry.train.trainer import StopRequest
if sys.argv[2] == "0":
    os._exit(0)  # gone without a word, as a SIGTERM's default action ends it
stop = StopRequest().install()
exit_codes = []
for signum in (None, signal.SIGTERM):
    if signum:
        os.kill(os.getpid(), signum)  # torchrun's, handed to this rank too
    try:
        resume_point_from_main(stop)
    except distributed.MainRankFailed as exc:
        exit_codes.append(exc.exit_code)
print(exit_codes)
"""
    assert two_ranks(tmp_path, code, "", "") == ["", "[1, 143]"]


def test_ddp_trains_idle_experts_and_a_nan_on_one_rank_stops_both(tmp_path):
    """Two DDP ranks (one pair of processes for all checks: each pays torch's and transformers' imports).

    1. The baseline MoE's experts are separate modules: an expert no token chose has no gradient that step, and
       DDP must not wait for it (it failed at the second step: "Expected to have finished reduction").
    2. Each rank's loss is its own: rank 1 saw a NaN at step 5, rank 0 none. At the log step both raise, naming
       step 5; rank 0 alone would otherwise go on into the next collective and wait for a rank that stopped.
    3. So at a checkpoint that is no log step: rank 1 stopped there alone, and rank 0, gathering every rank's state
       for the checkpoint, recorded gloo's "Connection closed by peer" instead of the divergence.
    """
    code = """
import torch
from blueberry import distributed
from blueberry.bench.measure import ListTracker, SyntheticData
from blueberry.bench.suite import QUICKSTART, TINY
from blueberry.models import build_model
from blueberry.overrides import load_spec
from blueberry.train.trainer import Trainer, TrainingDiverged
torch.set_num_threads(1)
baseline = ["--model.variant=baseline", "--model.router_noise_std=0", "--train.progress=False"]
spec = load_spec(QUICKSTART, [*TINY, *baseline])
torch.manual_seed(0)
model = build_model(spec.model, 64)
with torch.no_grad():
    for block in model.blocks:
        block.ffn.router.weight.zero_()  # every token picks the same 2 of the 4 experts
ddp = distributed.wrap(model, torch.device("cpu"))
for step in range(3):
    ids = torch.randint(64, (2, 9))
    ddp(ids[:, :-1], ids[:, 1:]).loss.backward()
print(sum(p.grad is None for p in model.blocks[0].ffn.experts.parameters()), "expert weights without a gradient")
data = SyntheticData(spec.data.vocab_size, spec.data.seq_len)
trainer = Trainer(spec, build_model(spec.model, data.vocab_size), data, ListTracker(), torch.device("cpu"), "fp32")
trainer.bad_step.fill_(int(sys.argv[3]))  # this rank's first step with a NaN loss, 0 for none
trainer.metrics.begin(trainer.device, trainer.tokens_per_step, 0.0, 0.0, None)  # as the loop does
for check in (lambda: trainer.check_finite(every_rank=True), lambda: trainer.checkpoint(6)):
    try:
        check()
        print("went on")
    except TrainingDiverged as exc:
        print(exc)
"""
    said = two_ranks(tmp_path, code, "0", "5")
    idle = "4 expert weights without a gradient"  # 2 idle experts × 2 matrices
    diverged = "train loss or gradient norm became NaN/inf at step 5"
    assert said == [f"{idle}\n{diverged}\n{diverged}"] * 2  # at the log step, then at the checkpoint


def test_torchrun_two_ranks_match_one_process(tmp_path, monkeypatch):
    """2 ranks × 4 windows ≡ 1 process × 8 windows: the sampler hands each rank its slice of one global draw."""
    monkeypatch.setenv("BLUEBERRY_PRICE_PER_HOUR", "0.5")
    single = execute(load_spec(None, [*DDP_TINY, "--train.batch_size=8", f"--tracking.runs_root={tmp_path / 'one'}"]))
    # the one-process run also carries the hardware plan's products: MFU on every log row, cost in the summary
    assert single.summary["perf/mfu"] > 0 and single.summary["cost/usd_per_hour"] == 0.5
    assert single.summary["cost/usd"] == pytest.approx(0.5 * single.summary["cost/device_hours"])
    assert all("perf/mfu" in r for r in read_metrics(single.run_dir / "metrics.jsonl") if "perf/tokens_per_s" in r)

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text("{}")
    argv = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "blueberry", "run", str(spec_file)]
    argv += [*DDP_TINY, "--train.batch_size=4", f"--tracking.runs_root={tmp_path / 'two'}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]

    records = list((tmp_path / "two").glob("*/*/summary.json"))
    assert len(records) == 1  # rank 0 alone writes the record (and the W&B run)
    run_dir = records[0].parent
    header = json.loads((run_dir / "spec.json").read_text())
    assert header["hardware"]["world_size"] == 2 and header["hardware"]["batch"]["effective_batch"] == 16
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    summary = json.loads(records[0].read_text())
    assert summary["cost/usd"] == pytest.approx(0.5 * summary["cost/device_hours"])  # device-hours of both ranks
    both_peaks = 2 * header["hardware"]["peak_flops"]  # the tokens/s are both ranks', so is the peak
    assert summary["perf/mfu"] == pytest.approx(summary["perf/tflops"] * 1e12 / both_peaks)
    assert summary["trainer/tokens"] == single.summary["trainer/tokens"]  # global tokens, both ranks
    assert summary["val/loss"] == pytest.approx(single.summary["val/loss"], abs=2e-4)
    two_rows = [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    one_rows = [r["train/loss"] for r in read_metrics(single.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert two_rows == pytest.approx(one_rows, abs=2e-4)  # the logged loss is the mean over both ranks
    row = [r for r in read_metrics(run_dir / "metrics.jsonl") if "moe/layer0/load_max" in r][-1]
    loads = [row[f"moe/layer0/load_e{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and row["moe/layer0/load_max"] == max(loads)  # max of the means


def rank_pid(marker: str, rank: int) -> int | None:
    """The process of torchrun rank `rank` whose command line holds `marker`, from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker.encode() in cmdline and b"TORCHELASTIC_RUN_ID" in b"\0".join(environ):
            if f"RANK={rank}".encode() in environ:
                return int(proc.name)
    return None


def test_a_torchrun_run_stopped_by_sigterm_then_by_a_dead_rank_ends_bit_exact_as_an_uninterrupted_one(tmp_path):
    """Dropout on, so each rank draws its own masks, and checkpoints between log steps, so each rank holds its own
    loss sums: a checkpoint keeps every rank's. One run, interrupted twice:

    1. SIGTERM to torchrun, which hands it to each rank: they finish their step and the next (the vote travels
       during it), rank 0 saves a checkpoint, the record says `interrupted`. The same command continues it.
    2. Rank 1 killed after the checkpoint of step 20: rank 0's next collective fails (the record says `failed`),
       torchrun --max-restarts starts both ranks again, and the job's new start continues that record (without
       it, a new run at step 0).
    """
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text("{}")
    tiny = [*DDP_TINY, "--model.dropout=0.1", "--train.batch_size=4", "--train.log_every=3", "--train.steps=60"]
    tiny += ["--train.checkpoint_every=10"]
    argv = [torchrun, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m", "blueberry", "run"]
    argv += [str(spec_file), *tiny]
    # torchrun's ranks otherwise share its rendezvous store across restarts and may read the previous start's
    # addresses (pytorch/pytorch#135712): README, "More than one GPU"
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    reference_root, root = tmp_path / "uninterrupted", tmp_path / "interrupted"

    def start(root: Path) -> subprocess.Popen:
        return subprocess.Popen([*argv, f"--tracking.runs_root={root}"], stdout=PIPE, stderr=PIPE, text=True, env=env)

    def wait_until(job: subprocess.Popen, ready) -> None:
        deadline = time.monotonic() + 180
        while not ready():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.05)

    reference = start(reference_root)
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]

    job = start(root)
    wait_until(job, lambda: any(read_metrics(f) for f in root.glob("*/*/metrics.jsonl")))  # training has begun
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    (run_dir,) = [path.parent for path in root.glob("*/*/status.json")]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted", err[-3000:]
    stopped_at = int(status["reason"].split(" at step ")[1].split(",")[0])
    assert 3 <= stopped_at < 20 and status["reason"].startswith(f"SIGTERM at step {stopped_at}, checkpoint ")
    assert (run_dir / "checkpoints" / f"step-{stopped_at:06d}.pt").exists()
    assert err.count("error: interrupted: SIGTERM at step") == 1  # rank 0 says it; rank 1 stopped at that step too

    job = start(root)  # the same command continues the run
    wait_until(job, lambda: (run_dir / "checkpoints" / "step-000020.pt").exists())
    os.kill(rank_pid(str(root), rank=1), signal.SIGKILL)
    out, err = job.communicate(timeout=240)
    assert job.returncode == 0, err[-3000:]
    assert [path.parent for path in root.glob("*/*/spec.json")] == [run_dir]  # one record throughout
    said = out + err
    assert f"resuming the interrupted run from step {stopped_at}" in said
    assert "resuming the failed run from step" in said and "max-restarts" not in said  # no warning needed
    header = json.loads((run_dir / "spec.json").read_text())
    assert header["torchrun"]["restart"] == 1 and [r["step"] for r in header["resumes"]][0] == stopped_at
    assert header["resumes"][1]["step"] >= 20

    (reference_dir,) = [path.parent for path in reference_root.glob("*/*/spec.json")]
    metrics = [read_metrics(d / "metrics.jsonl") for d in (reference_dir, run_dir)]
    keys = ("step", "train/loss", "train/grad_norm", "val/loss")
    assert [{k: r.get(k) for k in keys} for r in metrics[1]] == [{k: r.get(k) for k in keys} for r in metrics[0]]
    digests = [json.loads((d / "summary.json").read_text())["weights/sha256"] for d in (reference_dir, run_dir)]
    assert digests[0] == digests[1]


def test_under_torchrun_an_error_is_said_once_by_rank_0_and_the_others_stop_quietly(tmp_path):
    """Bad input every rank finds is printed by rank 0 alone (not once per rank): the spec, a batch 'auto' that
    does not split over the ranks; so is a runs root that cannot be written, which rank 0 alone checks (it alone
    writes there). An error only rank 0 meets before training (--resume with nothing to resume) ends the other
    ranks, which wait for its resume point, without the process group's traceback of each."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text("{}")
    tiny = [arg for arg in DDP_TINY if not arg.startswith("--train.grad_accum=")]  # 'auto' derives it
    argv = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "blueberry", "run", str(spec_file), *tiny]
    runs, batch = f"--tracking.runs_root={tmp_path / 'runs'}", "--train.batch_size=4"
    for extra, said in (
        ([batch, runs, "--train.lrr=3"], "train.lrr: unknown field"),
        ([batch, runs, "--resume"], "error: cannot resume"),
        (["--train.batch_size=auto", "--train.effective_batch=33", runs], "(33) is not divisible by the 2 ranks"),
        ([batch, "--tracking.runs_root=/proc/blueberry"], "error: tracking.runs_root '/proc/blueberry'"),
    ):
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=240, env=os.environ)
        assert done.returncode != 0 and said in done.stderr, done.stderr[-3000:]
        ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1 and "[rank1]" not in done.stderr, done.stderr[-3000:]  # (torchrun's own summary stays)


def test_sweep_and_study_refuse_to_run_under_torchrun_said_once(tmp_path):
    """Each rank ran its own sweep, and the trials, inheriting torchrun's variables, joined one another's process
    group: one trial trained as DDP with another's spec, the other failed."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    argv = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "blueberry"]
    checkout = Path(__file__).resolve().parent.parent
    for command in (["sweep", "--dry-run", "sweeps/cpu/ablation.yaml"], ["study", "--dry-run"]):
        argv_of_command = [*argv, *command, "--runs-root", str(tmp_path / "runs")]
        done = subprocess.run(argv_of_command, capture_output=True, text=True, timeout=120, cwd=checkout)
        ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1, done.stderr[-3000:]  # rank 0's; rank 1 exits 2 quietly
        assert ours[0].startswith(f"error: blueberry {command[0]} starts its trials itself: run it without torchrun")
        assert "--parallel N runs N trials at once" in ours[0] and "exitcode  : 2" in done.stderr
        assert not (tmp_path / "runs").exists()


def test_a_rank_that_runs_out_of_memory_receiving_the_resume_point_says_so_itself(monkeypatch):
    """A peer gone is rank 0's to explain (MainRankFailed, quiet); this rank's own failure is not: torch's
    OutOfMemoryError is a RuntimeError too, and was hidden as rank 0's."""
    from blueberry.runner import resume_point_from_main
    from blueberry.train.trainer import StopRequest

    def gone(obj):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer")

    def out_of_memory(obj):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.10 GiB")

    monkeypatch.setattr(distributed, "broadcast_from_main", gone)
    with pytest.raises(distributed.MainRankFailed):
        resume_point_from_main(StopRequest())
    monkeypatch.setattr(distributed, "broadcast_from_main", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        resume_point_from_main(StopRequest())
