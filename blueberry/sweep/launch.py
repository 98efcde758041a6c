"""Launch a trial exactly as `wandb agent` would: same argv from the `command:` macros, same files, same env.

The macro values come from W&B's own helpers (`create_sweep_command`, `create_sweep_command_args`,
`save_config_file_from_dict`); what differs is only what the agent gets from the W&B server (the sweep id),
which offline we replace by a local id and leave out of the child's environment (a `WANDB_SWEEP_ID` would
make `wandb.init` ignore project/id and a later `wandb sync` would point at a sweep the server lacks).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrialLaunch:
    argv: list[str]
    env: dict[str, str]
    param_yaml: Path  # WANDB_SWEEP_PARAM_PATH: `wandb.init` merges it into the run config
    args_json_file: Path


def agent_args(params: dict) -> dict:
    """The agent's `command["args"]`: {name: {"value": v}} with plain-Python values."""
    return {key: {"value": value} for key, value in params.items()}


def build_trial(
    command: list,
    params: dict,
    run_id: str,
    wandb_dir: Path,
    sweep_id: str,
    program: str | None = None,
    base_env: dict | None = None,
) -> TrialLaunch:
    """argv, env and files for one trial, mirroring `wandb.wandb_agent.Agent._command_run` (wandb 0.31)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    from wandb.sdk.lib import config_util

    args = agent_args(params)
    env = dict(os.environ if base_env is None else base_env)
    env["WANDB_RUN_ID"] = run_id
    sweep_dir = Path(wandb_dir) / "wandb" / f"sweep-{sweep_id}"
    param_yaml = sweep_dir / f"config-{run_id}.yaml"
    args_json_file = sweep_dir / f"config-{run_id}.json"
    env["WANDB_SWEEP_PARAM_PATH"] = str(param_yaml)
    config_util.save_config_file_from_dict(str(param_yaml), args)

    template = sweep_utils.create_sweep_command(list(command))  # ${envvar:NAME} substitution
    sweep_vars = sweep_utils.create_sweep_command_args({"args": args})
    if "${args_json_file}" in template:
        args_json_file.write_text(sweep_vars["args_json"][0])
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [program] if program is not None else []
    sweep_vars["args_json_file"] = [str(args_json_file)]
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for token in map(str, template):  # only a whole `${name}` token is a macro
        if token.startswith("${") and token.endswith("}"):
            argv += sweep_vars.get(token[2:-1]) or []
        else:
            argv.append(token)
    return TrialLaunch(argv=argv, env=env, param_yaml=param_yaml, args_json_file=args_json_file)


@functools.cache
def agent_macros() -> tuple[str, ...]:
    """The `${name}` tokens the agent replaces in `command:` (a whole token each), as `_command_run` builds them: it
    drops any other `${name}` token without a word. (`args_dict` is no argv: the agent would splice in its keys.)"""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    argv_forms = sweep_utils.create_sweep_command_args({"args": {}})
    argv_macros = (name for name, value in argv_forms.items() if isinstance(value, list))
    return ("env", "interpreter", "program", *argv_macros, "args_json_file")


def unknown_macro(token: str) -> bool:
    """Whether the agent drops `token` from the command line: a whole `${name}` token that is none of its macros,
    once each `${envvar:NAME}` in it is replaced (anywhere in a token, before the macros)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    token = sweep_utils.SWEEP_COMMAND_ENV_VAR_REGEX.sub("value", token)
    macro = re.fullmatch(r"\$\{(.*)\}", token)
    return macro is not None and macro[1] not in agent_macros()


def trials_path() -> str:
    """The PATH a trial runs with: the `blueberry` that runs the sweep runs its trials, even from an unactivated
    venv."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def plain(value):
    """Engine proposals hold numpy scalars; the agent's files and argv need plain Python values."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
