"""The command line: exit codes, error messages, nothing written for bad input, the `make run` path."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from blueberry import cli
from blueberry.cli import OWN_PROCESS, _loading_libraries, main

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_schema_is_json_schema():
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False and "model" in schema["properties"]


def test_validate_ok():
    result = invoke("validate", str(REPO / "experiments/quickstart.json"), "--train.lr=0.003")
    assert result.exit_code == 0, result.output
    assert "quickstart-attention_moe-lr0.003-s42" in result.output


def test_validate_checks_the_data_inputs_as_a_run_does(tmp_path):
    spec = str(REPO / "experiments/quickstart.json")
    result = invoke("validate", spec, f"--data.dataset={tmp_path / 'gone.jsonl'}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output == f"error: {spec}: data.dataset: dataset file '{tmp_path / 'gone.jsonl'}' does not exist\n"
    result = invoke("validate", spec, f"--data.tokenizer={tmp_path}")
    assert result.exit_code == 2 and f"{spec}: data.tokenizer: " in result.output


def test_every_experiment_spec_validates():
    for path in sorted((REPO / "experiments").glob("*.json")):
        assert invoke("validate", str(path)).exit_code == 0, path


def test_bad_spec_exits_2_naming_file_and_field_and_writes_nothing(tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(
        json.dumps({"model": {"variant": "moe", "top_k": 9}, "tracking": {"runs_root": str(tmp_path / "r")}})
    )
    result = invoke("run", str(spec))
    assert result.exit_code == 2
    assert str(spec) in result.output and "model" in result.output and "top_k (9) cannot exceed" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_bad_override_exits_2_naming_override(tmp_path):
    result = invoke(
        "run", str(REPO / "experiments/quickstart.json"), "--train.lr=fast", f"--tracking.runs_root={tmp_path / 'r'}"
    )
    assert result.exit_code == 2
    assert "override --train.lr=fast: train.lr: Input should be a valid number" in result.output
    assert not (tmp_path / "r").exists()


def test_a_sweep_file_given_to_run_points_to_blueberry_sweep(tmp_path):
    result = invoke("run", "sweeps/cpu/ablation.yaml", f"--tracking.runs_root={tmp_path / 'r'}")
    assert result.exit_code == 2
    assert "sweeps/cpu/ablation.yaml is a W&B sweep file" in result.output
    assert "blueberry sweep sweeps/cpu/ablation.yaml" in result.output
    assert not (tmp_path / "r").exists()


def test_a_spec_written_as_yaml_is_told_specs_are_json_not_that_it_is_a_sweep(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  variant: mlp\ntrain:\n  steps: 10\n")
    result = invoke("run", str(spec), f"--tracking.runs_root={tmp_path / 'r'}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{spec}: a run spec is a JSON file, as experiments/*.json" in result.output
    assert "blueberry sweep" not in result.output
    broken = tmp_path / "broken.yaml"  # YAML files here are sweep files: `blueberry sweep` says where it breaks
    broken.write_text("method: grid\ncommand: [blueberry, run, x.json, ${args}]\n")
    assert f"run it with `blueberry sweep {broken}`" in invoke("run", str(broken)).output
    missing = invoke("run", str(tmp_path / "gone.yml"))
    assert missing.exit_code == 2 and "gone.yml: spec file not found" in missing.output
    assert not (tmp_path / "r").exists()


def test_doctor_shows_the_wandb_mode_and_why_and_the_sweep_engine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # W&B reads wandb/settings in the working directory (there with WANDB_DIR set too)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = disabled\n")  # as `wandb disabled` writes it
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)["wandb"]
    assert found["wandb"] == "0.31.0" and found["sweep_engine"] == "0.3.0"
    assert found["run"]["mode"] == {"value": "disabled", "source": f"set by settings file {tmp_path}/wandb/settings"}
    text = invoke("doctor", "--train.device=cpu").output
    assert "wandb 0.31.0; sweep engine sweeps 0.3.0" in text and "mode       disabled (set by settings file" in text


def test_doctor_installed_without_a_checkout_says_where_the_make_targets_are(tmp_path, monkeypatch):
    import blueberry.provenance as provenance

    assert "\nmake run on this machine (cpu): sweeps/cpu/ablation.yaml" in invoke("doctor").output
    monkeypatch.setattr(provenance, "SOURCE_TREE", tmp_path / "site-packages")  # `pip install .`: no sweeps/
    said = "\nin a Blueberry checkout (this install has no sweeps/), make run on this machine (cpu): "
    assert said in invoke("doctor").output


def test_unreachable_dataset_exits_2_fast(tmp_path):
    result = invoke(
        "run",
        str(REPO / "experiments/quickstart.json"),
        "--data.dataset=someone/not-here",
        f"--tracking.runs_root={tmp_path / 'r'}",
    )
    assert result.exit_code == 2 and "someone/not-here" in result.output
    assert not (tmp_path / "r").exists()


def test_wandb_unreachable_online_is_one_clear_line_and_nothing_recorded(tmp_path, monkeypatch):
    """After W&B's own retries, `wandb.init` raises (here as it did with no network): exit 1, no traceback,
    what W&B said and what to do. W&B starts before the record is written, so the run directory holds nothing
    and the same command offline runs there."""
    import wandb
    from test_runner import TINY

    said = "Failed to get resume status for run x: context deadline exceeded\nwhile retrying: dial tcp: no such host"

    def unreachable(**kwargs):
        raise wandb.errors.CommError(said)

    runs = tmp_path / "r"
    with monkeypatch.context() as patch:
        patch.setattr(wandb, "init", unreachable)
        patch.setenv("WANDB_MODE", "online")
        patch.setenv("WANDB_API_KEY", "x" * 40)
        result = invoke(
            "run", str(REPO / "experiments/quickstart.json"), *TINY, "--train.steps=2", f"--tracking.runs_root={runs}"
        )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: run failed: W&B could not start the run (online): Failed to get resume status")
    assert "no such host" in last and "WANDB_MODE=offline" in last and "wandb sync" in last
    (run_dir,) = runs.glob("*/*")
    assert list(run_dir.iterdir()) == []
    result = invoke(
        "run", str(REPO / "experiments/quickstart.json"), *TINY, "--train.steps=2", f"--tracking.runs_root={runs}"
    )
    assert result.exit_code == 0 and list(runs.glob("*/*")) == [run_dir], result.output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_a_missing_dataset_or_unusable_runs_root_fails_before_torch_loads(tmp_path):
    """Checked before the libraries load: exit 2 in a second, not after torch and transformers' ~7 s."""
    probe = (
        "import atexit, sys; from blueberry.cli import console_main; "
        "atexit.register(lambda: print('torch loaded', 'torch' in sys.modules)); "
        "sys.argv = ['blueberry', *sys.argv[1:]]; console_main()"
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for override, said in [
        (f"--data.dataset={tmp_path / 'no-such.jsonl'}", "data.dataset: dataset file"),
        (f"--data.dataset={a_file}", "data.dataset: unsupported file type 'a-file'"),
        (f"--data.tokenizer={tmp_path / 'no-tok'}", "data.tokenizer: tokenizer directory"),
        (f"--tracking.runs_root={a_file / 'runs'}", "is a file, not a directory"),
    ]:
        command = [sys.executable, "-c", probe, "run", str(REPO / "experiments/quickstart.json"), override]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "torch loaded False" in done.stdout


def test_make_run_path_writes_a_complete_record(tmp_path):
    """The quickstart spec as a user runs it, with the console script in a real process: a complete record.

    Shortened: 3 steps, one evaluation, on the first 60K tokens (a 7K-token validation set; the full one takes
    seconds a pass on one core). The sweep tests use the same data, so the token cache is shared.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    blueberry = Path(sys.executable).parent / "blueberry"
    done = subprocess.run(
        [
            str(blueberry),
            "run",
            "experiments/quickstart.json",
            "--train.steps=3",
            "--train.eval_every=3",
            "--data.max_tokens=60000",
            f"--tracking.runs_root={tmp_path / 'runs'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run record:" in done.stdout and "W&B offline run:" in done.stdout
    (run_dir,) = (tmp_path / "runs" / "quickstart").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert json.loads((run_dir / "summary.json").read_text())["trainer/step"] == 3
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_console_script_keeps_exit_codes_and_exit_handlers_and_freezes_the_collector():
    """`blueberry` is `console_main`: main's exit code and output, the exit handlers run, then a quick teardown."""
    probe = (
        "import atexit, gc, sys; from blueberry.cli import console_main; "
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
        "sys.argv = ['blueberry', *sys.argv[1:]]; console_main()"
    )
    version = subprocess.run([sys.executable, "-c", probe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "version" in version.stdout and "frozen True" in version.stdout
    bad = subprocess.run([sys.executable, "-c", probe, "run", "no-such-spec.json"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no-such-spec.json" in bad.stderr and "frozen True" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_libraries_load_without_collections_and_only_our_own_process_freezes_them():
    """`run`'s imports: the collector paused, then back on; frozen only in the console script's process."""
    before = gc.get_freeze_count()
    with click.Context(main):  # `main` in another program's process, as CliRunner calls it
        with _loading_libraries():
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() == before
    try:
        with click.Context(main, obj=OWN_PROCESS):
            with _loading_libraries():
                assert not gc.isenabled()
                loaded = [[] for _ in range(1000)]  # what a library keeps alive
            assert gc.isenabled() and gc.get_freeze_count() >= before + len(loaded)
    finally:
        gc.unfreeze()


def test_gpu_check_without_cuda_exits_2_with_one_line(tmp_path):
    """No CUDA GPU here: one line saying so, a non-zero exit, no traceback, nothing written."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out")}
    done = subprocess.run([sys.executable, "-m", "blueberry", "gpu-check"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no CUDA GPU found") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr and done.stdout == "" and not (tmp_path / "out").exists()


def test_an_out_that_cannot_be_written_fails_before_the_measuring(tmp_path, monkeypatch):
    """bench and gpu-check write their results at the end: an --out under a file is refused at the start."""
    (tmp_path / "a-file").write_text("")
    under_a_file = str(tmp_path / "a-file" / "out")
    for args in (["bench", "--out", under_a_file], ["gpu-check", "--out", under_a_file]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.output.startswith(f"error: --out '{under_a_file}' cannot be created: ")
        assert result.output.strip().endswith("is a file, not a directory")
    monkeypatch.setenv("OUT", under_a_file)
    assert invoke("gpu-check").output.startswith(f"error: $OUT '{under_a_file}' cannot be created: ")


def test_gpu_check_names_unknown_checks():
    result = invoke("gpu-check", "--only", "nope")
    assert result.exit_code == 2 and "unknown check nope; the checks are: doctor, throughput_eager" in result.output


def test_a_spec_this_machine_cannot_run_is_exit_2_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """train.device=cuda without a GPU is the input's problem: exit 2, named, nothing written. A ValueError from
    deep inside a run is a bug: it is not dressed up as bad input (exit 2, the spec blamed) but raised."""
    import torch
    from test_runner import TINY

    import blueberry.runner as runner

    runs, spec = tmp_path / "runs", str(REPO / "experiments/quickstart.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("run", spec, *TINY, "--train.device=cuda", f"--tracking.runs_root={runs}")
    assert result.exit_code == 2 and "train.device is 'cuda' but no CUDA GPU" in result.output, result.output
    assert not runs.exists()

    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(runner, "train", bug)
    result = invoke("run", spec, *TINY, "--train.steps=2", f"--tracking.runs_root={runs}")
    assert result.exit_code == 1 and isinstance(result.exception, ValueError), result.output
    (run_dir,) = runs.glob("*/*")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == "ValueError: an internal invariant broke"


def test_a_runs_root_whose_experiment_folder_is_a_file_is_exit_2(tmp_path):
    """Preflight passes (the runs root is a writable directory); making runs/<experiment>/ then meets a file."""
    from test_runner import TINY

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").write_text("x")
    result = invoke(
        "run", str(REPO / "experiments/quickstart.json"), *TINY, f"--tracking.runs_root={tmp_path / 'runs'}"
    )
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().endswith(f"{tmp_path / 'runs' / 'quickstart'} is a file, not a directory")


def test_ctrl_c_while_wandb_starts_interrupts_at_once(tmp_path, monkeypatch):
    """Online, wandb.init waits for the server (90 s by default): Ctrl-C then must raise there (exit 130), not
    only set the run's stop flag, which nothing reads until training starts."""
    import signal

    from test_runner import TINY

    import blueberry.runner as runner

    seen = []

    def waiting_for_the_server(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt  # what Python's own SIGINT handler raises in the wait

    monkeypatch.setattr(runner, "WandbTracker", waiting_for_the_server)
    runs = tmp_path / "runs"
    before = signal.getsignal(signal.SIGINT)  # Python's own; SIG_IGN where the suite runs in the background
    result = invoke("run", str(REPO / "experiments/quickstart.json"), *TINY, f"--tracking.runs_root={runs}")
    assert seen == [before] and result.exit_code == 130, result.output  # not the run's stop-flag handler
    (run_dir,) = runs.glob("*/*")
    assert list(run_dir.iterdir()) == []  # the record untouched: the next run starts it afresh


@pytest.mark.parametrize(("given", "passed"), [((), None), (("--tracking.system_metrics=true",), True)])
def test_system_metrics_left_unset_are_left_to_wandbs_own_setting(tmp_path, monkeypatch, given, passed):
    """W&B's precedence: a field the spec leaves unset follows W&B's variables (WANDB__DISABLE_STATS)."""
    from test_runner import TINY

    import blueberry.runner as runner

    seen = []
    monkeypatch.setattr(runner, "WandbTracker", lambda *args, **kwargs: seen.append(kwargs) or sys.exit(3))
    invoke("run", str(REPO / "experiments/quickstart.json"), *TINY, *given, f"--tracking.runs_root={tmp_path}")
    assert seen[0]["system_metrics"] is passed


def test_bench_and_gpu_check_installed_without_a_checkout_say_so_before_measuring(tmp_path, monkeypatch):
    """`pip install .` puts the package in site-packages, without experiments/ or sweeps/: exit 2, not a
    traceback after the GEMM ceiling (bench) or every check failed (gpu-check)."""
    import blueberry.provenance as provenance

    site = tmp_path / "site-packages"
    (site / "blueberry").mkdir(parents=True)
    monkeypatch.setattr(provenance, "SOURCE_TREE", site)
    for args, folders in ((["bench", "--quick"], "experiments/"), (["gpu-check"], "experiments/ and sweeps/")):
        result = invoke(*args, "--out", str(tmp_path / "out"))
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.output.startswith(f"error: blueberry {args[0]} measures the specs in a Blueberry checkout's ")
        assert f"{folders}, which {site} (where the package is installed) does not hold" in result.output
        assert "`pip install -e .`" in result.output and not (tmp_path / "out").exists()


def test_ctrl_c_while_the_libraries_load_is_an_interruption(tmp_path, monkeypatch):
    """The seconds before training (the data inputs checked, torch and transformers imported) end in exit 130 on
    Ctrl-C as any later moment does, not click's "Aborted!" with exit 1, the code of a failed run."""
    import blueberry.cli as cli

    def importing(*args):
        raise KeyboardInterrupt  # what Python's SIGINT handler raises in an import

    monkeypatch.setattr(cli, "_check_data_inputs", importing)
    runs = tmp_path / "runs"
    result = invoke("run", str(REPO / "experiments/quickstart.json"), f"--tracking.runs_root={runs}")
    assert result.exit_code == 130 and result.output == "error: interrupted\n", result.output
    assert not runs.exists()


@pytest.mark.parametrize(
    ("planning", "args"),
    [
        ("blueberry.sweep.load_sweep", ["sweep", "--dry-run", "sweeps/cpu/ablation.yaml"]),
        ("blueberry.study.plan_parts", ["study", "--dry-run"]),
    ],
)
def test_ctrl_c_while_a_sweep_or_study_plans_is_an_interruption(tmp_path, monkeypatch, planning, args):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(planning, interrupted)
    monkeypatch.chdir(REPO)
    result = invoke(*args, "--runs-root", str(tmp_path / "runs"))
    assert result.exit_code == 130 and result.output == "error: interrupted\n", result.output


def test_a_model_that_is_not_causal_fails_the_run_without_a_traceback(tmp_path, monkeypatch):
    from test_runner import TINY

    from blueberry.models.causality import CausalityReport

    monkeypatch.setattr("blueberry.models.causality.causality_probe", lambda *a, **k: CausalityReport(False, 0.5, 3))
    result = invoke("run", str(REPO / "experiments/quickstart.json"), *TINY, f"--tracking.runs_root={tmp_path}")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().endswith("run failed: model is not causal: changing a later token moved the "
                                          "logits at position 3 by 0.5 (tolerance 1e-5)")  # fmt: skip


def test_a_rank_left_in_the_environment_outside_torchrun_hides_no_error_and_makes_no_follower(tmp_path, monkeypatch):
    """RANK set by another launcher (a Kubeflow pod, a SLURM script) outside a torchrun job: errors are still said,
    and a plain run is its own main process (it took the torchrun follower's path and recorded nothing)."""
    from blueberry.distributed import env_world

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world().is_main
    result = invoke("validate", str(REPO / "experiments/quickstart.json"), "--train.lrr=3")
    assert result.exit_code == 2 and "train.lrr: unknown field" in result.output


def test_a_full_disk_is_said_in_a_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    def writing(**kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "reports" / "REPORT.md"))

    monkeypatch.setattr("blueberry.report.build.run_report", writing)
    result = invoke("report", "--runs-root", str(tmp_path), "--out", str(tmp_path / "reports"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output == f"error: {tmp_path / 'reports' / 'REPORT.md'}: No space left on device\n"


def test_under_torchrun_rank_0_alone_checks_the_runs_root_it_alone_writes(monkeypatch):
    """Every rank checked it, and each said so (as many times as torchrun, stopping the ranks once rank 0 had
    failed, let them): rank 0 alone says it; the others go on to wait for rank 0, and torchrun stops them."""
    from blueberry.runner import RunResult

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("blueberry.runner.execute", lambda spec, **kwargs: RunResult(None, None, "disabled", {}))
    args = ("run", str(REPO / "experiments/quickstart.json"), "--tracking.runs_root=/proc/blueberry")
    monkeypatch.setenv("RANK", "1")
    result = invoke(*args)
    assert result.exit_code == 0 and result.output == "", result.output  # a follower: rank 0 reports the run
    monkeypatch.setenv("RANK", "0")
    result = invoke(*args)
    assert result.exit_code == 2 and result.output.startswith("error: tracking.runs_root '/proc/blueberry'")
    # what a rank reads itself, its own machine's environment, each rank checks (a traceback there otherwise)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", "/nonexistent/prices.json")
    result = invoke(*args)
    assert result.exit_code == 2 and result.output.startswith("error: BLUEBERRY_GPU_PRICES:"), result.output


def test_under_torchrun_a_spec_this_hardware_cannot_run_is_said_by_rank_0(monkeypatch):
    """A precision, compile or batch split refused (NotRunnableHere) every rank finds alike: rank 0 says it at once,
    a follower waits for torchrun to end it and says it only if it was not ended (its own machine differs)."""
    from blueberry.hardware import NotRunnableHere

    def refuse(spec, **kwargs):
        raise NotRunnableHere("model.experts_implementation 'grouped' cannot be compiled in fp32")

    waited = []
    monkeypatch.setattr("blueberry.cli.time.sleep", waited.append)
    monkeypatch.setattr("blueberry.runner.execute", refuse)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = str(REPO / "experiments/quickstart.json")
    for rank, said in (("0", f"error: {spec}: model"), ("1", f"error: rank 1: {spec}: model")):
        monkeypatch.setenv("RANK", rank)
        result = invoke("run", spec)
        assert result.exit_code == 2 and result.output.startswith(said), result.output
        assert waited == ([] if rank == "0" else [cli.FOLLOWER_GRACE_S])


def test_sweep_and_study_refuse_to_run_under_torchrun_or_in_a_world_of_several_processes(tmp_path, monkeypatch):
    """Each rank ran the whole sweep, and its trials joined the other ranks' trials in one process group. Refused
    for torchrun's job of one process too, and for another launcher's WORLD_SIZE (there each rank says it)."""
    monkeypatch.chdir(REPO)
    waited = []
    monkeypatch.setattr("blueberry.cli.time.sleep", waited.append)  # (no torchrun here to end a quiet rank)
    for command in (["sweep", "--dry-run", "sweeps/cpu/ablation.yaml"], ["study", "--dry-run"]):
        for env, said in (
            ({"TORCHELASTIC_RUN_ID": "job-7", "WORLD_SIZE": "2", "RANK": "1"}, False),
            ({"TORCHELASTIC_RUN_ID": "job-7", "WORLD_SIZE": "1", "RANK": "0"}, True),
            ({"WORLD_SIZE": "2"}, True),
        ):
            with monkeypatch.context() as scoped:
                for name, value in env.items():
                    scoped.setenv(name, value)
                result = invoke(*command, "--runs-root", str(tmp_path / "runs"))
            assert result.exit_code == 2, result.output
            if said:
                assert (
                    f"error: blueberry {command[0]} starts its trials itself: run it without torchrun" in result.output
                )
            else:  # rank 0 says it; this rank waits for torchrun to end it, so that its exit cannot end rank 0 first,
                # and says it only when it was not ended (rank 0 did not fail alike: another machine's spec file)
                assert waited.pop() == cli.FOLLOWER_GRACE_S
                assert result.output.startswith(f"error: rank 1: blueberry {command[0]} starts its trials itself")
    assert not (tmp_path / "runs").exists()
