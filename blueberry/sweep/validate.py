"""Check a sweep before it runs: every planned trial's command line must give a valid run spec."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from blueberry.overrides import SpecError, load_spec, merged_spec, unreached
from blueberry.sweep.config import INVALID, Sweep
from blueberry.sweep.controller import UNTIL_STOPPED
from blueberry.sweep.launch import build_trial, trials_path


def run_arguments(argv: list[str]) -> tuple[str | None, list[str], list[str]] | None:
    """(spec path, argv overrides, override files) of a `blueberry run` command line, or None if it is not one. The
    spec path is None where the line names none: `blueberry run` would fail with "Missing argument 'SPEC.json'"."""
    if "run" not in argv or not any(Path(token).name == "blueberry" or token == "blueberry.cli" for token in argv):
        return None
    spec_path, overrides, files = None, [], []
    tokens = iter(argv[argv.index("run") + 1 :])
    for token in tokens:  # as click parses `blueberry run`: its options anywhere, the first other token the spec
        if token == "--overrides":
            files.append(next(tokens, ""))
        elif token.startswith("--overrides="):
            files.append(token.split("=", 1)[1])
        elif token in ("--resume", "--no-resume"):
            continue
        elif spec_path is None:
            spec_path = token
        else:
            overrides.append(token)
    return spec_path, overrides, files


def check_runnable(sweep: Sweep, argv: list[str]) -> None:
    """SpecError unless a trial's command line `argv` can start: the `blueberry` it runs is on the trials' PATH (else
    every trial fails with exit 127), and a `blueberry run` in it names its spec."""
    program_and_arguments = argv[1:] if argv[:1] == ["/usr/bin/env"] else argv  # `${env}` is /usr/bin/env
    program = program_and_arguments[0] if program_and_arguments else ""
    if Path(program).name == "blueberry" and shutil.which(program, path=trials_path()) is None:
        reason = f"the sweep's command runs `{program}`, which is not on PATH: install the package (pip install -e .)"
        raise SpecError([(str(sweep.path), "command", reason)], INVALID)
    parsed = run_arguments(argv)
    if parsed is not None and parsed[0] is None:
        command = " ".join(map(str, sweep.config["command"]))
        reason = (
            f"`{command}` names no spec file after `blueberry run`: each trial would fail, Missing argument 'SPEC.json'"
        )
        raise SpecError([(str(sweep.path), "command", reason)], INVALID)


def planned_launches(sweep: Sweep, planned: list[dict], sweep_id: str, run_id: str):
    """(index, params, launch, scratch dir) for each planned trial, built as the agent would build it."""
    with tempfile.TemporaryDirectory() as tmp:
        for index, params in enumerate(planned):
            launch = build_trial(
                sweep.config["command"],
                params,
                run_id.format(index=index),
                Path(tmp),
                sweep_id,
                sweep.config.get("program"),
                base_env={},
            )
            yield index, params, launch, tmp


def check_trials(sweep: Sweep, planned: list[dict]) -> None:
    """Validate each planned trial exactly as its `blueberry run` would (its spec, and its data inputs as a run
    checks them before torch loads); raise SpecError naming the trial."""
    from blueberry.data.inputs import input_problems

    data_checked: set[str] = set()
    for index, params, launch, tmp in planned_launches(sweep, planned, "check", "check-{index}"):
        check_runnable(sweep, launch.argv)
        parsed = run_arguments(launch.argv)
        if parsed is None:
            return  # not a blueberry command: nothing of ours to check
        spec_path, overrides, files = parsed
        try:
            run = load_spec(spec_path, overrides, tuple(files))
        except SpecError as exc:
            # the trial's own file first: `where` is cut to a length when shown, and the parameters can be long
            trial = f"(run {index} of {sweep.path}: {json.dumps(params, sort_keys=True)})"
            # a problem in the parameters file the agent writes is the sweep's parameters: not a temp path to show
            named = [
                ("the sweep's parameters" if w.startswith(tmp) else w, path, reason) for w, path, reason in exc.problems
            ]
            problems = [(f"{w} {trial}", path, reason) for w, path, reason in named]
            raise SpecError(problems, more=exc.more) from None
        data = run.data.model_dump_json()  # trials mostly share their data: each distinct one checked once
        if data not in data_checked:
            data_checked.add(data)
            trial = f"(run {index} of {sweep.path}: {json.dumps(params, sort_keys=True)})"
            problems = input_problems(run.data)
            if problems:
                raise SpecError([(f"{spec_path} {trial}", field, problem) for field, problem in problems])
        missed = unreached(params, merged_spec(spec_path, overrides, tuple(files))[0], run)
        if missed:
            where = f"{sweep.path}: command (run {index}: {json.dumps(params, sort_keys=True)})"
            reason = (
                "the parameter's value does not reach the run (the command passes no ${args}, ${args_json_file} "
                "or similar macro, sets the field itself after it, or drops it: a false flag under "
                "${args_no_boolean_flags} leaves the spec's own value)"
            )
            raise SpecError([(where, path, reason) for path in missed])


def describe(sweep: Sweep, planned: list[dict], open_ended: bool = False) -> str:
    """The dry-run listing: each planned run's parameters and the command the agent would execute."""
    heading = f"sweep {sweep.sweep_id} ({sweep.method}, metric {sweep.config.get('metric', {}).get('name')}): "
    if open_ended:
        heading += f"{UNTIL_STOPPED}; its first {len(planned)} proposals"
    elif sweep.method == "grid":
        heading += f"{len(planned)} planned run(s)"
    else:  # the engine draws a run's values when it starts: these are a sample of what the sweep will run
        heading += f"{len(planned)} run(s), each one's values drawn when it starts; a sample of them"
    lines = [heading]
    for index, params, launch, tmp in planned_launches(sweep, planned, sweep.sweep_id, "t{index:03d}"):
        argv = " ".join(launch.argv).replace(tmp, "<sweep-dir>")
        lines.append(f"{index:3d}  {json.dumps(params, sort_keys=True)}\n     {argv}")
    return "\n".join(lines)
