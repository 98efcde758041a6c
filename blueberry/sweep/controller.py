"""`blueberry sweep`: W&B's sweep engine proposes, trials run as `wandb agent` would run them, offline.

Loop: claim a trial under the sweep's lock — one left unfinished by a controller that died, else a new
proposal of `sweeps.next_run` (every earlier trial passed back, so grid de-duplicates and bayes learns) —
→ launch it in its own process → read its run record → feed the result back. Several controllers on one
sweep share that queue (blueberry.sweep.state): each trial is run by exactly one of them. Early
termination (`early_terminate:`) asks `sweeps.stop_runs` about running trials.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blueberry.fileio import is_number, read_json
from blueberry.gpu_monitor import nvidia_driver_loaded, unpinned_device_names, visible_device_entries
from blueberry.overrides import leaf_paths, value_at
from blueberry.sweep.config import Sweep, engine
from blueberry.sweep.launch import build_trial, plain, trials_path
from blueberry.sweep.progress import SweepProgress
from blueberry.sweep.state import TERMINAL, SweepState, Trial, this_worker, worker_alive
from blueberry.terminal import stop_signals_raise
from blueberry.threads import usable_cores
from blueberry.tracking import read_metrics
from blueberry.tracking.record import RecordError

POLL_S = 0.5
EARLY_STOP_EVERY_S = 5.0
AGENT_KILL_DELAY_S = 30  # wandb_agent.Agent.KILL_DELAY
SWEEPS_DIR = "_sweeps"


class Orphan:
    """A trial process left running by a killed sweep: polled by pid, like a Popen we no longer own."""

    def __init__(self, pid: int, run_id: str):
        self.pid = pid
        self.run_id = run_id

    def poll(self) -> int | None:
        """None while the trial's process lives; 0 once it is gone (its run record says how it ended)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return 0
        # A zombie (nobody reaps orphans in some containers) has exited; a reused pid is another process. The
        # trial is known by the WANDB_RUN_ID it was started with: its command line names the run only in some
        # sweep commands (${args_json_file} does, ${args} does not).
        state = stat.rsplit(")", 1)[-1].split()[0]
        return 0 if state in ("Z", "X") or self._environ().get("WANDB_RUN_ID") != self.run_id else None

    def device(self) -> str | None:
        """The GPU it was pinned to (its CUDA_VISIBLE_DEVICES), where /proc shows its environment."""
        return self._environ().get("CUDA_VISIBLE_DEVICES")

    def _environ(self) -> dict[str, str]:
        """The environment the process started with ({} where /proc does not show it)."""
        try:
            entries = Path(f"/proc/{self.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return {}
        return dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 0)
        while self.poll() is None:
            if timeout is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(POLL_S)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class Worker:
    trial: Trial
    process: subprocess.Popen | Orphan
    log: object
    log_path: Path
    device: str | None = None  # the GPU the trial was pinned to (None: no GPU, or unknown)
    started: float = field(default_factory=time.monotonic)
    stopped: float | None = None  # when early termination sent it SIGTERM


def sweep_dir(runs_root: Path, sweep: Sweep) -> Path:
    return Path(runs_root) / SWEEPS_DIR / sweep.sweep_id


def trial_budget(sweep: Sweep, count: int | None) -> int | None:
    """Most trials this sweep may hold in all (across resumes): the smaller of --count and run_cap."""
    caps = [c for c in (count, sweep.run_cap) if c is not None]
    return min(caps) if caps else None


def engine_runs(trials: list[Trial]) -> list:
    """Our trials as the engine's SweepRuns: config in the agent's {"k": {"value": v}} form."""
    sweeps = engine()
    runs = []
    for t in trials:
        state = sweeps.RunState(t.state if t.state != "pending" else "running")
        runs.append(
            sweeps.SweepRun(
                name=t.run_id,
                state=state,
                config={k: {"value": v} for k, v in t.params.items()},
                summary_metrics=t.summary,
                history=t.history,
            )
        )
    return runs


def propose(sweep: Sweep, trials: list[Trial]) -> dict | None:
    """The engine's next parameter set (plain Python), or None when a grid is exhausted."""
    proposal = engine().next_run(sweep.config, engine_runs(trials), validate=False)
    if proposal is None:
        return None
    return plain({key: entry["value"] for key, entry in proposal.config.items()})


