"""End to end in-process: spec → data + model → trainer → run record + W&B offline run."""

import json

import pytest
import torch

from blueberry.overrides import load_spec
from blueberry.runner import execute
from blueberry.spec import VARIANTS
from blueberry.tracking import read_metrics
from blueberry.tracking.wandb_log import read_wandb_log

# Tiny shapes: each run takes seconds on 2 cores. The embedding needs a higher AdamW LR than the
# study's 0.1x ratio to learn anything in 80 steps at this size.
TINY = [
    "--model.d_model=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_experts=4",
    "--model.q_lora_rank=32",
    "--model.kv_lora_rank=32",
    "--model.d_ff=256",
    "--model.expert_d_ff=128",
    "--data.vocab_size=1024",
    "--data.seq_len=64",
    "--data.max_tokens=100000",
    "--train.lr=0.02",
    "--train.adamw_lr_ratio=1.0",
    "--train.precision=fp32",
    "--train.progress=False",
]


def tiny_spec(tmp_path, *extra):
    return load_spec(None, [*TINY, f"--tracking.runs_root={tmp_path / 'runs'}", *extra])


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_learns_well_below_unigram(tmp_path, variant):
    spec = tiny_spec(tmp_path, f"--model.variant={variant}", "--train.steps=80", "--train.eval_every=80")
    result = execute(spec, log=lambda msg: None)
    summary = result.summary
    assert summary["val/loss"] < summary["unigram_loss"] - 1.0, summary
    assert "time/setup/start_s" not in summary  # a run inside another program: its process's age is not ours
    status = json.loads((result.run_dir / "status.json").read_text())
    assert status["state"] == "finished"
    if spec.model.is_moe:
        row = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "moe/layer0/load_e0" in r][-1]
        loads = [row[f"moe/layer0/load_e{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0) and max(loads) < 0.9  # tokens really spread over experts
        assert 0 < row["moe/layer0/load_entropy"] <= 1 and row["moe/layer0/idle_experts"] == loads.count(0)


def test_run_record_is_complete_and_matches_wandb(tmp_path):
    spec = tiny_spec(tmp_path, "--model.variant=moe", "--train.steps=20", "--train.eval_every=10", "--seed=3")
    result = execute(spec, log=lambda msg: None, own_process=True)
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"spec.json", "metrics.jsonl", "summary.json", "status.json", "wandb"} <= files

    header = json.loads((result.run_dir / "spec.json").read_text())
    assert header["spec"] == spec.to_json_dict() and header["spec_hash"] == spec.spec_hash()
    assert header["seed"] == 3 and len(header["data"]["fingerprint"]) == 64
    assert header["code"]["package_version"] == "0.1.0"
    assert 0 <= header["data"]["leakage"]["val_windows_with_train_ngram"] < 0.05
    assert header["params"]["active"] < header["params"]["total"]
    assert header["causality"]["ok"] is True

    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/loss" in r] == [10, 20]
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/peak_memory_mb"} <= rows[0].keys()

    log = read_wandb_log(result.wandb_dir)
    assert log.exit_code == 0 and log.group == spec.experiment and "moe" in log.tags
    wandb_val = [(r["trainer/step"], r["val/loss"]) for r in log.history if "val/loss" in r]
    assert wandb_val == [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert (
        log.config["train"] == spec.to_json_dict()["train"] and log.config["params_total"] == header["params"]["total"]
    )
    assert log.summary["val/loss"]["min"] == pytest.approx(result.summary["val/best_loss"])
    final = {
        "final/val_loss": "val/loss",
        "final/val_accuracy": "val/accuracy",
        "final/val_perplexity": "val/perplexity",
    }
    assert {k: log.summary[k] for k in final} == {k: pytest.approx(result.summary[v]) for k, v in final.items()}
    # where the time before training went, in the record and in W&B's summary
    setup = {k: v for k, v in json.loads((result.run_dir / "summary.json").read_text()).items() if "setup/" in k}
    stages = ("start", "device", "build", "tracking")
    assert set(setup) == {f"time/setup/{stage}_s" for stage in stages} and all(v >= 0 for v in setup.values())
    assert setup["time/setup/start_s"] > 0  # this process's age when the run began (here: pytest's, imports)
    assert all(log.summary[key] == pytest.approx(value) for key, value in setup.items())


def wandb_header(run_dir):
    return json.loads((run_dir / "spec.json").read_text())["wandb"]


def test_every_fresh_run_gets_a_fresh_wandb_id_and_wandb_settings_apply(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path, "--train.steps=2", "--train.eval_every=2", "--train.threads=1")
    first = execute(spec, log=lambda msg: None, resume=False)
    monkeypatch.setenv("WANDB_PROJECT", "from-env")  # a W&B setting the spec leaves open
    second = execute(spec, log=lambda msg: None, resume=False)
    ids = [wandb_header(r.run_dir)["id"] for r in (first, second)]
    assert ids[0] != ids[1] and all(i.startswith(f"{spec.run_name}-") for i in ids)
    assert wandb_header(first.run_dir)["resume"] == "never"  # a taken id is an error, never a merge
    logs = [read_wandb_log(r.wandb_dir) for r in (first, second)]
    assert [log.run_id for log in logs] == ids
    assert [log.project for log in logs] == ["blueberry", "from-env"]
    header = wandb_header(second.run_dir)
    assert header["project"] == {"value": "from-env", "source": "WANDB_PROJECT"}
    assert header["group"] == {"value": spec.experiment, "source": "default"}
    assert header["mode"] == {"value": "offline", "source": "set by WANDB_MODE"}
    assert first.summary["cost/usd"] is None and "cost/usd" not in logs[0].summary  # no price on CPU: left out


def test_the_report_filters_a_run_on_the_group_and_tags_wandb_was_given(tmp_path, monkeypatch):
    """W&B's own settings (WANDB_RUN_GROUP, WANDB_TAGS) decide a run's group and add tags; the local report's
    --group/--tag match what W&B got, as `report --source wandb` does, not what the spec alone says."""
    from blueberry.report.records import read_local_run, select

    monkeypatch.setenv("WANDB_RUN_GROUP", "g1")
    monkeypatch.setenv("WANDB_TAGS", "mytag")
    spec = tiny_spec(tmp_path, "--train.steps=2", "--train.threads=1")
    result = execute(spec, log=lambda msg: None)
    log, run = read_wandb_log(result.wandb_dir), read_local_run(result.run_dir)
    assert (run.group, run.tags) == (log.group, log.tags) == ("g1", [spec.model.label, "mytag"])
    assert run.experiment == spec.experiment != "g1"  # the report's tables stay per experiment
    assert select([run], group="g1", tags=("mytag",)) == [run] and select([run], group=spec.experiment) == []


def test_a_sweep_trial_keeps_the_id_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "trial-7x2k")
    result = execute(tiny_spec(tmp_path, "--train.steps=2", "--train.threads=1"), log=lambda msg: None)
    assert result.run_dir.name == "trial-7x2k"
    assert wandb_header(result.run_dir)["id"] == read_wandb_log(result.wandb_dir).run_id == "trial-7x2k"


def test_a_record_without_its_git_commit_says_why_in_the_run_log(tmp_path, monkeypatch):
    """A checkout git refuses (another user's, "dubious ownership"): the run goes on, records git_error, and its
    log says the record has no commit, so it is not read as code installed outside any checkout."""
    said = "fatal: detected dubious ownership in repository at '/x'"
    monkeypatch.setattr(
        "blueberry.runner.code_version", lambda: {"git_sha": None, "git_dirty": None, "git_error": said}
    )
    lines = []
    result = execute(tiny_spec(tmp_path, "--train.steps=1", "--train.threads=1"), log=lines.append)
    assert f"the run record has no git commit: {said}" in lines
    assert json.loads((result.run_dir / "spec.json").read_text())["code"]["git_error"] == said


def test_a_given_run_id_a_live_process_runs_is_refused_not_run_twice(tmp_path, monkeypatch):
    """Two processes with one WANDB_RUN_ID (a trial launched again while the first still runs) would write two
    records of one W&B run: the second is refused, and runs once the first is gone."""
    from blueberry.hardware import NotRunnableHere
    from blueberry.tracking.record import claim_run_dir

    monkeypatch.setenv("WANDB_RUN_ID", "trial-7x2k")
    spec = tiny_spec(tmp_path, "--train.steps=2", "--train.threads=1")
    first = claim_run_dir(tmp_path / "runs", spec.experiment, "trial-7x2k")  # holds the lock, as a live run does
    with pytest.raises(NotRunnableHere, match="WANDB_RUN_ID=trial-7x2k: a live process is running that run"):
        execute(spec, log=lambda msg: None)
    assert [p.name for p in first.path.parent.iterdir()] == ["trial-7x2k"]  # no second directory
    first.release()
    assert execute(spec, log=lambda msg: None).run_dir == first.path
    # a later attempt of that run (trial-7x2k-2) running now: a third process writes the same W&B run too
    later = claim_run_dir(tmp_path / "runs", spec.experiment, "trial-7x2k")
    (later.path / "spec.json").write_text(json.dumps({"wandb": {"id": "trial-7x2k"}}))  # as its header says
    assert later.path.name == "trial-7x2k-2"
    with pytest.raises(NotRunnableHere, match=r"a live process is running that run \(.*trial-7x2k-2\)"):
        execute(spec, log=lambda msg: None)
    later.release()
    # a live run given the id `trial-7x2k-3` (its own W&B run, its first directory) is another run: no refusal
    other = claim_run_dir(tmp_path / "runs", spec.experiment, "trial-7x2k-3")
    (other.path / "spec.json").write_text(json.dumps({"wandb": {"id": "trial-7x2k-3"}}))
    assert execute(spec, log=lambda msg: None).run_dir.name == "trial-7x2k-2"
    other.release()


def test_resume_policy_is_must_only_when_both_attempts_are_online(tmp_path):
    from blueberry.runner import wandb_identity
    from blueberry.tracking.record import RunDir

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps({"wandb": {"id": "r-abc", "mode": {"value": "online"}}}))
    claimed = RunDir(run_dir, lock_fd=-1, reused=True)
    assert wandb_identity(claimed, None, "online", "r") == ("r-abc", "must")
    assert wandb_identity(claimed, None, "offline", "r") == ("r-abc", "allow")
    (run_dir / "spec.json").write_text(json.dumps({"name": "r"}))  # a record from before ids were stored
    assert wandb_identity(claimed, None, "offline", "r") == ("r", "allow")


