"""`blueberry sweep` end to end, offline: a grid runs once per point, failures are recorded, kill + resume.

The grid and the failing trial run the real `blueberry run`; the tests of the queue (kill + resume, two
controllers, a dead controller's trial) run a stand-in trial that only writes its run record, seconds sooner."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from on_terminal import OnTerminal
from sweep_commands import REPO, RUN_WITH_ARGS_FILE, STAND_IN_WITH_ARGS_FILE

from blueberry.sweep.config import load_sweep
from blueberry.sweep.controller import Orphan, SweepRunner, find_record, visible_cuda_devices
from blueberry.tracking.wandb_log import read_wandb_log

BLUEBERRY = str(Path(sys.executable).parent / "blueberry")


def write_sweep(tmp_path, parameters, name="tiny", command=RUN_WITH_ARGS_FILE):
    data = parameters.setdefault("data", {"parameters": {}})["parameters"]
    data.setdefault("max_tokens", {"value": 60_000})  # a 7K-token val set: these tests are about the sweep
    config = {
        "name": name,
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "command": command,
        "parameters": {
            "experiment": {"value": f"{name}-exp"},
            "model": {"parameters": {"d_model": {"value": 32}, "n_layers": {"value": 1}}},
            **parameters,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def queue_sweep(tmp_path, lrs):
    """A grid over `lrs` whose trials are the stand-in (sweep_commands.py): for the tests of the sweep's queue."""
    return write_sweep(tmp_path, {"train": {"parameters": {"lr": {"values": lrs}}}}, command=STAND_IN_WITH_ARGS_FILE)


def tiny_train(**extra):
    return {"parameters": {"steps": {"value": 3}, "eval_every": {"value": 3}, **extra}}


def sweep_cmd(path, runs_root, *extra):
    return [BLUEBERRY, "sweep", str(path), "--runs-root", str(runs_root), *extra]