def parameter_paths(parameters: dict, prefix: str = "") -> set[str]:
    """Dotted names of a sweep's parameters (nested `parameters:` sections opened)."""
    paths: set[str] = set()
    for name, entry in parameters.items():
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            paths |= parameter_paths(entry["parameters"], f"{prefix}{name}.")
        else:
            paths.add(f"{prefix}{name}")
    return paths


def varying_paths(parameters: dict, prefix: str = "") -> list[str]:
    """Dotted names of a sweep's parameters whose value can differ between its trials (not one `value:`); for a
    choice of sections (`values: [{n_experts: 2, top_k: 1}, …]`), the fields that differ between them."""
    paths: list[str] = []
    for name, entry in parameters.items():
        values = entry.get("values") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            paths += varying_paths(entry["parameters"], f"{prefix}{name}.")
        elif isinstance(values, list) and values and all(isinstance(value, dict) for value in values):
            fields = sorted({field for value in values for field in leaf_paths(value)})
            differ = [f for f in fields if len({json.dumps(value_at(v, f), sort_keys=True) for v in values}) > 1]
            paths += [f"{prefix}{name}.{field}" for field in differ]
        elif isinstance(entry, dict) and "value" not in entry:
            if not isinstance(values, list) or len(values) > 1:  # a distribution, or a choice of several
                paths.append(f"{prefix}{name}")
    return sorted(paths)


def params_problem(sweep: Sweep, trial: Trial) -> str | None:
    """Why a trial's parameters are not a set this sweep's engine proposes (other names), or None. A trial's
    params are opened along the sweep's own nested `parameters:` sections only: a parameter whose values are
    dicts (`values: [{variant: mlp}, …]`) is one parameter."""

    def names(params: dict, section: dict, prefix: str) -> set[str]:
        found: set[str] = set()
        for key, value in params.items():
            entry = section.get(key)
            nested = entry.get("parameters") if isinstance(entry, dict) else None
            if isinstance(nested, dict) and isinstance(value, dict):
                found |= names(value, nested, f"{prefix}{key}.")
            else:
                found.add(f"{prefix}{key}")
        return found

    parameters = sweep.config.get("parameters") or {}
    found, expected = names(trial.params, parameters, ""), parameter_paths(parameters)
    if found != expected:
        return f"{trial.run_id}: parameters {sorted(found)[:5]} are not this sweep's {sorted(expected)[:5]}"
    return None


PREVIEW_TRIALS = 10  # what `--dry-run` shows of a random or bayes sweep with no run_cap or --count
UNTIL_STOPPED = "no run_cap or --count, so it proposes runs until you stop it (Ctrl-C), as `wandb agent` does"


def open_ended(sweep: Sweep, count: int | None) -> bool:
    """A random or bayes sweep with no run_cap and no --count proposes runs until it is stopped, as `wandb agent`
    does."""
    return sweep.method != "grid" and trial_budget(sweep, count) is None


def plan(sweep: Sweep, count: int | None) -> list[dict]:
    """The parameter sets a fresh sweep would run (grid: all of them; random/bayes: the first proposals)."""
    budget = PREVIEW_TRIALS if open_ended(sweep, count) else trial_budget(sweep, count)
    trials: list[Trial] = []
    while budget is None or len(trials) < budget:
        params = propose(sweep, trials)
        if params is None:
            break
        trials.append(Trial(run_id=f"planned-{len(trials)}", params=params, state="finished"))
    return [t.params for t in trials]


