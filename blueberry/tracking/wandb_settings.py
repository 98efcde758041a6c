"""What a run tells W&B, and where each value came from: the spec, W&B's own settings, or our defaults.

W&B's precedence: an explicit value (here: the spec or an override) beats W&B's environment variables
(`WANDB_MODE`, `WANDB_PROJECT`, ...), which beat its settings files: `wandb/settings` in the working
directory (written by `wandb offline`, `wandb disabled`, `wandb init`) over the global one in
`$WANDB_CONFIG_DIR` (default `~/.config/wandb/settings`). W&B's own loader reads them
(`Settings.update_from_system_settings` / `update_from_env_vars`, the steps `wandb.setup` runs); we only
note which source set each value so the run header can say why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# W&B's mode aliases (wandb_settings.Settings.mode): "dryrun" is offline, "run" and "shared" go online.
MODE_ALIASES = {"dryrun": "offline", "run": "online", "shared": "online"}
# Our field -> (W&B setting, the environment variable W&B reads it from)
WANDB_FIELDS = {
    "mode": ("mode", "WANDB_MODE"),
    "project": ("project", "WANDB_PROJECT"),
    "entity": ("entity", "WANDB_ENTITY"),
    "group": ("run_group", "WANDB_RUN_GROUP"),
    "job_type": ("run_job_type", "WANDB_JOB_TYPE"),
    "tags": ("run_tags", "WANDB_TAGS"),
    "notes": ("run_notes", "WANDB_NOTES"),
    "name": ("run_name", "WANDB_NAME"),
    "dir": ("root_dir", "WANDB_DIR"),
}


@dataclass(frozen=True)
class Choice:
    value: Any
    source: str  # "spec", "WANDB_PROJECT", "settings file /path/wandb/settings", "default", ...


GLOBAL_SETTINGS = "~/.config/wandb/settings"


def global_settings_path() -> Path:
    """Where `wandb.setup` looks for the global settings file."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    # os.path.expanduser: with no home directory it leaves the path as it is, where Path's raises
    return Path(os.path.expanduser(config_dir or GLOBAL_SETTINGS.removesuffix("/settings"))) / "settings"


def workspace_settings_path() -> Path:
    """Where `wandb.setup` looks for the working directory's settings file. It reads the files before it applies
    the environment (wandb_setup's `_load_settings`), so the path comes from a Settings with no environment:
    `wandb/settings` (`.wandb/settings` where a `.wandb` folder exists) in the working directory, wherever
    WANDB_DIR points. The loaded settings' `settings_workspace` names `$WANDB_DIR/wandb/settings` instead, a file
    wandb.init never reads (though `wandb offline` run with WANDB_DIR set writes there)."""
    from wandb.sdk.wandb_settings import Settings

    return Path(Settings(quiet=True).settings_workspace)


def homeless() -> str | None:
    """Why W&B cannot start here, if for want of a home directory: wandb.setup expands ~/.config/wandb/settings
    (unless WANDB_CONFIG_DIR says where) with pathlib, which raises for a user with none (HOME unset, no passwd
    entry: some containers) inside wandb.init, even with mode disabled."""
    if os.environ.get("WANDB_CONFIG_DIR"):
        return None
    try:
        Path.home()
    except RuntimeError:
        return "W&B reads its settings in the home directory, and this user has none: set HOME or WANDB_CONFIG_DIR"
    return None


def load_wandb_settings():
    """W&B's Settings from its settings files and environment, as `wandb.setup` loads them; ValueError naming
    the variable when W&B rejects one (wandb.init would fail on it too, with a traceback)."""
    from pydantic import ValidationError
    from wandb.errors import UsageError
    from wandb.sdk.wandb_settings import Settings

    if problem := homeless():
        raise ValueError(problem)
    settings = Settings(quiet=True)  # quiet: no "Loading settings from ..." line
    settings.settings_system = str(global_settings_path())
    settings.update_from_system_settings()
    try:
        settings.update_from_env_vars(dict(os.environ))
    except ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # a check across settings (WANDB_RESUME with WANDB_RESUME_FROM): W&B names them
            raise ValueError(f"W&B environment: {error['msg'].removeprefix('Value error, ')}") from None
        env_var = _variable_of(str(error["loc"][0]))
        raise ValueError(f"W&B environment variable {env_var}={error.get('input')!r}: {error['msg']}") from None
    except UsageError as exc:  # W&B's own validators (e.g. a project name with '/') raise this instead
        said = str(exc)  # names the value, not the variable: find the variable holding it
        named = [var for _, var in WANDB_FIELDS.values() if os.environ.get(var) and repr(os.environ[var]) in said]
        raise ValueError(f"W&B environment{' variable ' + named[0] if named else ''}: {said}") from None
    return settings