@pytest.fixture
def wandb_disabled(monkeypatch):
    """For the tests of the sweep's queue, not of what reaches W&B: each trial skips W&B's second of start-up."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


def state_of(runs_root):
    (state_file,) = Path(runs_root).glob("_sweeps/*/state.json")
    return json.loads(state_file.read_text())["trials"]


def test_grid_runs_every_point_once_and_records_the_sweep(tmp_path):
    path = write_sweep(tmp_path, {"train": tiny_train(lr={"values": [0.01, 0.02]})})
    runs_root = tmp_path / "runs"
    done = subprocess.run(
        sweep_cmd(path, runs_root, "--parallel", "2"), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    trials = state_of(runs_root)
    assert sorted(t["params"]["train"]["lr"] for t in trials) == [0.01, 0.02]
    assert all(t["state"] == "finished" and t["summary"]["val/loss"] > 0 for t in trials)
    for trial in trials:
        header = json.loads((Path(trial["run_dir"]) / "spec.json").read_text())
        assert header["sweep"]["name"] == "tiny" and header["spec"]["experiment"] == "tiny-exp"
        assert header["run_id"] == trial["run_id"]
        (segment,) = (Path(trial["run_dir"]) / "wandb").glob("offline-run-*")
        log = read_wandb_log(segment)  # the trial keeps the id the sweep gave it, and its experiment as group
        assert header["wandb"]["id"] == log.run_id == trial["run_id"] and log.group == "tiny-exp"
        assert "sweep:tiny" in log.tags
        lr = trial["params"]["train"]["lr"]  # the one value the sweep varies, which the name shows already
        assert log.name == header["name"] == f"tiny-exp-{header['spec']['model']['variant']}-lr{lr:g}-s42"
    # Same command again: nothing left to run, nothing re-run.
    again = subprocess.run(sweep_cmd(path, runs_root), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and len(state_of(runs_root)) == 2
    assert len(list((runs_root / "tiny-exp").iterdir())) == 2


@pytest.mark.usefixtures("wandb_disabled")
def test_a_failing_trial_is_recorded_the_sweep_goes_on_and_exits_1(tmp_path):
    # a corpus of one short document: there, and readable (the sweep's checks pass), but too small to split
    tiny = str(tmp_path / "tiny-corpus.jsonl")
    Path(tiny).write_text('{"text": "one short document"}\n')
    path = write_sweep(
        tmp_path, {"train": tiny_train(), "data": {"parameters": {"dataset": {"values": [tiny, "austen"]}}}}
    )
    runs_root = tmp_path / "runs"
    done = subprocess.run(sweep_cmd(path, runs_root), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]  # as `blueberry study`: make, CI and scripts see the failure
    trials = {t["params"]["data"]["dataset"]: t for t in state_of(runs_root)}
    assert trials["austen"]["state"] == "finished"
    header = json.loads((Path(trials["austen"]["run_dir"]) / "spec.json").read_text())
    assert header["name"].endswith("-s42-datasetausten")  # the value its sweep varies, in its name
    assert trials[tiny]["state"] == "failed" and "both splits need at least one document" in trials[tiny]["reason"]
    assert "1 finished, 1 failed" in done.stdout


def test_killed_sweep_resumes_with_every_point_exactly_once(tmp_path):
    path = queue_sweep(tmp_path, [0.01, 0.02, 0.03])
    runs_root = tmp_path / "runs"
    sweep = subprocess.Popen(sweep_cmd(path, runs_root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill -9 while the second trial runs: one finished, one running, one to go
        try:
            trials = state_of(runs_root)
        except (ValueError, FileNotFoundError):
            trials = []
        finished = sum(t["state"] == "finished" for t in trials)
        if finished >= 1 and any(t["state"] == "running" and t["pid"] for t in trials):
            break
        time.sleep(0.2)
    else:
        sweep.kill()
        pytest.fail("never saw one trial finished and one running: nothing was killed mid-sweep")
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    resumed = subprocess.run(sweep_cmd(path, runs_root), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = state_of(runs_root)
    assert sorted(t["params"]["train"]["lr"] for t in trials) == [0.01, 0.02, 0.03]  # none lost, none duplicated
    assert all(t["state"] == "finished" for t in trials)
    records = [p for p in (runs_root / "tiny-exp").iterdir()]
    assert sorted(p.name for p in records) == sorted(t["run_id"] for t in trials)  # one record per point


def test_a_terminal_hangup_stops_the_trials_and_the_same_command_resumes(tmp_path):
    """`blueberry sweep` on a terminal that goes away (an ssh session dropping): SIGHUP to the controller. It
    stops its running trial as Ctrl-C would and exits 129 (128 + SIGHUP) instead of dying with the trial left
    running unwatched; the same command then runs every point once."""
    path = queue_sweep(tmp_path, [0.01, 0.02])
    runs_root = tmp_path / "runs"
    session = OnTerminal(sweep_cmd(path, runs_root), cwd=REPO)
    sweep = session.process
    deadline, running = time.monotonic() + 240, []
    while not running:  # until a trial runs
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep never started a trial"
        session.drain()
        try:
            running = [t for t in state_of(runs_root) if t["state"] == "running" and t["pid"]]
        except (ValueError, FileNotFoundError):
            pass
    session.hang_up()
    assert sweep.wait(timeout=120) == 128 + signal.SIGHUP
    (trial,) = running
    with pytest.raises(ProcessLookupError):
        os.kill(trial["pid"], 0)  # stopped, not left running unwatched
    assert [t["state"] for t in state_of(runs_root)] == ["running"]  # unfinished: the next command runs it
    resumed = subprocess.run(sweep_cmd(path, runs_root), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = state_of(runs_root)
    assert sorted(t["params"]["train"]["lr"] for t in trials) == [0.01, 0.02]
    assert all(t["state"] == "finished" for t in trials)


def test_two_controllers_started_together_share_one_queue(tmp_path):
    """Two terminals, one sweep: every grid point runs exactly once, by one of them."""
    path = queue_sweep(tmp_path, [0.01, 0.02])
    runs_root = tmp_path / "runs"
    controllers = [
        subprocess.Popen(
            sweep_cmd(path, runs_root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for controller in controllers:
        _, err = controller.communicate(timeout=600)
        assert controller.returncode == 0, err[-2000:]
    trials = state_of(runs_root)
    assert sorted(t["params"]["train"]["lr"] for t in trials) == [0.01, 0.02]
    assert all(t["state"] == "finished" for t in trials)
    records = sorted(p.name for p in (runs_root / "tiny-exp").iterdir())
    assert records == sorted(t["run_id"] for t in trials)  # 2 records: none run twice
    assert {t["worker"].split(":")[0] for t in trials} <= {str(c.pid) for c in controllers}


def test_a_killed_controllers_trial_is_taken_over_by_the_live_one(tmp_path):
    path = queue_sweep(tmp_path, [0.01, 0.02])
    runs_root = tmp_path / "runs"
    first = subprocess.Popen(sweep_cmd(path, runs_root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until the first controller runs a trial
        try:
            running = [t for t in state_of(runs_root) if t["state"] == "running" and t["pid"]]
        except (ValueError, FileNotFoundError):
            running = []
        if running:
            break
        time.sleep(0.2)
    (orphaned,) = running
    second = subprocess.Popen(
        sweep_cmd(path, runs_root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.kill(first.pid, signal.SIGKILL)  # its trial process lives on, in its own process group
    first.wait()
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    trials = {t["run_id"]: t for t in state_of(runs_root)}
    assert sorted(t["params"]["train"]["lr"] for t in trials.values()) == [0.01, 0.02]
    assert all(t["state"] == "finished" for t in trials.values())
    assert trials[orphaned["run_id"]]["worker"].split(":")[0] == str(second.pid)  # claimed from the dead one
    assert sorted(p.name for p in (runs_root / "tiny-exp").iterdir()) == sorted(trials)  # none run twice


@pytest.mark.parametrize(
    "visible, count, devices",
    [(None, 2, ["0", "1"]), ("2,3", 2, ["2", "3"]), ("GPU-a, GPU-b", 2, ["GPU-a", "GPU-b"]), ("", 0, [])],
)
def test_trials_are_pinned_to_the_gpus_this_process_was_given(monkeypatch, visible, count, devices):
    monkeypatch.setattr("blueberry.sweep.controller._gpu_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_cuda_devices() == devices


def test_on_a_mig_host_trials_are_pinned_to_slices_not_boards(monkeypatch):
    monkeypatch.setattr("blueberry.sweep.controller._gpu_count", lambda: 2)
    monkeypatch.setattr("blueberry.sweep.controller.unpinned_device_names", lambda: ["MIG-a", "MIG-b", "MIG-c"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_cuda_devices() == ["MIG-a", "MIG-b"]  # as many as CUDA counts


def test_a_new_trial_goes_to_the_gpu_that_a_finished_one_freed(tmp_path, monkeypatch):
    """Two GPUs, given as CUDA_VISIBLE_DEVICES=5,7, two trials at a time: the third trial starts when the short
    first one ends, and takes its GPU, not the one the long second trial still runs on."""
    monkeypatch.setattr("blueberry.sweep.controller._gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    program = tmp_path / "trial.py"  # records the GPU it was given, then works for `--wait` seconds
    program.write_text(
        "import os, pathlib, sys, time\n"
        "wait = sys.argv[1].split('=')[1]\n"
        "pathlib.Path(os.environ['BLUEBERRY_RUNS_ROOT'], wait).write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "time.sleep(float(wait))\n"
    )
    config = {
        "method": "grid",
        "command": [sys.executable, str(program), "${args}"],
        "parameters": {"wait": {"values": [0.1, 3.0, 0.2]}},
    }
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(config))
    runs_root = tmp_path / "runs"
    SweepRunner(load_sweep(path), runs_root, parallel=2, log=lambda line: None).run()
    given = {p.name: p.read_text() for p in runs_root.iterdir() if p.is_file()}
    assert given == {"0.1": "5", "3.0": "7", "0.2": "5"}


def test_an_orphaned_trial_is_known_by_its_run_id_whatever_its_command_line():
    """A sweep's command with ${args} names no run id: a trial left running by a killed sweep is still waited
    for (it was launched again at once, writing a second record under the same W&B id), and a process that took
    its pid after it ended is not it."""
    program = "import time; print('up', flush=True); time.sleep(30)"
    env = {**os.environ, "WANDB_RUN_ID": "t-0001"}
    trial = subprocess.Popen([sys.executable, "-c", program, "--seed=1"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert trial.stdout.readline() == "up\n"
        assert Orphan(trial.pid, "t-0001").poll() is None  # alive: wait for it
        assert Orphan(trial.pid, "t-0002").poll() == 0  # another run's pid now
    finally:
        trial.kill()
        trial.wait()
    assert Orphan(trial.pid, "t-0001").poll() == 0  # gone


def test_an_orphaned_trial_keeps_counting_on_the_gpu_it_was_pinned_to():
    """A trial left running by a killed sweep: the next controller reads its GPU from its environment."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "7"}
    program = "import time; print('up', flush=True); time.sleep(30)"
    trial = subprocess.Popen([sys.executable, "-c", program, "t-0001"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        # Popen returns once exec has begun; /proc shows the new environment a moment later: wait for the child
        assert trial.stdout.readline() == "up\n"
        assert Orphan(trial.pid, "t-0001").device() == "7"
    finally:
        trial.kill()
        trial.wait()
    assert Orphan(trial.pid, "t-0001").device() is None  # gone


def test_a_trial_run_again_is_read_from_its_newest_attempt(tmp_path):
    """A failed trial run again (its sweep's state moved aside) trains in `<run_id>-2`, as claim_run_dir numbers a
    new attempt beside a failed one: the sweep must read that one, not the old failure."""
    for name, state in (("s-t000", "failed"), ("s-t000-2", "failed"), ("s-t000-10", "finished"), ("s-t0001", "x")):
        (tmp_path / "exp" / name).mkdir(parents=True)
        (tmp_path / "exp" / name / "status.json").write_text(json.dumps({"state": state}))
    assert find_record(tmp_path, "s-t000") == tmp_path / "exp" / "s-t000-10"  # -10 after -2: by number
    assert find_record(tmp_path, "s-t0001") == tmp_path / "exp" / "s-t0001" and find_record(tmp_path, "s-t9") is None


def test_an_early_terminated_trial_is_stopped_for_good_and_killed_if_it_ignores_the_stop(tmp_path, monkeypatch):
    """As under `wandb agent`: a trial the sweep's early_terminate stops is `killed` in the sweep's state at once, so
    neither a controller that dies next nor one waiting for it as an orphan runs it again; and one that ignores
    SIGTERM is SIGKILLed after WANDB_AGENT_KILL_DELAY seconds (30 by default)."""
    from types import SimpleNamespace

    import blueberry.sweep.controller as controller
    from blueberry.sweep.controller import Worker, plan
    from blueberry.sweep.state import Trial

    path = queue_sweep(tmp_path, [0.01, 0.02])
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "early_terminate": {"type": "hyperband", "min_iter": 1}}))
    sweep = load_sweep(path)
    runner = SweepRunner(sweep, tmp_path / "runs", parallel=2, log=lambda line: None)
    runner.resumable, planned = [], plan(sweep, None)
    real = controller.engine()
    stopping = SimpleNamespace(  # the engine, judging both trials to stop
        RunState=real.RunState, SweepRun=real.SweepRun, stop_runs=lambda config, runs: list(runs)
    )
    monkeypatch.setattr(controller, "engine", lambda: stopping)
    waits = "import signal, time; signal.signal(signal.SIGTERM, signal.{}); print('up', flush=True); time.sleep(60)"
    processes = []
    try:
        for (run_id, handler), params in zip((("t-0", "SIG_DFL"), ("t-1", "SIG_IGN")), planned):
            env = {**os.environ, "WANDB_RUN_ID": run_id}
            process = subprocess.Popen([sys.executable, "-c", waits.format(handler)], env=env, stdout=subprocess.PIPE)
            assert process.stdout.readline() == b"up\n"
            processes.append(process)
            trial = Trial(run_id=run_id, params=params, state="running", pid=process.pid)
            runner.state.put(trial)
            runner.workers[run_id] = Worker(trial, Orphan(process.pid, run_id), None, tmp_path / f"{run_id}.log")
        runner._early_terminate()
        assert [t["state"] for t in state_of(tmp_path / "runs")] == ["killed", "killed"]  # on disk at once
        processes[0].wait(timeout=30)
        runner._reap()
        assert runner.resumable == [] and "t-0" not in runner.workers  # stopped, not queued to run again
        runner._early_terminate()
        assert processes[1].poll() is None  # ignoring SIGTERM, within the delay
        runner.workers["t-1"].stopped -= 31
        runner._early_terminate()
        assert processes[1].wait(timeout=30) == -signal.SIGKILL
        runner._reap()
        assert runner.workers == {} and [t["state"] for t in state_of(tmp_path / "runs")] == ["killed", "killed"]
        assert runner.ended_unfinished == 2  # the live line counts them done: none is still to run
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_a_trial_that_died_without_a_word_crashed_one_that_ended_with_an_error_failed(tmp_path):
    """W&B's states, as the report names the same runs: killed by a signal (out of memory) with its record still
    saying running is `crashed`; a run that recorded its error and exited 1 is `failed`."""
    from blueberry.sweep.controller import collect
    from blueberry.sweep.state import Trial

    log = tmp_path / "t.log"
    log.write_text("")
    cases = [("a", "running", -9, "crashed"), ("b", "failed", 1, "failed")]
    cases.append(("c", "running", 2, "failed"))  # an earlier attempt's record: this one exited 2 before its own
    for run_id, recorded, returncode, expected in cases:
        (tmp_path / "exp" / run_id).mkdir(parents=True)
        (tmp_path / "exp" / run_id / "status.json").write_text(json.dumps({"state": recorded}))
        trial = Trial(run_id=run_id, params={}, state="running")
        collect(trial, tmp_path, "val/loss", returncode, log)
        assert trial.state == expected