def find_record(runs_root: Path, run_id: str) -> Path | None:
    """The run record a trial wrote (runs/<experiment>/<run_id>/), whatever experiment its spec named: its newest
    attempt, `<run_id>-N` with the highest N where a run of this id failed before (a trial run again after its
    sweep's state was moved aside makes a new attempt, as claim_run_dir numbers them)."""
    attempt = re.compile(rf"{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for status in Path(runs_root).glob(f"*/{glob.escape(run_id)}*/status.json"):
        match = attempt.fullmatch(status.parent.name)
        if match:
            found.append((int(match.group(1) or 1), str(status.parent)))
    return Path(max(found)[1]) if found else None


def metric_rows(run_dir: Path, metric: str) -> list[dict]:
    """The run's `metric` rows as the engine reads history; RecordError if its metrics.jsonl is malformed."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = read_metrics(path)
    return [{"_step": r["step"], metric: r[metric]} for r in rows if is_number(r.get(metric))]


def collect(trial: Trial, runs_root: Path, metric: str, returncode: int | None, log_path: Path) -> None:
    """Fill a finished trial's state, reason, summary and history from its run record. An unreadable record
    fails the trial with the reason; the sweep goes on."""
    run_dir = find_record(runs_root, trial.run_id)
    status, unreadable = {}, None
    if run_dir is not None:
        trial.run_dir = str(run_dir)
        status = _read_json(run_dir / "status.json")
        summary = _read_json(run_dir / "summary.json")
        trial.summary = {k: v for k, v in summary.items() if is_number(v)}
        try:
            trial.history = metric_rows(run_dir, metric)
        except (OSError, UnicodeDecodeError, RecordError) as exc:
            unreadable = f"run record unreadable: {exc}"
    if returncode == 0 and status.get("state") == "finished" and unreadable is None:
        trial.state, trial.reason = "finished", None
    elif trial.state != "killed":
        # W&B's words: a run that ended with an error failed; one whose process died without a word (a signal, out
        # of memory) crashed. A record still saying running alone proves nothing: it may be an earlier attempt's,
        # where this one failed before writing its own.
        died = returncode is not None and (returncode < 0 or (returncode > 128 and status.get("state") == "running"))
        trial.state = "crashed" if died else "failed"
        reason = status.get("reason") if isinstance(status.get("reason"), str) else None
        trial.reason = unreadable or reason or f"exit code {returncode}: {_tail(log_path)}"


class SweepRunner:
    def __init__(self, sweep: Sweep, runs_root: str | Path, count: int | None = None, parallel: int = 1, log=print):
        self.sweep = sweep
        self.runs_root = Path(runs_root)
        self.dir = sweep_dir(self.runs_root, sweep)
        self.state = SweepState(
            self.dir / "state.json", sweep.sweep_id, sweep.name, check=lambda t: params_problem(sweep, t)
        )
        self.budget = trial_budget(sweep, count)
        self.parallel = max(1, parallel)
        self.metric = (sweep.config.get("metric") or {}).get("name", "val/loss")
        self.workers: dict[str, Worker] = {}
        self.devices = visible_cuda_devices()
        total = len(plan(sweep, count)) if sweep.method == "grid" else self.budget
        self.progress = SweepProgress(sweep.name, total, self.parallel, log=log)
        self.log = self.progress.write  # trial lines above the live progress line, never through it
        self.durations: list[float] = []  # of the trials this controller saw finish
        self.ended_unfinished = 0  # trials this controller saw end otherwise (stopped, failed, crashed)

    def run(self) -> SweepState:
        self.me = this_worker()
        self.resumable: list[Trial] = []  # ours to run again: an orphaned trial that died unfinished
        with self.state.locked() as state:
            left, others = state.claimable(), {t.worker for t in state.unfinished() if worker_alive(t.worker)}
        if left:
            self.log(f"resuming sweep {self.sweep.sweep_id}: {len(left)} unfinished trial(s) first")
        if others:
            pids = ", ".join(sorted(w.split(":")[0] for w in others))
            self.log(f"joining sweep {self.sweep.sweep_id}: another `blueberry sweep` works on it (pid {pids})")
        for _, why in self.state.unreadable:
            self.log(f"  sweep state entry unreadable, left as it is: {why}")
        adopted = self._adopt_stopping()
        ended_before = sum(t.state in TERMINAL for t in self.state.trials) - adopted  # those counted once reaped
        try:
            with stop_signals_raise():  # `kill` and a closed terminal stop the trials cleanly, like Ctrl-C
                self._loop(ended_before)
        except KeyboardInterrupt:
            self._stop_all("interrupted")
            raise
        finally:
            self.progress.close()
        self.state.load()
        return self.state

    def _loop(self, ended_before: int) -> None:
        last_early_check = time.monotonic()
        while True:
            while len(self.workers) < self.parallel:
                trial = self.resumable.pop(0) if self.resumable else self._new_trial()
                if trial is None:
                    break
                self._start(trial)
            if not self.workers and not self._others_working():
                break
            time.sleep(POLL_S)
            self._reap()
            self._show_progress(ended_before)
            if "early_terminate" in self.sweep.config and time.monotonic() - last_early_check > EARLY_STOP_EVERY_S:
                self._early_terminate()
                last_early_check = time.monotonic()

    def _show_progress(self, ended_before: int) -> None:
        number = {t.run_id: i + 1 for i, t in enumerate(self.state.trials)}
        running = [(number.get(run_id, 0), run_id, find_record(self.runs_root, run_id)) for run_id in self.workers]
        self.progress.update(running, self.durations, ended_before, self.ended_unfinished)

    def _others_working(self) -> bool:
        """Another live controller still runs trials of this sweep: wait, to take them over if it dies."""
        self.state.load()  # state.json is replaced atomically: a read without the lock sees a whole file
        return any(t.worker != self.me and worker_alive(t.worker) for t in self.state.unfinished())

    def _new_trial(self) -> Trial | None:
        """Claim the next trial, atomically under the sweep's lock: an unfinished one whose controller died,
        else a new proposal (planned before launched: a kill from here on cannot lose or repeat it)."""
        with self.state.locked() as state:
            left = state.claimable()
            if left:
                trial = left[0]
                trial.worker = self.me
                state.save()
                return trial
            if self.budget is not None and len(state.trials) + len(state.unreadable) >= self.budget:
                return None
            params = propose(self.sweep, self._all_trials())
            if params is None:
                return None
            trial = Trial(run_id=state.next_run_id(), params=params, worker=self.me)
            state.trials.append(trial)
            state.save()
            return trial

    def _all_trials(self) -> list[Trial]:
        """The state's trials, ours as we hold them now (fresher than the file for their history)."""
        ours = {w.trial.run_id: w.trial for w in self.workers.values()}
        return [ours.get(t.run_id, t) for t in self.state.trials]

    def _start(self, trial: Trial) -> None:
        existing = find_record(self.runs_root, trial.run_id)
        if existing and _read_json(existing / "status.json").get("state") == "finished":
            # It finished, but the sweep died before recording that: adopt, never run twice.
            collect(trial, self.runs_root, self.metric, 0, Path(os.devnull))
            self.state.put(trial)
            self.log(f"  {trial.run_id}: already finished, adopted")
            return
        log_path = self.dir / "logs" / f"{trial.run_id}.log"
        orphan = Orphan(trial.pid, trial.run_id) if trial.pid else None
        if orphan is not None and orphan.poll() is None:
            # Still running from the sweep that was killed: wait for it (on its GPU) rather than run it twice.
            self.workers[trial.run_id] = Worker(trial, orphan, None, log_path, orphan.device())
            self.log(f"  {trial.run_id}: still running from the interrupted sweep (pid {trial.pid}), waiting")
            return
        # The user's environment as it is: a trial's W&B files go where a plain `blueberry run` puts them
        env = dict(os.environ)
        launch = build_trial(
            self.sweep.config["command"],
            trial.params,
            trial.run_id,
            self.dir,
            self.sweep.sweep_id,
            self.sweep.config.get("program"),
            env,
        )
        device = self._least_busy_device()
        launch.env.update(self._offline_env(device))
        for key in ("WANDB_SWEEP_ID",):
            launch.env.pop(key, None)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a", encoding="utf-8")
        trial.state = "running"
        self.state.put(trial)
        self.log(f"  {trial.run_id}: {json.dumps(trial.params, sort_keys=True)}")
        # Own process group and a closed stdin, as the W&B agent does: Ctrl-C reaches us, and we stop the trial.
        process = subprocess.Popen(
            launch.argv,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        trial.pid = process.pid
        self.state.put(trial)
        self.workers[trial.run_id] = Worker(trial, process, log_file, log_path, device)

    def _least_busy_device(self) -> str | None:
        """The visible GPU running the fewest of our trials (the first of those), or None without GPUs."""
        if not self.devices:
            return None
        busy = Counter(worker.device for worker in self.workers.values())
        return min(self.devices, key=lambda device: busy[device])

    def _offline_env(self, device: str | None) -> dict:
        """What we add to the agent's environment: offline W&B, our runs root, the sweep name, devices.

        No WANDB_RUN_GROUP: runs honour it (W&B's precedence), and a trial's group stays its experiment.
        """
        env = {
            "PATH": trials_path(),
            "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
            "BLUEBERRY_RUNS_ROOT": str(self.runs_root),
            "BLUEBERRY_SWEEP_ID": self.sweep.sweep_id,
            "BLUEBERRY_SWEEP_NAME": self.sweep.name,
            # what a trial's name says beyond the spec's own (runner.display_name)
            "BLUEBERRY_SWEEP_VARIES": ",".join(varying_paths(self.sweep.config.get("parameters") or {})),
        }
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device  # one GPU per trial
        elif self.parallel > 1:
            env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // self.parallel))  # no oversubscription
        return env

    def _reap(self) -> None:
        for run_id, worker in list(self.workers.items()):
            returncode = worker.process.poll()
            if returncode is None:
                continue
            if worker.log:
                worker.log.close()
            del self.workers[run_id]
            if isinstance(worker.process, Orphan):  # its exit code is lost: the run record decides
                record = find_record(self.runs_root, run_id)
                stopped = worker.trial.state == "killed"  # by early termination: judged, never run again
                if not stopped and (record is None or _read_json(record / "status.json").get("state") != "finished"):
                    worker.trial.pid, worker.trial.state = None, "pending"
                    self.state.put(worker.trial)
                    self.resumable.append(worker.trial)  # it died unfinished: run it (again)
                    continue
                returncode = 0
            collect(worker.trial, self.runs_root, self.metric, returncode, worker.log_path)
            if worker.trial.state == "finished":
                self.durations.append(time.monotonic() - worker.started)
            else:  # ended all the same: not among the trials still to run
                self.ended_unfinished += 1
            worker.trial.pid = None
            self.state.put(worker.trial)
            value = worker.trial.summary.get(self.metric)
            shown = f"{self.metric}={value:.4f}" if isinstance(value, float) else worker.trial.reason
            self.log(f"  {run_id}: {worker.trial.state} ({shown})")

    def _adopt_stopping(self) -> int:
        """Trials early termination stopped that still run, left by a controller that died: waited for (on their
        GPU) and SIGKILLed after the delay, as their own controller would have; how many."""
        adopted = 0
        for trial in self.state.trials:
            if trial.state == "killed" and trial.pid and not worker_alive(trial.worker):
                orphan = Orphan(trial.pid, trial.run_id)
                if orphan.poll() is None:
                    log_path, now = self.dir / "logs" / f"{trial.run_id}.log", time.monotonic()
                    self.workers[trial.run_id] = Worker(trial, orphan, None, log_path, orphan.device(), stopped=now)
                    adopted += 1
        return adopted

    def _early_terminate(self) -> None:
        running = {w.trial.run_id for w in self.workers.values()}
        trials = self._all_trials()
        for trial in trials:  # every running trial, other controllers' too: W&B's server sees all their histories
            run_dir = find_record(self.runs_root, trial.run_id) if trial.state == "running" else None
            if run_dir is not None:
                try:
                    trial.history = metric_rows(run_dir, self.metric)
                except (OSError, UnicodeDecodeError, RecordError):
                    pass  # judged on the rows read before; collect() reports an unreadable record at the end
        for run in engine().stop_runs(self.sweep.config, engine_runs(trials)):
            if run.name in running and self.workers[run.name].stopped is None:
                worker = self.workers[run.name]
                worker.trial.state, worker.trial.reason = "killed", "early-terminated by the sweep's early_terminate"
                self.state.put(worker.trial)  # judged for good, whatever happens to this controller next
                worker.process.send_signal(signal.SIGTERM)
                worker.stopped = time.monotonic()
                self.log(f"  {run.name}: early-terminated")
        # As `wandb agent` does: SIGKILL a stopped trial still running after WANDB_AGENT_KILL_DELAY seconds (30)
        from wandb import env as wandb_env

        delay = wandb_env.get_agent_kill_delay(AGENT_KILL_DELAY_S)  # None where it does not parse: ours
        delay = AGENT_KILL_DELAY_S if delay is None else delay
        for worker in self.workers.values():
            if worker.stopped is not None and time.monotonic() - worker.stopped > delay:
                worker.process.kill()

    def _stop_all(self, why: str) -> None:
        """Stop running trials; they stay unfinished in the state, so the same command re-runs them."""
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
            if worker.log:
                worker.log.close()
            self.state.put(worker.trial)
        self.log(f"sweep {why}: run the same command again to resume")


def visible_cuda_devices() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them: what the trials are pinned to.

    Under CUDA_VISIBLE_DEVICES=2,3 the trials get "2" and "3", never "0" and "1" (GPUs we were not given).
    """
    count, entries = _gpu_count(), visible_device_entries()
    if count == 0:  # no GPU to pin trials to: NVML is not asked again for names
        return []
    if entries is None:  # on a MIG host, the slices' MIG-<uuid>: an index would name the whole board
        return (unpinned_device_names() or [str(index) for index in range(count)])[:count]
    return entries[:count]  # CUDA stops at the first bad entry


def _gpu_count() -> int:
    """CUDA's count of the GPUs this process may use; 0 at once where no NVIDIA driver is loaded (a CPU machine:
    the controller then never imports torch)."""
    if not nvidia_driver_loaded():
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _read_json(path: Path) -> dict:
    return read_json(path) or {}


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    return " | ".join(text[-lines:]) or "no output"