def left_to_us(ours: dict[str, Any]) -> dict[str, Any]:
    """Of our values for W&B settings (setting: value), those W&B's environment and settings files leave unset.

    wandb.init takes a value it is given over theirs: giving it ours where they set one (WANDB_CONSOLE=wrap, say)
    would override the user."""
    # pydantic marks every field the loader assigns: those sources' (and the loader's own quiet, settings_system)
    chosen = load_wandb_settings().model_fields_set
    return {setting: value for setting, value in ours.items() if setting not in chosen}


def _variable_of(setting: str) -> str:
    """The environment variable W&B read `setting` from, or the setting's own name. W&B's own reader names them
    (`Settings.update_from_env_vars`, with special cases such as WANDB_HTTP_TIMEOUT for x_graphql_timeout_seconds):
    the variable whose value alone fails on `setting` is the one."""
    from pydantic import ValidationError
    from wandb.sdk.wandb_settings import Settings

    for var, value in os.environ.items():
        if var.startswith("WANDB_"):
            try:
                Settings().update_from_env_vars({var: value})
            except ValidationError as exc:
                if exc.errors()[0]["loc"][:1] == (setting,):
                    return var
            except Exception:  # W&B's own validators raise UsageError; not the variable sought
                continue
    return setting


def run_path_ignored() -> str | None:
    """The variable that makes `wandb.init` ignore a project, entity and run id it is given (a sweep run, under
    `wandb agent`; a W&B Launch job: wandb_init's `clear_run_path_if_sweep_or_launch`), or None."""
    settings = load_wandb_settings()
    return "WANDB_SWEEP_ID" if settings.sweep_id else ("WANDB_LAUNCH" if settings.launch else None)


def wandb_settings() -> dict[str, Choice]:
    """The values W&B's own settings (environment, then the settings files) give our fields, with their source.

    Fields they leave unset are absent.
    """
    from wandb.sdk.lib.settings_file import SettingsFiles

    settings = load_wandb_settings()
    # The working directory's file wins over the global one.
    files = {
        path: SettingsFiles(global_settings=None, local_settings=Path(path)).all()
        for path in (workspace_settings_path(), global_settings_path())
    }
    found: dict[str, Choice] = {}
    for field, (setting, env_var) in WANDB_FIELDS.items():
        value = getattr(settings, setting)
        if os.environ.get(env_var):
            source = env_var
        else:
            holder = next((path for path, values in files.items() if setting in values), None)
            if holder is None:
                continue
            source = f"settings file {holder}"
        if value in (None, "", ()):
            continue
        found[field] = Choice(list(value) if field == "tags" else value, source)
    return found