def test_early_termination_judges_with_the_histories_of_every_running_trial(tmp_path, monkeypatch):
    """Hyperband's bands come from every running run's history, as W&B's server sees them all: a trial another
    `blueberry sweep` runs on the same sweep counts too, not only this controller's own."""
    from types import SimpleNamespace

    import blueberry.sweep.controller as controller
    from blueberry.sweep.controller import plan
    from blueberry.sweep.state import Trial
    from blueberry.tracking.record import RunRecord, claim_run_dir

    path = queue_sweep(tmp_path, [0.01])
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "early_terminate": {"type": "hyperband", "min_iter": 1}}))
    sweep = load_sweep(path)
    runner = SweepRunner(sweep, tmp_path / "runs", log=lambda line: None)
    (params,) = plan(sweep, None)
    runner.state.put(Trial(run_id="theirs", params=params, state="running", worker="1:other-host"))
    claimed = claim_run_dir(tmp_path / "runs", params["experiment"], "theirs")
    RunRecord(claimed.path, {"run_id": "theirs"}).log({"val/loss": 1.5}, 3)
    seen = {}
    real = controller.engine()
    judge = SimpleNamespace(
        RunState=real.RunState, SweepRun=real.SweepRun, stop_runs=lambda config, runs: seen.update(runs=runs) or []
    )
    monkeypatch.setattr(controller, "engine", lambda: judge)
    runner._early_terminate()
    ((run,),) = [seen["runs"]]
    assert run.name == "theirs" and run.history == [{"_step": 3, "val/loss": 1.5}]
    claimed.release()