def test_same_seed_same_results_on_cpu(tmp_path):
    runs = [
        execute(
            tiny_spec(tmp_path, "--model.variant=baseline", "--train.steps=8", "--train.eval_every=4"),
            log=lambda msg: None,
        )
        for _ in range(2)
    ]
    curves = [[r.get("train/loss") for r in read_metrics(run.run_dir / "metrics.jsonl")] for run in runs]
    assert curves[0] == curves[1]
    assert runs[0].summary["val/loss"] == runs[1].summary["val/loss"]
    assert runs[0].run_dir != runs[1].run_dir  # a re-run never overwrites a record


def test_threads_blueberry_chose_follow_the_free_cores_and_pinned_ones_stay(tmp_path, monkeypatch):
    import blueberry.runner as runner

    watches = []

    class Watch:  # FreeCoresWatch's interface, counting the steps it was called after
        def __init__(self, threads, set_threads, log):
            self.threads, self.calls = threads, 0
            watches.append(self)

        def __call__(self, trainer, step):
            self.calls += 1

    monkeypatch.setattr(runner, "FreeCoresWatch", Watch)
    monkeypatch.setattr(runner, "choose_threads", lambda requested: (requested or 1, "1 usable cores"))
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # this test process keeps its threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    execute(tiny_spec(tmp_path, "--train.steps=3"), log=lambda msg: None)
    assert [(w.threads, w.calls) for w in watches] == [(torch.get_num_threads(), 3)]
    execute(tiny_spec(tmp_path, "--train.steps=3", "--train.threads=1"), log=lambda msg: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    execute(tiny_spec(tmp_path, "--train.steps=3"), log=lambda msg: None)
    assert len(watches) == 1  # the spec's threads, or OMP_NUM_THREADS: no watch


def test_failed_run_is_recorded_as_failed(tmp_path, monkeypatch):
    import blueberry.runner as runner

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "train", explode)
    with pytest.raises(RuntimeError):
        execute(tiny_spec(tmp_path, "--train.steps=2"), log=lambda msg: None)
    (run_dir,) = (tmp_path / "runs" / "default").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {**status, "state": "failed", "reason": "RuntimeError: boom"}


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_named_slow(tmp_path, monkeypatch, native):
    from blueberry import runner

    monkeypatch.setattr("blueberry.hardware.cpu_supports_bf16", lambda flags=None: native)
    lines = []
    _, device = runner.device_stage(tiny_spec(tmp_path, "--train.precision=bf16", "--train.threads=1"), lines.append)
    assert device.type == "cpu"
    warned = [line for line in lines if "without native bf16" in line]
    if native:
        assert warned == []
    else:
        assert len(warned) == 1 and "slower than fp32, which 'auto' picks here" in warned[0]


