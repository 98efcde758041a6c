"""`blueberry sweep`: W&B's sweep engine proposes, trials run as `wandb agent` would run them, offline.

Loop: propose with `sweeps.next_run` (every earlier trial passed back, so grid de-duplicates and bayes
learns) → record the trial in the sweep state → launch it in its own process → read its run record →
feed the result back. Early termination (`early_terminate:`) asks `sweeps.stop_runs` about running trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blueberry.fileio import read_json
from blueberry.sweep.config import Sweep, engine
from blueberry.sweep.launch import build_trial, plain
from blueberry.sweep.state import SweepState, Trial
from blueberry.tracking import read_metrics

POLL_S = 0.5
EARLY_STOP_EVERY_S = 5.0
SWEEPS_DIR = "_sweeps"


class Orphan:
    """A trial process left running by a killed sweep: polled by pid, like a Popen we no longer own."""

    def __init__(self, pid: int, run_id: str):
        self.pid = pid
        self.run_id = run_id

    def poll(self) -> int | None:
        """None while the trial's process lives; 0 once it is gone (its run record says how it ended)."""
        proc = Path(f"/proc/{self.pid}")
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return 0
        # A zombie (nobody reaps orphans in some containers) has exited; a reused pid is another process.
        state = stat.rsplit(")", 1)[-1].split()[0]
        return 0 if state in ("Z", "X") or self.run_id not in cmdline else None

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


def plan(sweep: Sweep, count: int | None) -> list[dict]:
    """The parameter sets a fresh sweep would run (grid: all of them; random/bayes: the first proposals)."""
    budget = trial_budget(sweep, count)
    if budget is None and sweep.method != "grid":
        budget = 10
    trials: list[Trial] = []
    while budget is None or len(trials) < budget:
        params = propose(sweep, trials)
        if params is None:
            break
        trials.append(Trial(run_id=f"planned-{len(trials)}", params=params, state="finished"))
    return [t.params for t in trials]


def find_record(runs_root: Path, run_id: str) -> Path | None:
    """The run record a trial wrote (runs/<experiment>/<run_id>/), whatever experiment its spec named."""
    matches = sorted(Path(runs_root).glob(f"*/{run_id}/status.json"))
    return matches[-1].parent if matches else None


def collect(trial: Trial, runs_root: Path, metric: str, returncode: int | None, log_path: Path) -> None:
    """Fill a finished trial's state, reason, summary and history from its run record."""
    run_dir = find_record(runs_root, trial.run_id)
    status = {}
    if run_dir is not None:
        trial.run_dir = str(run_dir)
        status = _read_json(run_dir / "status.json")
        summary = _read_json(run_dir / "summary.json")
        trial.summary = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trial.history = [
            {"_step": r["step"], metric: r[metric]}
            for r in read_metrics(run_dir / "metrics.jsonl")
            if isinstance(r.get(metric), (int, float))
        ]
    if returncode == 0 and status.get("state") == "finished":
        trial.state, trial.reason = "finished", None
    elif trial.state != "killed":
        trial.state = "failed"
        trial.reason = status.get("reason") or f"exit code {returncode}: {_tail(log_path)}"


