"""Every sweep YAML in the repo is valid under W&B's schema and expands to the intended runs."""

import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from blueberry.cli import main
from blueberry.models import registry
from blueberry.overrides import SpecError, load_spec
from blueberry.spec import VARIANTS
from blueberry.sweep import load_sweep, plan
from blueberry.sweep.config import engine
from blueberry.sweep.launch import agent_macros, build_trial
from blueberry.sweep.validate import check_trials, planned_launches, run_arguments

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted((REPO / "sweeps").rglob("*.yaml"))
LR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def planned(rel):
    sweep = load_sweep(REPO / "sweeps" / rel)
    return sweep, plan(sweep, None)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_is_valid_and_every_run_is_a_valid_spec(path):
    sweep = load_sweep(path)
    assert engine().schema_violations_from_proposed_config(sweep.config) == []
    assert sweep.config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert "${args_json_file}" in sweep.config["command"]
    runs = plan(sweep, None)
    assert runs and len({repr(sorted(r.items())) for r in runs}) == len(runs)  # no duplicates
    check_trials(sweep, runs)  # raises on any invalid spec


def test_ablation_is_every_preset_times_three_seeds():
    sweep, runs = planned("ablation.yaml")
    assert len(runs) == 3 * len(VARIANTS)  # every preset of the registry, 3 seeds
    assert {(r["model"]["variant"], r["seed"]) for r in runs} == {(v, s) for v in VARIANTS for s in (1, 2, 3)}
    assert {r["experiment"] for r in runs} == {"exp1-ablation"}


@pytest.mark.parametrize("rel", ["lr_attention_mlp.yaml", "lr_attention_moe.yaml"])
def test_lr_grids_extend_beyond_the_original_edge(rel):
    _, runs = planned(rel)
    assert len(runs) == 18
    assert sorted({r["train"]["lr"] for r in runs}) == LR_GRID
    assert {r["seed"] for r in runs} == {1, 2, 3}


def test_cpu_twin_of_the_ablation_runs_every_preset():
    _, runs = planned("cpu/ablation.yaml")
    assert sorted(r["model"]["variant"] for r in runs) == sorted(VARIANTS * 3)  # 3 seeds: noise verdicts
    assert {r["train"]["steps"] for r in runs} == {80}


@pytest.mark.parametrize("rel, seeds", [("factorial.yaml", {1, 2, 3}), ("cpu/factorial.yaml", {1, 2, 3})])
def test_factorial_covers_every_attention_and_ffn(rel, seeds):
    _, runs = planned(rel)
    grid = {(a, f, s) for a in registry.ATTENTIONS for f in registry.FFNS for s in seeds}
    assert {(r["model"]["attention"], r["model"]["ffn"], r["seed"]) for r in runs} == grid
    assert all(r["model"]["variant"] is None for r in runs)  # the two choices decide, not a preset


def test_t4_studies_cover_the_timeline():
    assert {r["model"]["n_experts"] for r in planned("t4/experts.yaml")[1]} == {8, 16}
    accum_dropout = planned("t4/accum_dropout.yaml")[1]
    assert {(r["train"]["grad_accum"], r["model"]["dropout"]) for r in accum_dropout} == {
        (a, d) for a in (1, 2, 3) for d in (0.05, 0.1)
    }
    assert 0.065 in {r["train"]["lr"] for r in planned("t4/lr_fine.yaml")[1]}


def trial_specs(rel):
    """The RunSpec each trial of sweeps/`rel` runs, built from the command line the agent would run."""
    sweep = load_sweep(REPO / "sweeps" / rel)
    specs = []
    for *_, launch, _ in planned_launches(sweep, plan(sweep, None), "check", "check-{index}"):
        spec_path, overrides, files = run_arguments(launch.argv)
        specs.append(load_spec(spec_path, overrides, tuple(files)))
    return specs


