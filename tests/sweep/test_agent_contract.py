"""Our trial launch == what the installed `wandb agent` would execute (argv, env, files), macro by macro."""

import json
from unittest.mock import MagicMock

import pytest
import yaml
from sweep_commands import REPO, RUN_WITH_ARGS_FILE

from blueberry.sweep import build_trial, load_sweep, plan

MACRO_COMMANDS = [
    ["${env}", "${interpreter}", "${program}", "${args}"],
    ["${env}", "blueberry", "run", "spec.json", "${args_no_boolean_flags}"],
    ["${env}", "blueberry", "run", "spec.json", "${args_no_hyphens}", "${args_no_equals}"],
    ["blueberry", "run", "spec.json", "${args_json}", "--home=${envvar:HOME}", "${envvar:NOT_SET_ANYWHERE}"],
    ["${env}", "blueberry", "run", "spec.json", "--overrides", "${args_json_file}", "${args_override_hydra}"],
]
PARAMS = {"train": {"lr": 1e-05, "progress": False}, "model": {"n_experts": 8}, "seed": 3, "flag": True, "x": None}


def run_real_agent(monkeypatch, tmp_path, command, params, run_id, program="train.py"):
    """Drive wandb's own Agent._command_run with a fake process; return (argv, env) it would exec."""
    import wandb.wandb_agent as agent_module

    launched = {}

    class FakeProcess:
        def __init__(self, env=None, command=None, **kwargs):
            launched["argv"], launched["env"] = command, env

    monkeypatch.setattr(agent_module, "AgentProcess", FakeProcess)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "agent"))
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.chdir(tmp_path)
    agent = agent_module.Agent(api=MagicMock(), queue=None, sweep_id="abc123")
    agent._sweep_command = list(command)
    agent._command_run(
        {"type": "run", "run_id": run_id, "program": program, "args": {k: {"value": v} for k, v in params.items()}}
    )
    return launched["argv"], launched["env"]


def compare(monkeypatch, tmp_path, command, params, run_id="r0", program="train.py"):
    argv, env = run_real_agent(monkeypatch, tmp_path, command, params, run_id, program)
    ours = build_trial(command, params, run_id, tmp_path / "agent", "abc123", program, base_env=env)
    assert ours.argv == argv
    assert {k: v for k, v in ours.env.items()} == env  # the agent adds exactly WANDB_RUN_ID + WANDB_SWEEP_PARAM_PATH
    assert env["WANDB_SWEEP_PARAM_PATH"] == str(ours.param_yaml)
    assert yaml.safe_load(ours.param_yaml.read_text())  # wandb_version + {k: {value: v}}
    if "${args_json_file}" in command:
        assert json.loads(ours.args_json_file.read_text()) == params
    return argv


@pytest.mark.parametrize("command", MACRO_COMMANDS, ids=lambda c: c[-1])
def test_every_macro_matches_the_real_agent(monkeypatch, tmp_path, command):
    argv = compare(monkeypatch, tmp_path, command, PARAMS)
    if "${args}" in command:  # the forms our override parser must read: Python repr, str() floats, None
        assert "--model={'n_experts': 8}" in argv and "--train={'lr': 1e-05, 'progress': False}" in argv


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").rglob("*.yaml")), ids=lambda p: p.name)
def test_repo_sweeps_launch_like_the_agent(monkeypatch, tmp_path, path):
    sweep = load_sweep(path)
    params = plan(sweep, 1)[0]
    argv = compare(monkeypatch, tmp_path, sweep.config["command"], params, "t000", sweep.config.get("program"))
    assert argv[:3] == ["/usr/bin/env", "blueberry", "run"]


def test_parameters_reach_the_spec_identically_through_every_form(tmp_path):
    """What the agent passes (any macro) is what `blueberry run` validates."""
    from blueberry.overrides import load_spec
    from blueberry.sweep.validate import run_arguments

    params = {"train": {"lr": 1e-05, "progress": False}, "model": {"n_experts": 8, "variant": "moe"}, "seed": 3}
    specs = []
    for macro in ("${args}", "${args_no_hyphens}", "${args_no_equals}", "${args_json}", "${args_override_hydra}"):
        command = ["${env}", "blueberry", "run", str(REPO / "experiments/cpu_base.json"), macro]
        launch = build_trial(command, params, "r", tmp_path, "s", None, base_env={})
        spec_path, overrides, files = run_arguments(launch.argv)
        specs.append(load_spec(spec_path, overrides, tuple(files)).to_json_dict())
    command = RUN_WITH_ARGS_FILE
    spec_path, overrides, files = run_arguments(build_trial(command, params, "r", tmp_path, "s", base_env={}).argv)
    specs.append(load_spec(spec_path, overrides, tuple(files)).to_json_dict())
    assert all(spec == specs[0] for spec in specs)
    assert specs[0]["train"]["lr"] == 1e-05 and specs[0]["model"]["n_experts"] == 8
