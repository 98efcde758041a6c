"""Checks of what a run is given outside its spec, before anything runs: where its record goes and its W&B id
(and where other commands write their output).

Each failure is a `PreflightError` naming the setting, so `blueberry run` exits 2 with a message instead of a
traceback half-way through setting up the run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from blueberry.prices import PRICE_ENV, PRICE_TABLE_ENV, read_price, read_price_table
from blueberry.spec import RunSpec
from blueberry.tracking.wandb_settings import homeless


class PreflightError(ValueError):
    """A setting outside the spec (runs root, WANDB_RUN_ID, W&B's environment, prices) that the run cannot use."""


def runs_root_for(spec: RunSpec) -> str:
    """Where the run record goes: $BLUEBERRY_RUNS_ROOT (set by `blueberry sweep` for its trials), else the spec's."""
    return os.environ.get("BLUEBERRY_RUNS_ROOT") or spec.tracking.runs_root


def check_writable_dir(directory: str | Path, setting: str) -> None:
    """A directory a command will write into (a runs root, an --out), or the nearest existing directory above
    it, must be a directory this process may write: found out before the work, not after it. `setting`: the
    option or field that named it, for the message."""
    path = Path(directory).expanduser()
    existing = path
    try:  # exists() raises what is not "no such file", e.g. a name longer than the file system allows
        while not existing.exists() and existing != existing.parent:
            if existing.is_symlink():  # a dangling link: mkdir under it fails
                raise PreflightError(f"{setting} '{directory}': {existing} is a broken symbolic link")
            existing = existing.parent
    except OSError as exc:
        raise PreflightError(f"{setting} '{_shown(str(directory))}': {exc.strerror}") from None
    if not existing.is_dir():
        where = "" if existing == path else f" cannot be created: {existing}"
        raise PreflightError(f"{setting} '{directory}'{where} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (nor its existing parent {existing})"
        raise PreflightError(f"{setting} '{directory}'{where} is not writable by this user (or is on a read-only disk)")
    try:  # os.access says yes to root everywhere, even where nothing can be made (/proc, a read-only mount)
        os.rmdir(tempfile.mkdtemp(prefix=".blueberry-write-check-", dir=existing))
    except OSError as exc:
        raise PreflightError(f"{setting} '{directory}': nothing can be made in {existing} ({exc.strerror})") from None


def _shown(text: str, limit: int = 80) -> str:
    """`text` for a message: its first `limit` characters and an ellipsis where it is longer."""
    return text if len(text) <= limit else text[:limit] + "…"


# The run record's directory is named after the run id (plus "-N" for a second attempt): it must fit NAME_MAX.
MAX_RUN_ID_BYTES = 200


def check_wandb_run_id() -> None:
    """WANDB_RUN_ID, when set, must be an id W&B accepts (its own rule: wandb.Settings' run_id validator) and
    short enough to name the run's directory."""
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:  # unset or empty: the runner derives the id from the spec
        return
    shown = _shown(run_id)
    if len(run_id.encode("utf-8", "surrogateescape")) > MAX_RUN_ID_BYTES:
        raise PreflightError(f"WANDB_RUN_ID {shown!r} is longer than {MAX_RUN_ID_BYTES} bytes")
    import wandb

    try:
        wandb.Settings(run_id=run_id)
    except wandb.errors.UsageError as exc:  # wandb_settings.Settings.validate_run_id raises it as is
        reason = str(exc)
        raise PreflightError(f"WANDB_RUN_ID {shown!r} is not a valid W&B run id: {reason}") from None


def preflight(spec: RunSpec, records: bool = True) -> None:
    """Everything about where and under which id `spec` would run that can be checked before it starts.
    `records` False (a torchrun rank other than 0): only what that rank reads itself, its machine's environment;
    the runs root and W&B are rank 0's alone."""
    check_price_variables()
    check_torchrun_variables()
    if not records:
        return
    setting = "BLUEBERRY_RUNS_ROOT" if os.environ.get("BLUEBERRY_RUNS_ROOT") else "tracking.runs_root"
    check_writable_dir(runs_root_for(spec), setting)
    check_wandb_run_id()
    if problem := homeless():  # (W&B starts even for tracking.wandb disabled)
        raise PreflightError(problem)
    if spec.tracking.wandb != "disabled":  # else W&B's settings are not read (wandb_settings.run_settings)
        check_wandb_environment(spec.tracking.wandb_dir)
        check_sweep_parameters(spec)


def check_sweep_parameters(spec: RunSpec) -> None:
    """W&B merges the parameters file `wandb agent` names (WANDB_SWEEP_PARAM_PATH) into the run's config and
    locks it there: a value the run's command line did not give it (a `command:` without `${args_json_file}` or
    `${args}`, or one that sets a swept field itself) would show in W&B as what the run trained with. So the file
    must be one W&B can read, and each value in it the run's own; `blueberry sweep` checks its trials so too."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or os.environ.get("BLUEBERRY_SWEEP_ID"):  # `blueberry sweep` checked every trial before the first
        return
    from wandb.sdk.lib.config_util import dict_from_config_file

    from blueberry.overrides import SpecError, expand_dotted, unreached, value_at

    try:
        params = dict_from_config_file(path, must_exist=True) or {}
    except Exception as exc:  # W&B's reader raises what the file's shape leads it to (ConfigError, yaml's, TypeError)
        raise PreflightError(
            f"WANDB_SWEEP_PARAM_PATH={path}: W&B cannot read it as a sweep's parameters file "
            f"(`name: {{value: …}}` entries): {type(exc).__name__}: {exc}"
        ) from None
    try:
        missed = unreached(params, spec.model_dump(mode="json"), spec)
    except SpecError as exc:  # two keys setting one field
        raise PreflightError(f"WANDB_SWEEP_PARAM_PATH={path}: {exc.problems[0][1]}: {exc.problems[0][2]}") from None
    if missed:
        swept, trained = expand_dotted(params, path), spec.model_dump(mode="json")
        said = ", ".join(f"{p} is {value_at(swept, p)!r} there, {value_at(trained, p)!r} here" for p in missed)
        raise PreflightError(
            f"WANDB_SWEEP_PARAM_PATH={path}: W&B would record the sweep's values as this run's config, but the run "
            f"does not get them ({said}): pass them on its command line (`--overrides ${{args_json_file}}`)"
        )


def check_environment() -> None:
    """What every run of a sweep or a study inherits from this environment (prices, W&B's variables), checked
    once before the first trial: else each trial fails on it alone, and each failure uses up its grid point."""
    check_price_variables()
    check_torchrun_variables()
    check_wandb_environment()


def check_wandb_environment(wandb_dir: str | None = None) -> None:
    """W&B's variables and settings must be ones W&B accepts, and W&B's directory (`wandb_dir`, a spec's, else
    WANDB_DIR) writable."""
    from blueberry.tracking.wandb_settings import load_wandb_settings

    try:  # a W&B variable W&B rejects, found now rather than after the data and model are built
        load_wandb_settings()
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    # W&B falls back to a temp folder where it cannot write, so the record would point where nothing is
    setting = "tracking.wandb_dir" if wandb_dir else "WANDB_DIR"
    wandb_dir = wandb_dir or os.environ.get("WANDB_DIR")
    if wandb_dir:
        check_writable_dir(wandb_dir, setting)


def check_torchrun_variables() -> None:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK, where set, must be integers (`distributed.env_world` reads them;
    -1, which some launchers set for "not distributed", is one), and in a world of several a RANK one of its ranks
    (RANK=-1 with WORLD_SIZE=4 made a follower of a rank 0 that no process was)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = os.environ.get(name)
        try:
            if value is not None:
                int(value)
        except ValueError:
            raise PreflightError(f"{name}={value!r} is not an integer (torchrun sets it; else unset it)") from None
    size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if size > 1 and not 0 <= rank < size:
        raise PreflightError(
            f"RANK={rank} with WORLD_SIZE={size}: no rank of that world (0 to {size - 1}; torchrun sets both, "
            "else unset them)"
        )


def check_price_variables() -> None:
    """BLUEBERRY_PRICE_PER_HOUR and BLUEBERRY_GPU_PRICES must parse, whatever device the run finds (a run reads
    them only where they price its device)."""
    for variable, read in ((PRICE_ENV, read_price), (PRICE_TABLE_ENV, read_price_table)):
        if os.environ.get(variable):
            try:
                read(os.environ[variable], variable)
            except ValueError as exc:
                raise PreflightError(str(exc)) from None
