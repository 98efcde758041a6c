"""Weights & Biases behind the Tracker interface.

The mode is decided before `wandb.init` and never changed in-process: a failed online init
poisons a later offline one (wandb/wandb#9865), so we never "try online, fall back".
"""

from __future__ import annotations

import secrets
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blueberry.spec import safe_name
from blueberry.tracking.schema import TAG_LIMIT
from blueberry.tracking.wandb_settings import left_to_us

# Metrics whose W&B summary is {min|max, last} (define_metric); a final summary write would flatten it.
SUMMARISED = {"val/loss": "min,last", "val/perplexity": "min,last", "val/accuracy": "max,last"}
ID_ALPHABET = string.ascii_lowercase + string.digits


class WandbUnavailable(RuntimeError):
    """`wandb.init` failed: W&B unreachable, the login refused, a project not ours, wandb-core missing."""


def new_run_id(name: str) -> str:
    """A fresh W&B run id: the readable run name plus 8 random base-36 characters (as W&B's own ids).

    Never derived from the spec alone: the same spec run on another machine, by a colleague or after
    `rm -rf runs` must not write into an earlier W&B run.
    """
    suffix = "".join(secrets.choice(ID_ALPHABET) for _ in range(8))
    return f"{safe_name(name)[:64]}-{suffix}"