RECIPE = ("schedule", "grad_clip", "optimizer", "adamw_lr_ratio", "weight_decay", "muon_weight_decay")
RECIPE += ("muon_momentum", "adam_betas", "warmup_fraction", "min_lr_ratio")
TWINS = sorted((REPO / "sweeps" / "cpu").glob("*.yaml"))


@pytest.mark.parametrize("twin", TWINS, ids=lambda p: p.name)
def test_a_cpu_twin_keeps_its_studys_recipe(twin):
    """A twin shrinks the shape and the steps, nothing else: its conclusions stand in for the study's."""
    study = f"t4/{twin.name.removeprefix('t4_')}" if twin.name.startswith("t4_") else twin.name
    recipes = [{tuple(getattr(spec.train, f) for f in RECIPE) for spec in trial_specs(rel)} for rel in (study, twin)]
    assert recipes[0] == recipes[1]


@pytest.mark.parametrize(
    ("rel", "micro_batches"), [("t4/accum_dropout.yaml", 2000), ("cpu/t4_accum_dropout.yaml", 240)]
)
def test_accumulation_is_compared_at_one_budget_of_micro_batches(rel, micro_batches):
    """The T4 loop's max_steps counts micro-batches (an update every grad_accum-th): accumulation there changes
    the update's size, not how much is trained on."""
    trained = {(spec.train.grad_accum, spec.train.steps) for spec in trial_specs(rel)}
    assert trained == {(accum, micro_batches // accum) for accum in (1, 2, 3)}


def test_count_caps_the_plan():
    sweep = load_sweep(REPO / "sweeps/ablation.yaml")
    assert len(plan(sweep, 4)) == 4


def test_schema_errors_carry_wandbs_message_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sideways\nparameters: {x: {values: [1]}}\ncommand: [blueberry]\n")
    with pytest.raises(SpecError) as err:
        load_sweep(bad)
    assert "sideways" in err.value.render() and str(bad) in err.value.render()
    result = CliRunner().invoke(main, ["sweep", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "invalid sweep" in result.output and "Traceback" not in result.output


ENGINE_REFUSES = {  # W&B's schema allows these; its engine raises on the first proposal or early-termination check
    "method: grid\nparameters: {train: {parameters: {lr: {min: 0.001, max: 0.1}}}}\n": "Parameter train.lr is a",
    "method: bayes\nparameters: {seed: {values: [1, 2]}}\n": 'Bayesian search requires "metric" section',
    "method: custom\nparameters: {seed: {values: [1, 2]}}\n": "Invalid search type custom",
    "method: random\nparameters: {seed: {values: [1, 2]}}\nearly_terminate: {type: hyperband, min_iter: 2}\n": (
        'early terminate requires "metric" section'
    ),
}  # fmt: skip


@pytest.mark.parametrize("text", ENGINE_REFUSES)
def test_what_wandbs_engine_refuses_is_refused_before_any_trial_with_its_message(tmp_path, text):
    bad = tmp_path / "engine.yaml"
    bad.write_text(text + "command: [blueberry, run, experiments/quickstart.json, '${args}']\n")
    result = CliRunner().invoke(main, ["sweep", str(bad), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{bad}: W&B's sweep engine refuses it: {ENGINE_REFUSES[text]}" in result.output
    assert not (tmp_path / "runs").exists()  # nothing written, no trial started


def test_a_mapping_with_keys_of_two_types_is_a_sweep_like_any_other(tmp_path):
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("method: grid\nparameters: {tags: {value: {1: a, b: c}}}\ncommand: [blueberry]\n")
    assert load_sweep(mixed).sweep_id.startswith("mixed-")
    ints = tmp_path / "ints.yaml"  # keys of one type keep the id they always had (its state stays found)
    ints.write_text("method: grid\nparameters: {tags: {value: {2: a, 10: b}}}\ncommand: [blueberry]\n")
    assert load_sweep(ints).sweep_id == "ints-ddb6fe2e"  # as computed at 19ea960


def test_each_schema_violation_is_said_once(tmp_path):
    bad = tmp_path / "range.yaml"
    bad.write_text("method: bayes\nmetric: {name: val/loss}\nparameters: {seed: {min: 9, max: 1}}\ncommand: [b]\n")
    with pytest.raises(SpecError) as err:
        load_sweep(bad)
    assert err.value.render().count("min 9 is not less than max 1") == 1  # W&B's engine reports it twice


def test_a_parameter_outside_the_spec_is_caught_before_anything_runs(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(
        "method: grid\n"
        "command: ['${env}', blueberry, run, experiments/cpu_base.json, --overrides, '${args_json_file}']\n"
        "parameters: {train: {parameters: {lrr: {values: [0.1]}}}}\n"
    )
    result = CliRunner().invoke(main, ["sweep", str(bad), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "train.lrr: unknown field" in result.output
    assert not (tmp_path / "runs").exists()
    bad.write_text(bad.read_text().replace("lrr", "lr").replace("0.1", "-1"))  # a bad value: in the parameters
    result = CliRunner().invoke(main, ["sweep", str(bad), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and f"the sweep's parameters (run 0 of {bad}: " in result.output, result.output
    assert "train.lr: " in result.output and "/tmp" not in result.output.replace(str(tmp_path), "")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("BLUEBERRY_PRICE_PER_HOUR", "abc", "BLUEBERRY_PRICE_PER_HOUR='abc' is not a number"),
        ("WANDB_MODE", "bogus", "WANDB_MODE"),
        ("WANDB_DIR", "/proc/x", "WANDB_DIR '/proc/x'"),
    ],
)
@pytest.mark.parametrize("command", ["sweep", "study"])
def test_an_environment_every_trial_would_fail_on_is_refused_before_the_first(
    tmp_path, monkeypatch, variable, value, says, command
):
    """Each trial checks its environment and exits 2; a sweep that let them start recorded every grid point as
    failed, for good: fixing the environment then ran nothing. Checked once, before any state is written."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(variable, value)
    args = ["sweep", "sweeps/cpu/ablation.yaml"] if command == "sweep" else ["study", "--quick"]
    result = CliRunner().invoke(main, [*args, "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("command", "missed"),
    [
        ("[blueberry, run, experiments/cpu_base.json]", "train.lr"),  # no macro: every trial the base spec
        ("[blueberry, run, experiments/cpu_base.json, '${args}', --train.lr=0.01]", "train.lr"),  # set after it
        ("[blueberry, run, experiments/cpu_base.json, '${args_no_boolean_flags}']", None),  # a false flag dropped
        ("[blueberry, run, experiments/cpu_base.json, '${args}']", None),
        ("[blueberry, run, experiments/cpu_base.json, '${args_no_equals}']", None),
        ("[blueberry, run, experiments/cpu_base.json, --overrides, '${args_json_file}']", None),
    ],
)
@pytest.mark.parametrize("names", ["nested", "dotted"])
def test_a_swept_value_that_does_not_reach_the_run_is_caught_before_anything_runs(tmp_path, command, missed, names):
    """Else each trial trains another spec than its parameters say, and the results are filed under them. Names
    nested (`train: {parameters: {lr: ...}}`) or dotted (`train.lr:`), and a quoted number the run reads as one,
    reach the run through every macro."""
    parameters = {
        "nested": "{train: {parameters: {lr: {values: [0.001, 0.002]}}}, seed: {values: ['1', '2']},\n"
        "  data: {parameters: {streaming: {value: false}}}}\n",
        "dotted": "{train.lr: {values: [0.001, 0.002]}, seed: {values: ['1', '2']}, data.streaming: {value: false}}\n",
    }[names]
    path = tmp_path / "s.yaml"
    path.write_text(f"method: grid\ncommand: {command}\nparameters: {parameters}")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"], catch_exceptions=False)
    if missed is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and f"{path}: command (run 0: " in result.output, result.output
        assert f"{missed}: the parameter's value does not reach the run" in result.output


def test_a_trials_spec_file_missing_from_the_working_directory_is_named_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root, where the trials' spec files are
    result = CliRunner().invoke(main, ["sweep", str(REPO / "sweeps/cpu/ablation.yaml"), "--runs-root", "runs"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"experiments/cpu_base.json (run 0 of {REPO / 'sweeps/cpu/ablation.yaml'}: " in result.output
    assert f"spec file not found in {tmp_path}" in result.output and not (tmp_path / "runs").exists()


def test_a_dataset_every_trial_would_refuse_is_caught_before_the_first_starts(tmp_path, monkeypatch):
    # else each trial would fail on it in turn and the sweep record them all as failed, for good
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: grid\nparameters:\n  seed: {values: [1, 2]}\n"
        f"  data: {{parameters: {{dataset: {{value: {tmp_path / 'gone.jsonl'}}}}}}}\n"
        "command: [blueberry, run, experiments/quickstart.json, '${args}']\n"
    )
    result = CliRunner().invoke(main, ["sweep", str(bad), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"experiments/quickstart.json (run 0 of {bad}: " in result.output
    assert f"data.dataset: dataset file '{tmp_path / 'gone.jsonl'}' does not exist" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ["", "method: grid\n  bad: [indent\n", "- a list\n"])
def test_malformed_yaml(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="invalid sweep"):
        load_sweep(path)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("method: grid\n  bad: [indent\n", "not valid YAML at line 2, column 6: mapping values are not allowed here"),
        (
            "method: grid\nparameters: {seed: {values: [1]}}\ncommand: [blueberry, run, x.json, ${args}]\n",
            "not valid YAML at line 3, column 36: expected ',' or ']', but got '{' (while parsing a flow sequence); "
            'in a […] list quote each ${…} macro ("${args}"), or write one item a line (- ${args})',
        ),
        ("a: [1, 2\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>' (while"),
    ],
)
def test_malformed_yaml_is_one_line_naming_the_line_and_column(tmp_path, text, says):
    """PyYAML's own message spans lines and names the input `<unicode string>`; the error is one line in the
    file's terms, and a macro PyYAML reads as a mapping in a flow list says how to write it."""
    path = tmp_path / "x.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"invalid sweep\n  {path}: {says}" in result.output
    assert "unicode string" not in result.output and len(result.output.strip().splitlines()) == 2


def test_a_key_given_twice_is_refused_naming_it_and_the_line(tmp_path):
    """YAML keeps the last of two equal keys, silently: `method: grid` then `method: random` ran a random sweep."""
    path = tmp_path / "x.yaml"
    path.write_text("method: grid\ncommand: [a]\nparameters:\n  seed: {values: [1]}\n  seed: {values: [2]}\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line 5, column 3: key 'seed' appears twice in one mapping"):
        load_sweep(path)
    # A merge key is no duplicate: the mapping's own keys override what it merges, as YAML says.
    path.write_text(
        "method: grid\ncommand: [a]\nparameters:\n  seed: &base {values: [1, 2], distribution: categorical}\n"
        "  other: {<<: *base, values: [3]}\n"
    )
    assert load_sweep(path).config["parameters"]["other"] == {"values": [3], "distribution": "categorical"}


def test_dry_run_prints_the_agent_command(tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(REPO / "sweeps/cpu/ablation.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"{len(VARIANTS) * 3} planned run(s)" in result.output
    assert "/usr/bin/env blueberry run experiments/cpu_base.json --overrides <sweep-dir>/wandb/sweep-" in result.output


def test_a_random_sweep_without_a_cap_says_it_runs_until_stopped(tmp_path):
    sweep = tmp_path / "random.yaml"
    sweep.write_text(
        "method: random\nmetric: {name: val/loss, goal: minimize}\n"
        "command: ['${env}', blueberry, run, experiments/quickstart.json, --overrides, '${args_json_file}']\n"
        "parameters:\n  train:\n    parameters:\n      lr: {distribution: log_uniform_values, min: 0.001, max: 0.1}\n"
    )
    cli = CliRunner()
    open_ended = cli.invoke(main, ["sweep", str(sweep), "--dry-run", "--runs-root", str(tmp_path / "runs")])
    assert open_ended.exit_code == 0, open_ended.output
    assert "runs until you stop it (Ctrl-C), as `wandb agent` does; its first 10 proposals" in open_ended.output
    assert "planned run(s)" not in open_ended.output and open_ended.output.count("--overrides") == 10
    capped = cli.invoke(main, ["sweep", str(sweep), "--dry-run", "--count", "3", "--runs-root", str(tmp_path / "r")])
    assert "(random, metric val/loss): 3 run(s), each one's values drawn when it starts; a sample" in capped.output
    assert capped.output.count("--overrides") == 3


@pytest.mark.parametrize(
    ("parameters", "field", "written"),
    [
        ("{train: {parameters: {lr: {values: [0.01, 1e-3]}}}}", "parameters.train.parameters.lr.values.1", "1.0e-3"),
        ("{lr: {distribution: log_uniform_values, min: 1e-4, max: 0.1}}", "parameters.lr.min", "1.0e-4"),
        ("{train.lr: {value: 5E-4}}", "parameters.train.lr.value", "5.0E-4"),
        ("{x: {parameters: {y: {values: [1e+3]}}}}", "parameters.x.parameters.y.values.0", "1.0e+3"),
        ("{lr: {values: [1.5e3, -.5e3]}}", "parameters.lr.values.1", "-0.5e+3"),
    ],
)
def test_a_number_yaml_1_1_reads_as_text_is_refused_naming_the_parameter(tmp_path, parameters, field, written):
    """PyYAML (ours and `wandb sweep`'s) reads `1e-3` as text: the spec coerced it and the run trained 0.001, but the
    agent's parameters file carries "1e-3", which `wandb.init` prefers, so W&B recorded lr as text."""
    path = tmp_path / "s.yaml"
    path.write_text(f"method: grid\nparameters: {parameters}\ncommand: [blueberry, run, x.json, '${{args}}']\n")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{path}: {field}: YAML 1.1 (PyYAML" in result.output and f"; write {written}" in result.output
    assert isinstance(yaml.safe_load(written), float)  # what it says to write is a number to PyYAML


def test_a_number_quoted_as_text_is_the_writers_choice(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: grid\nparameters: {tag: {values: ['1e-3']}}\ncommand: [blueberry]\n")
    assert load_sweep(path).config["parameters"]["tag"]["values"] == ["1e-3"]


@pytest.mark.parametrize(
    ("section", "says"),
    [
        (
            "parameters: {x: {values: [1]}}\nearly_terminate: {type: hyperband, min_iter: 0}",
            "early_terminate.min_iter: 0 is less than the minimum of 1",
        ),
        (
            "parameters: {train: {parameters: {lr: {distribution: log_uniform_values, min: 0, max: 1}}}}",
            "parameters.train.parameters.lr.min: 0 is less than or equal to the minimum of 0",
        ),
        (
            "parameters: {train: {parameters: {lr: {distribution: q_uniform, min: 0, max: 1, q: 0}}}}",
            "parameters.train.parameters.lr.q: 0 is less than or equal to the minimum of 0",
        ),
        ("parameters: {train: {parameters: {lr: {values: []}}}}", "parameters.train.parameters.lr.values: [] should"),
        ("parameters: {lr: 5}", "parameters.lr: 5 is not of type 'object'"),  # was a traceback
        (  # the kinds of parameter disagree on what is wrong; W&B's message said only that none fits
            "parameters: {seed: {valuse: [1, 2]}}",
            "parameters.seed: unknown key 'valuse' (did you mean 'value' or 'values'?); W&B's keys here: a, b, "
            "distribution, max, min, mu, parameters, probabilities, q, sigma, value, values",
        ),
    ],
)
def test_a_schema_error_names_the_field_and_what_is_wrong(tmp_path, section, says):
    path = tmp_path / "s.yaml"
    path.write_text(f"method: random\nmetric: {{name: val/loss}}\n{section}\ncommand: [blueberry]\n")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"invalid sweep\n  {path}: {says}" in result.output


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("[]", "command: it is empty, so W&B's agent would run its default"),
        ("[blueberry, run, x.json, --overrides, '${args_json_fil}']", "command: ${args_json_fil}: no macro of W&B's"),
        ("[blueberry, run, x.json, '${foo}', '${envvar:lower}']", "command: ${envvar:lower}: no macro of W&B's"),
        ("[blueberry, run, x.json, '${args_dict}']", "command: ${args_dict}: the agent splices this dict's keys"),
    ],
)
def test_a_command_the_agent_would_run_otherwise_than_written_is_refused(tmp_path, command, says):
    """The agent drops a `${name}` token it does not know, and runs `python ${args}` for an empty command."""
    path = tmp_path / "s.yaml"
    path.write_text(f"method: grid\nparameters: {{seed: {{values: [1]}}}}\ncommand: {command}\n")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and f"{path}: {says}" in result.output, result.output
    if "macro" in says:
        listed = f"{path}: command: W&B's macros (${{name}}): env, interpreter, program, args, args_no_equals, "
        assert listed in result.output and "args_json_file, envvar:NAME\n" in result.output


def test_every_macro_it_names_is_one_the_agent_expands(tmp_path):
    for macro in agent_macros():  # (build_trial is the agent's own expansion: test_agent_contract)
        launch = build_trial([f"${{{macro}}}"], {"seed": 1}, "r", tmp_path, "s", program="train.py", base_env={})
        assert launch.argv, macro
    path = tmp_path / "s.yaml"
    path.write_text("method: grid\nparameters: {seed: {values: [1]}}\ncommand: ['${envvar:HOME}', '${args_json}']\n")
    assert load_sweep(path).config["command"] == ["${envvar:HOME}", "${args_json}"]


def test_a_blueberry_run_without_a_spec_is_refused_before_any_trial(tmp_path):
    path = tmp_path / "s.yaml"
    command = "['${env}', blueberry, run, --overrides, '${args_json_file}']"
    path.write_text(f"method: grid\nparameters: {{seed: {{values: [1, 2]}}}}\ncommand: {command}\n")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    says = "command: `${env} blueberry run --overrides ${args_json_file}` names no spec file after `blueberry run`"
    assert f"invalid sweep\n  {path}: {says}" in result.output


def test_the_spec_may_follow_run_options_as_click_parses_them(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "s.yaml"
    command = "[blueberry, run, --no-resume, --overrides, '${args_json_file}', experiments/cpu_base.json]"
    path.write_text(
        f"method: grid\nparameters: {{train: {{parameters: {{lr: {{values: [0.01]}}}}}}}}\ncommand: {command}\n"
    )
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output


def test_a_blueberry_the_trials_cannot_find_is_refused_before_the_first(tmp_path, monkeypatch):
    """Trials run `/usr/bin/env blueberry` on PATH with the sweep's own interpreter's folder first: from a clone used
    as `python -m blueberry`, with no console script there, every trial failed with exit 127."""
    monkeypatch.chdir(REPO)
    (tmp_path / "venv-bin").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv-bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(main, ["sweep", "sweeps/cpu/ablation.yaml", "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    says = "command: the sweep's command runs `blueberry`, which is not on PATH: install the package (pip install -e .)"
    assert f"invalid sweep\n  sweeps/cpu/ablation.yaml: {says}" in result.output
    assert not (tmp_path / "runs").exists()
    script = tmp_path / "venv-bin" / "blueberry"  # the console script beside the interpreter: found
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert CliRunner().invoke(main, ["sweep", "sweeps/cpu/ablation.yaml", "--dry-run"]).exit_code == 0
