import json

import pytest

from blueberry.overrides import SpecError, load_spec, parse_override_args


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"model": {"variant": "moe", "n_experts": 4}, "train": {"lr": 0.01}}))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["--train.lr=0.003"],  # ${args}
        ["train.lr=0.003"],  # ${args_no_hyphens}
        ["--train.lr", "0.003"],  # ${args_no_equals}
        ["++train.lr=0.003"],  # ${args_override_hydra}
        ["--train={'lr': 0.003}"],  # nested value as Python repr
        ['{"train": {"lr": 0.003}}'],  # ${args_json}
        ['{"train.lr": 0.003}'],  # dotted keys inside JSON
    ],
)
def test_every_agent_form_sets_the_value(spec_file, args):
    spec = load_spec(spec_file, args)
    assert spec.train.lr == 0.003
    assert spec.model.variant == "moe"  # untouched keys survive


def test_nested_python_repr_merges_deep(spec_file):
    spec = load_spec(spec_file, ["--model={'n_experts': 8, 'top_k': 1}"])
    assert (spec.model.variant, spec.model.n_experts, spec.model.top_k) == ("moe", 8, 1)


def test_boolean_forms(spec_file):
    assert load_spec(spec_file, ["--train.progress=False"]).train.progress is False
    assert load_spec(spec_file, ["--train.progress=false"]).train.progress is False
    assert load_spec(spec_file, ["--train.progress=False", "--train.progress"]).train.progress is True


def test_json_file_overrides_then_argv(spec_file, tmp_path):
    overrides = tmp_path / "config-abc.json"
    overrides.write_text(json.dumps({"model": {"n_experts": 8}, "train": {"lr": 0.1}, "seed": 3}))
    spec = load_spec(spec_file, ["--seed=7"], (str(overrides),))
    assert (spec.model.n_experts, spec.train.lr, spec.seed) == (8, 0.1, 7)


def test_none_and_scientific_values(spec_file):
    spec = load_spec(spec_file, ["--train.grad_clip=None", "--train.lr=1e-05"])
    assert spec.train.grad_clip is None and spec.train.lr == 1e-05


def test_bad_override_names_source_and_field(spec_file):
    with pytest.raises(SpecError) as err:
        load_spec(spec_file, ["--train.lr=-1"])
    ((where, path, reason),) = err.value.problems
    assert where == "override --train.lr=-1" and path == "train.lr" and "greater than 0" in reason


def test_bad_spec_file_names_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"n_layer": 2}}))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.problems == [(str(path), "model.n_layer", "unknown field (did you mean 'n_layers'?)")]


def test_unknown_field_suggests_only_a_close_name():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["--trian.lr=0.1", "--train.zzz=1"])
    reasons = {path: reason for _, path, reason in err.value.problems}
    assert reasons == {"trian": "unknown field (did you mean 'train'?)", "train.zzz": "unknown field"}


def test_mistyped_choice_suggests_the_closest_value():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["--model.variant=mooe", "--tracking.wandb=ofline", "--train.optimizer=sgd"])
    reasons = {path: reason for _, path, reason in err.value.problems}
    assert reasons["model.variant"].endswith("(got 'mooe') (did you mean 'moe'?)")
    assert reasons["tracking.wandb"].endswith("(did you mean 'offline'?)")
    assert "did you mean" not in reasons["train.optimizer"]  # nothing close to 'sgd'


@pytest.mark.parametrize("text, reason", [("", "empty"), ("{nope", "not valid JSON"), ("[1]", "JSON object")])
def test_malformed_files(tmp_path, text, reason):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(SpecError, match=reason):
        load_spec(path)


def test_missing_file():
    with pytest.raises(SpecError, match="not found"):
        load_spec("does/not/exist.json")


def test_malformed_override_tokens():
    with pytest.raises(SpecError):
        parse_override_args(["lr"])
    with pytest.raises(SpecError):
        parse_override_args(["--train..lr=1"])