def has_api_key() -> bool:
    """Credentials for W&B's server as W&B finds them (wbauth.authenticate): an API key or an identity token file
    (WANDB_IDENTITY_TOKEN_FILE, W&B's OIDC login) in the environment, else a key in the netrc file for the host
    `base_url` (WANDB_BASE_URL, or the settings file `wandb login --host` writes, else W&B's default server,
    which `wandb login` stores its key under). No network call."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = load_wandb_settings()
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(settings.api_key or read_netrc_auth(host=settings.base_url))
    except Exception:  # a private helper: if it moves or fails (a malformed netrc), assume no key
        return False


def resolve_mode(requested: str, found: dict[str, Choice] | None = None) -> tuple[str, str]:
    """(mode, why). `auto` asks W&B's settings; with none, online when an API key exists, else offline.

    Online without an API key would fail in `wandb.init`, so it runs offline and says why.
    """
    source = "spec"
    if requested == "auto":
        choice = (wandb_settings() if found is None else found).get("mode")
        if choice is None:
            return ("online", "default: API key found") if has_api_key() else ("offline", "default: no API key")
        requested, source = MODE_ALIASES.get(choice.value, choice.value), choice.source
        if requested != choice.value:  # W&B's alias; "shared" (several writers) too, as only rank 0 writes here
            source = f"{source}={choice.value}"
    if requested == "online" and not has_api_key():
        return "offline", f"online set by {source} but no API key (set WANDB_API_KEY or `wandb login`)"
    return requested, f"set by {source}"


def run_settings(spec, tags: list[str], name: str | None = None) -> dict[str, Choice]:
    """Every `wandb.init` value of a run of `spec` with its source: the spec, else W&B's settings, else ours.

    `tags`: ours, always given (the variant, the sweep); the user's tags (spec, else WANDB_TAGS) follow. `name`:
    ours (default spec.run_name).
    """
    # A run with W&B disabled reads none of W&B's settings: a W&B variable it would reject does not concern it.
    found = wandb_settings() if spec.tracking.wandb != "disabled" else {}
    mode, why = resolve_mode(spec.tracking.wandb, found)
    tracking = spec.tracking
    # field: (the spec's explicit value or None, our default)
    fields = {
        "project": (tracking.project, "blueberry"),
        "entity": (tracking.entity, None),  # W&B's default entity (the API key's user)
        "group": (tracking.group, spec.experiment),
        "job_type": (tracking.job_type, "train"),
        "notes": (tracking.notes, None),
        "name": (spec.name, name or spec.run_name),
        "tags": (spec.tags or None, []),
        "dir": (tracking.wandb_dir, None),  # None: the run's own directory (WandbTracker)
    }
    chosen = {"mode": Choice(mode, why)}
    for field, (explicit, default) in fields.items():
        if explicit is not None:
            chosen[field] = Choice(explicit, "spec")
        else:
            chosen[field] = found.get(field, Choice(default, "default"))
    user_tags = chosen["tags"]
    chosen["tags"] = Choice(list(dict.fromkeys([*tags, *user_tags.value])), user_tags.source)
    ignored = run_path_ignored() if spec.tracking.wandb != "disabled" else None
    if ignored:  # the run goes where W&B's own settings say (the agent sets WANDB_PROJECT and WANDB_ENTITY)
        for field in ("project", "entity"):
            if chosen[field].source in ("spec", "default"):
                own = found.get(field, Choice(None, "W&B's default"))
                chosen[field] = Choice(own.value, f"{own.source} ({ignored} is set: wandb.init ignores the spec's)")
    return chosen


def describe(chosen: dict[str, Choice]) -> dict[str, dict[str, Any]]:
    """The run header's `wandb` section: each value and where it came from."""
    return {field: {"value": choice.value, "source": choice.source} for field, choice in chosen.items()}


def wandb_status(spec) -> dict[str, Any]:
    """For `blueberry doctor`: the wandb and sweep-engine versions, and the W&B values a run of `spec` would use."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        engine = version("sweeps")
    except PackageNotFoundError:
        engine = None
    chosen = run_settings(spec, tags=[spec.model.label])
    return {"wandb": version("wandb"), "sweep_engine": engine, "run": describe(chosen)}


def format_wandb_status(status: dict[str, Any]) -> str:
    run = status["run"]
    engine = status["sweep_engine"]
    engine = f"sweeps {engine}" if engine else "not installed (pip install sweeps==0.3.0)"
    lines = [
        f"W&B      wandb {status['wandb']}; sweep engine {engine}",
        f"  mode       {run['mode']['value']} ({run['mode']['source']})",
    ]
    for field in ("project", "entity", "group", "job_type"):
        value, source = run[field]["value"], run[field]["source"]
        if value is None:
            value, source = "-", "W&B's default: your login's entity"
        lines.append(f"  {field:<10} {value} ({source})")
    return "\n".join(lines)
