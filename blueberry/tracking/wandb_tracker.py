"""Weights & Biases behind the Tracker interface.

The mode is decided before `wandb.init` and never changed in-process: a failed online init
poisons a later offline one (wandb/wandb#9865), so we never "try online, fall back".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODES = ("online", "offline", "disabled")
# Metrics whose W&B summary is {min|max, last} (define_metric); a final summary write would flatten it.
SUMMARISED = {"val/loss": "min,last", "val/perplexity": "min,last", "val/accuracy": "max,last"}


def has_api_key() -> bool:
    """An API key in the environment or the netrc file (no network call)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:  # a private helper: if it moves or fails, assume no key
        return False


def resolve_mode(requested: str) -> tuple[str, str]:
    """(mode, why). Online only with an API key; otherwise offline."""
    source = "spec"
    if requested == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("dryrun",):
            env = "offline"
        if env in MODES:
            requested, source = env, "WANDB_MODE"
        else:
            return ("online", "API key found") if has_api_key() else ("offline", "no API key")
    if requested == "online" and not has_api_key():
        return "offline", f"online requested by {source} but no API key (set WANDB_API_KEY or `wandb login`)"
    return requested, f"requested by {source}"


class WandbTracker:
    """Logs to a W&B run whose files live inside the local run record."""

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
        resume: bool = False,
    ):
        import wandb

        self.mode = mode
        self.run_id = os.environ.get("WANDB_RUN_ID") or run_id
        self.run = wandb.init(
            dir=str(run_dir),
            mode=mode,
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            id=self.run_id,
            # A resumed run continues the same W&B run: online it appends to it; offline each attempt is
            # its own offline-run-* directory and `wandb sync` replays them in order into one run.
            resume="allow" if resume else None,
            tags=tags,
            notes=notes,
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, save_code=False),
        )
        # One step axis (the optimizer step) for every metric; val metrics keep best and last.
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        for metric, summary in SUMMARISED.items():
            self.run.define_metric(metric, step_metric="trainer/step", summary=summary)

    @property
    def offline_dir(self) -> str | None:
        return None if self.mode == "disabled" else str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({"trainer/step": step, **metrics})

    def log_checkpoint(self, path: Path, step: int) -> None:
        """Log a checkpoint as a `model` artifact version aliased `latest` (offline: staged for `wandb sync`)."""
        import wandb

        name = f"checkpoint-{self.run_id}"[:128]  # W&B caps artifact names at 128 characters
        artifact = wandb.Artifact(name, type="model", metadata={"step": step})
        # "mutable" makes W&B stage its own copy: keep-last-K may delete this file before an
        # asynchronous (or, offline, a much later) upload reads it, which "immutable" would break.
        artifact.add_file(str(path), name="checkpoint.pt", policy="mutable")
        self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in SUMMARISED:
                self.run.summary[key] = value

    def finish(self, state: str, reason: str | None = None) -> None:
        import wandb

        if reason:
            self.run.summary["status/reason"] = reason
        self.run.finish(exit_code=0 if state == "finished" else 1)
        wandb.teardown()  # stop wandb-core so the process exits promptly