class SweepRunner:
    def __init__(self, sweep: Sweep, runs_root: str | Path, count: int | None = None, parallel: int = 1, log=print):
        self.sweep = sweep
        self.runs_root = Path(runs_root)
        self.dir = sweep_dir(self.runs_root, sweep)
        self.state = SweepState(self.dir / "state.json", sweep.sweep_id, sweep.name)
        self.budget = trial_budget(sweep, count)
        self.parallel = max(1, parallel)
        self.metric = (sweep.config.get("metric") or {}).get("name", "val/loss")
        self.log = log
        self.workers: dict[str, Worker] = {}
        self.gpus = _gpu_count()

    def run(self) -> SweepState:
        self.resumable = self.state.unfinished()  # launched by an earlier, interrupted invocation
        if self.resumable:
            self.log(f"resuming sweep {self.sweep.sweep_id}: {len(self.resumable)} unfinished trial(s) first")
        last_early_check = time.monotonic()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops trials cleanly, like Ctrl-C
        try:
            while True:
                while len(self.workers) < self.parallel:
                    trial = self.resumable.pop(0) if self.resumable else self._new_trial()
                    if trial is None:
                        break
                    self._start(trial)
                if not self.workers:
                    break
                time.sleep(POLL_S)
                self._reap()
                if "early_terminate" in self.sweep.config and time.monotonic() - last_early_check > EARLY_STOP_EVERY_S:
                    self._early_terminate()
                    last_early_check = time.monotonic()
        except KeyboardInterrupt:
            self._stop_all("interrupted")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.state

    def _new_trial(self) -> Trial | None:
        if self.budget is not None and len(self.state.trials) >= self.budget:
            return None
        params = propose(self.sweep, self.state.trials)
        if params is None:
            return None
        trial = Trial(run_id=self.state.next_run_id(), params=params)
        self.state.trials.append(trial)
        self.state.save()  # planned before launched: a kill from here on cannot lose or repeat it
        return trial

    def _start(self, trial: Trial) -> None:
        existing = find_record(self.runs_root, trial.run_id)
        if existing and _read_json(existing / "status.json").get("state") == "finished":
            # It finished, but the sweep died before recording that: adopt, never run twice.
            collect(trial, self.runs_root, self.metric, 0, Path(os.devnull))
            self.state.save()
            self.log(f"  {trial.run_id}: already finished, adopted")
            return
        log_path = self.dir / "logs" / f"{trial.run_id}.log"
        if trial.pid and Orphan(trial.pid, trial.run_id).poll() is None:
            # Still running from the sweep that was killed: wait for it rather than run it twice.
            self.workers[trial.run_id] = Worker(trial, Orphan(trial.pid, trial.run_id), None, log_path)
            self.log(f"  {trial.run_id}: still running from the interrupted sweep (pid {trial.pid}), waiting")
            return
        env = {**os.environ, "WANDB_DIR": str(self.dir)}
        launch = build_trial(
            self.sweep.config["command"],
            trial.params,
            trial.run_id,
            self.dir,
            self.sweep.sweep_id,
            self.sweep.config.get("program"),
            env,
        )
        launch.env.update(self._offline_env(len(self.workers)))
        for key in ("WANDB_SWEEP_ID",):
            launch.env.pop(key, None)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a", encoding="utf-8")
        trial.state = "running"
        self.state.save()
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
        self.state.save()
        self.workers[trial.run_id] = Worker(trial, process, log_file, log_path)

    def _offline_env(self, slot: int) -> dict:
        """What we add to the agent's environment: offline W&B, our runs root, the sweep name, devices.

        No WANDB_RUN_GROUP: runs honour it (W&B's precedence), and a trial's group stays its experiment.
        """
        env = {
            # The `blueberry` that runs the sweep runs its trials, even from an unactivated venv.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
            "BLUEBERRY_RUNS_ROOT": str(self.runs_root),
            "BLUEBERRY_SWEEP_ID": self.sweep.sweep_id,
            "BLUEBERRY_SWEEP_NAME": self.sweep.name,
        }
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)  # one GPU per worker
        elif self.parallel > 1:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))  # no oversubscription
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
                if record is None or _read_json(record / "status.json").get("state") != "finished":
                    worker.trial.pid, worker.trial.state = None, "pending"
                    self.resumable.append(worker.trial)  # it died unfinished: run it (again)
                    continue
                returncode = 0
            collect(worker.trial, self.runs_root, self.metric, returncode, worker.log_path)
            worker.trial.pid = None
            self.state.save()
            value = worker.trial.summary.get(self.metric)
            shown = f"{self.metric}={value:.4f}" if isinstance(value, float) else worker.trial.reason
            self.log(f"  {run_id}: {worker.trial.state} ({shown})")

    def _early_terminate(self) -> None:
        running = {w.trial.run_id for w in self.workers.values()}
        for worker in self.workers.values():
            run_dir = find_record(self.runs_root, worker.trial.run_id)
            if run_dir is not None:
                worker.trial.history = [
                    {"_step": r["step"], self.metric: r[self.metric]}
                    for r in read_metrics(run_dir / "metrics.jsonl")
                    if self.metric in r
                ]
        for run in engine().stop_runs(self.sweep.config, engine_runs(self.state.trials)):
            if run.name in running:
                worker = self.workers[run.name]
                worker.trial.state, worker.trial.reason = "killed", "early-terminated by the sweep's early_terminate"
                worker.process.send_signal(signal.SIGTERM)
                self.log(f"  {run.name}: early-terminated")

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
        self.state.save()
        self.log(f"sweep {why}: run the same command again to resume")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _gpu_count() -> int:
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