def test_a_stopped_trial_its_dead_controller_left_running_is_waited_for_and_killed(tmp_path, monkeypatch):
    """Early termination stopped a trial, then its controller died within the kill delay: the next controller
    adopts the still-running trial (its GPU stays counted), SIGKILLs it after the delay, and runs nothing again."""
    import blueberry.sweep.controller as controller
    from blueberry.sweep.controller import plan
    from blueberry.sweep.state import Trial

    path = queue_sweep(tmp_path, [0.01])
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "early_terminate": {"type": "hyperband", "min_iter": 1}}))
    sweep = load_sweep(path)
    (params,) = plan(sweep, None)
    program = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
    program += "time.sleep(60)"
    env = {**os.environ, "WANDB_RUN_ID": "stopped"}
    process = subprocess.Popen([sys.executable, "-c", program], env=env, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"up\n"
        runner = SweepRunner(sweep, tmp_path / "runs", log=lambda line: None)
        dead = "999999:1"  # the controller that stopped it, no longer alive
        runner.state.put(Trial(run_id="stopped", params=params, state="killed", pid=process.pid, worker=dead))
        monkeypatch.setattr(controller, "EARLY_STOP_EVERY_S", 0.0)
        monkeypatch.setenv("WANDB_AGENT_KILL_DELAY", "0")
        state = runner.run()
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert [(t.run_id, t.state, t.pid) for t in state.trials] == [("stopped", "killed", None)]
        assert not (tmp_path / "runs" / params["experiment"]).exists()  # never launched again
    finally:
        process.kill()
        process.wait()