class WandbTracker:
    """Logs to a W&B run whose files live inside the local run record.

    `resume`: W&B's resume policy for `run_id`: "never" for a fresh run (a taken id is an error, never a
    merge), "must" or "allow" when continuing an earlier attempt (runner.wandb_resume_policy).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        mode: str,
        project: str,
        entity: str | None,
        group: str,
        job_type: str,
        name: str,
        run_id: str,
        tags: list[str],
        notes: str | None,
        config: dict[str, Any],
        dir: str | None = None,
        resume: str = "never",
        system_metrics: bool | None = None,
        log: Callable[[str], None] = print,
    ):
        import wandb

        self.mode = mode
        self.run_id = run_id
        self.continues = resume in ("allow", "must")  # an earlier attempt of this W&B run exists
        self.say = log
        # lowest val/loss of a checkpoint so far (a resume sets the checkpoint's): its checkpoint got the `best` alias
        self.best_val_loss = float("inf")
        self._last_val: tuple[int, float] | None = None  # (step, val/loss) of the latest evaluation
        # W&B's files next to the run record unless the spec or WANDB_DIR says otherwise (wandb_settings)
        self.dir = Path(dir) if dir else Path(run_dir)
        try:
            self.run = wandb.init(
                dir=str(self.dir),
                mode=mode,
                project=project,
                entity=entity,
                group=group,
                job_type=job_type,
                name=name,
                id=run_id,
                # Online a resumed run appends to the same W&B run; offline each attempt is its own
                # offline-run-* directory and `wandb sync` replays them in order into one run.
                resume=resume,
                tags=[tag[:TAG_LIMIT] for tag in tags],
                notes=notes,
                config=config,
                reinit="finish_previous",
                # quiet, not silent: W&B still prints its warnings and errors. System metrics (CPU, memory,
                # GPU, network) are W&B's own sampler; the run record's energy and cost come from ours (NVML).
                # Ours unless WANDB_CONSOLE / WANDB_SAVE_CODE (or a settings file) say otherwise: no console copy
                # (the run record keeps the metrics; W&B would store every progress-bar redraw) and no copy of the
                # main script (the spec and git commit in the run record say what ran).
                settings=wandb.Settings(
                    quiet=True,
                    **left_to_us({"console": "off", "save_code": False}),
                    **({} if system_metrics is None else {"x_disable_stats": not system_metrics}),
                ),
            )
        except wandb.errors.Error as exc:  # after W&B's own retries (its init_timeout: 90 s by default)
            raise WandbUnavailable(_init_failure(exc, mode)) from None
        self.url = self.run.url if mode == "online" else None
        if self.url:
            self.say(f"W&B run: {self.url}")
            if self.run.sweep_url:
                self.say(f"W&B sweep: {self.run.sweep_url}")
        # One step axis (the optimizer step) for every metric; val metrics keep best and last.
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        for metric, summary in SUMMARISED.items():
            self.run.define_metric(metric, step_metric="trainer/step", summary=summary)

    @property
    def offline_dir(self) -> str | None:
        return None if self.mode == "disabled" else str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "val/loss" in metrics:
            self._last_val = (step, metrics["val/loss"])
        self.run.log({"trainer/step": step, **metrics})

    def log_checkpoint(self, path: Path, step: int) -> None:
        """Log a checkpoint as a `model` artifact version aliased `latest`, `step-N`, and `best` while its val
        loss is the lowest so far (offline: staged for `wandb sync`)."""
        aliases = ["latest", f"step-{step}"]
        evaluated = self._last_val is not None and self._last_val[0] == step  # else an earlier step's loss
        if evaluated and self._last_val[1] < self.best_val_loss:
            self.best_val_loss = self._last_val[1]
            aliases.append("best")  # W&B moves an alias to the newest version that claims it
        metadata = {"step": step, **({"val/loss": self._last_val[1]} if evaluated else {})}
        self._log_model_file(f"checkpoint-{self.run_id}", path, "checkpoint.pt", metadata, aliases)

    def log_weights(self, state_dict: dict, metadata: dict[str, Any]) -> None:
        """The final weights (a torch state dict) as the run's `model` artifact."""
        import torch

        with tempfile.TemporaryDirectory() as tmp:  # W&B stages its own copy ("mutable"), so this one can go
            path = Path(tmp) / "model.pt"
            torch.save(state_dict, path)
            self._log_model_file(f"model-{self.run_id}", path, "model.pt", metadata, ["latest"])

    def _log_model_file(self, name: str, path: Path, file_name: str, metadata: dict, aliases: list[str]) -> None:
        import wandb

        artifact = wandb.Artifact(name[:128], type="model", metadata=metadata)  # W&B caps names at 128 characters
        # "mutable" makes W&B stage its own copy: keep-last-K may delete this file before an
        # asynchronous (or, offline, a much later) upload reads it, which "immutable" would break.
        artifact.add_file(str(path), name=file_name, policy="mutable")
        self.run.log_artifact(artifact, aliases=aliases)

    def summary(self, values: dict[str, Any]) -> None:
        """One summary update; W&B's own min/last summaries stay, and a missing value (None) is left out. The
        SUMMARISED metrics' values also go in as flat scalars, `final/val_loss` ...: W&B's panels and run
        tables plot a summary number, and `val/loss`'s summary is the {"min", "last"} dict."""
        kept = {k: v for k, v in values.items() if k not in SUMMARISED and v is not None}
        final = {f"final/{k.replace('/', '_')}": v for k, v in values.items() if k in SUMMARISED and v is not None}
        self.run.summary.update({**kept, **final})

    def summarise_history(self, rows: list[dict[str, Any]]) -> None:
        """Set the SUMMARISED metrics' summaries from the whole run's rows: W&B computes them over the rows
        logged in this process, which after a resume are only this attempt's (the earlier attempts' rows are in
        their own segments, or already on the server)."""
        for metric, kinds in SUMMARISED.items():
            values = [row[metric] for row in rows if isinstance(row.get(metric), (int, float))]
            if values:
                best = min if "min" in kinds else max
                self.run.summary[metric] = {kinds.split(",")[0]: best(values), "last": values[-1]}

    def finish(self, state: str, reason: str | None = None, exit_code: int = 0) -> None:
        import wandb

        if reason:
            self.run.summary.update({"status/reason": reason})
        elif self.continues:  # an earlier attempt's reason ("SIGTERM at step 4") is in the summary W&B resumes
            del self.run.summary["status/reason"]  # (online from the server, offline at `wandb sync`): remove it
        self.run.finish(exit_code=exit_code)
        if self.url:
            self.say(f"W&B run {state}: {self.url}")
        wandb.teardown()  # stop wandb-core so the process exits promptly


def wandb_segments(dirs: list[Path], run_id: str) -> list[Path]:
    """The logs `<dir>/wandb/[offline-]run-<time>-<run_id>/run-<run_id>.wandb` of one W&B run, oldest first:
    each attempt of a resumed run writes its own, offline or (what it sent the server) online."""
    found = {p for d in dirs for p in Path(d).glob(f"wandb/*run-*-{run_id}/run-{run_id}.wandb")}
    return sorted(found, key=lambda p: p.parent.name.removeprefix("offline-"))


def _init_failure(exc: Exception, mode: str) -> str:
    """What to tell the user when `wandb.init` failed: W&B's own words, and what to do about it."""
    said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    said = said if len(said) <= 400 else said[:400] + "…"
    if mode == "online":
        advice = "check the network and your login (`wandb login`), or train offline (WANDB_MODE=offline) and "
        advice += "upload the run later with `wandb sync`"
    else:
        advice = "or train without W&B (WANDB_MODE=disabled)"
    return f"W&B could not start the run ({mode}): {said}; {advice}"