@pytest.mark.parametrize("driver", [True, False])
def test_a_cpu_build_of_torch_on_a_gpu_machine_is_named(tmp_path, monkeypatch, driver):
    """`pip install torch` of a CPU wheel on a GPU box trains on the CPU, hours instead of minutes: say so."""
    from blueberry import runner

    monkeypatch.setattr(runner, "nvidia_driver_loaded", lambda: driver)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build, as here
    lines = []
    _, device = runner.device_stage(tiny_spec(tmp_path, "--train.threads=1"), lines.append)
    said = [line for line in lines if "is a CPU build: training on the CPU" in line]
    assert device.type == "cpu" and len(said) == driver


def test_a_cpu_run_keeps_freed_memory(tmp_path, monkeypatch):
    from blueberry import runner
    from blueberry.train import device

    calls = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append(True))
    runner.device_stage(tiny_spec(tmp_path, "--train.threads=1"), lambda msg: None)
    assert calls == [True]


def test_a_runs_cost_pays_for_its_processs_start_up_too(tmp_path, monkeypatch):
    """`blueberry run` pays from the moment its process started (Python, imports): 1 h of start-up at $1/h."""
    import blueberry.runner as runner

    monkeypatch.setattr(runner, "_process_age_s", lambda: 3600.0)
    spec = tiny_spec(
        tmp_path, "--train.steps=2", "--train.eval_every=2", "--train.threads=1", "--train.price_per_hour=1"
    )
    result = execute(spec, log=lambda msg: None, resume=False, own_process=True)
    assert result.summary["time/setup/start_s"] == 3600.0
    assert 1.0 < result.summary["cost/usd"] < 1.1  # the hour of start-up, plus the seconds of the run itself


def test_a_sweep_trials_name_shows_the_values_its_sweep_varies(monkeypatch):
    """The four trials of a seed in an experts × top-k grid had one name in W&B's charts and the dashboard."""
    from blueberry.runner import display_name
    from blueberry.sweep.controller import varying_paths

    parameters = {
        "experiment": {"value": "exp3-experts-cpu"},
        "seed": {"values": [1, 2, 3]},
        "model": {
            "parameters": {"n_experts": {"values": [2, 4]}, "top_k": {"values": [1, 2]}, "d_model": {"value": 64}}
        },
        "train.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1},
        "data": {"parameters": {"max_tokens": {"values": [60000]}}},  # one value: no difference to name
    }
    assert varying_paths(parameters) == ["model.n_experts", "model.top_k", "seed", "train.lr"]
    spec = load_spec(None, ["--experiment=exp3-experts-cpu", "--model.n_experts=4", "--model.top_k=1", "--seed=2"])
    assert display_name(spec) == spec.run_name  # not a sweep's trial
    monkeypatch.setenv("BLUEBERRY_SWEEP_VARIES", ",".join(varying_paths(parameters)))
    assert (
        display_name(spec)
        == f"{spec.run_name}-n_experts4-top_k1"
        == "exp3-experts-cpu-baseline-lr0.01-s2-n_experts4-top_k1"
    )
    named = load_spec(None, ["--name=mine", "--model.n_experts=4"])
    assert display_name(named) == "mine"  # the spec's own name, as given
    # a parameter whose values are sections (`values: [{n_experts: 2, top_k: 1}, …]`): the fields that differ
    sections = {"model": {"values": [{"n_experts": n, "top_k": 1, "d_model": 64} for n in (2, 4)]}}
    assert varying_paths({**sections, "train.adam_betas": {"values": [[0.9, 0.95], [0.9, 0.99]]}}) == [
        "model.n_experts",
        "train.adam_betas",
    ]
    monkeypatch.setenv("BLUEBERRY_SWEEP_VARIES", "model.n_experts,train.adam_betas")
    spec = load_spec(None, ["--model.n_experts=4", "--model.top_k=1", "--train.adam_betas=[0.9,0.99]"])
    assert display_name(spec) == f"{spec.run_name}-n_experts4-adam_betas0.9_0.99"  # a list's items joined


def test_the_progress_bar_in_a_log_file_redraws_rarely(tmp_path, capsys):
    """Not a terminal: the bar redraws at most every 30 s; the loss shown beside it forced a redraw at each log
    step, one more carriage-return segment of the same line in every piped log and sweep trial's log."""
    execute(tiny_spec(tmp_path, "--train.steps=12", "--train.log_every=1", "--train.progress=true"), log=print)
    bar = capsys.readouterr().err
    assert "12/12" in bar and bar.count("\r") <= 3, bar  # the first draw, the last, and the close
