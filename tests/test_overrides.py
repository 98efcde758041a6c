import json

import pytest

from blueberry.overrides import SpecError, load_spec, parse_override_args, parse_value


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


# ---------------------------------------------------------------- bounded cost on any input


def test_errors_for_many_unknown_keys_are_capped_and_counted(tmp_path):
    from blueberry.overrides import MAX_PROBLEMS

    path = tmp_path / "many.json"
    n = 20_000  # quadratic blame took minutes here; linear takes well under a second
    path.write_text(json.dumps({"model": {f"k{i}": i for i in range(n)}, **{f"top{i}": 1 for i in range(n)}}))
    with pytest.raises(SpecError) as err:
        load_spec(path, [f"--train.x{i}=1" for i in range(50)])
    assert len(err.value.problems) == MAX_PROBLEMS and err.value.more == 2 * n + 50 - MAX_PROBLEMS
    rendered = err.value.render()
    assert rendered.endswith(f"… and {2 * n + 50 - MAX_PROBLEMS:,} more")
    assert len(rendered.splitlines()) == MAX_PROBLEMS + 2  # title, the listed problems, the count


def test_blame_goes_to_the_last_source_touching_the_path(spec_file, tmp_path):
    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({"train": {"lr": -1}}))
    with pytest.raises(SpecError) as err:  # the file set lr, then argv replaced the whole train section
        load_spec(spec_file, ["--train={'lr': -2}"], (str(layer),))
    assert [(w, p) for w, p, _ in err.value.problems] == [("override --train={'lr': -2}", "train.lr")]
    with pytest.raises(SpecError) as err:  # a child set after its parent: the child's source is blamed
        load_spec(spec_file, ["--model={'variant': 'moe'}", "--model.n_experts=0"])
    assert {(w, p) for w, p, _ in err.value.problems} == {("override --model.n_experts=0", "model.n_experts")}


@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_a_spec_file_over_the_cap_is_refused_without_reading_it_all(tmp_path, source):
    from blueberry.overrides import MAX_FILE_BYTES

    if source == "big":
        source = tmp_path / "big.json"
        source.write_text('{"name": "' + "x" * MAX_FILE_BYTES + '"}')
    for read in (lambda: load_spec(source), lambda: load_spec(None, override_files=(str(source),))):
        with pytest.raises(SpecError, match="larger than 1 MiB"):
            read()


def test_a_huge_override_is_never_echoed_whole():
    huge = "9" * 120_000
    for args in ([f"--train.lr={huge}"], [f"--{'x' * 120_000}=1"], ["{" + huge]):
        with pytest.raises(SpecError) as err:
            load_spec(None, args)
        assert len(err.value.render()) < 2_000 and "more characters" in err.value.render()


# ---------------------------------------------------------------- coercions


@pytest.mark.parametrize(
    "override",
    ["--model.n_layers=True", "--train.lr=True", "--train.steps=False", "--train.adam_betas=[True, 0.9]"]
    + ["--train.threads=True", "--seed=True", "--train.batch_size=True", "--data.dataset=True"],
)
def test_a_boolean_is_never_a_number(override):
    with pytest.raises(SpecError) as err:
        load_spec(None, [override])
    ((_, path, reason),) = err.value.problems
    assert path == override.split("=")[0].removeprefix("--") and "not a boolean" in reason


def test_the_coercions_kept():
    spec = load_spec(None, ['--model.n_layers="3"', "--model.n_experts=4.0", "--train.lr=1", "--train.progress=0"])
    assert (spec.model.n_layers, spec.model.n_experts, spec.train.lr, spec.train.progress) == (3, 4, 1.0, False)
    with pytest.raises(SpecError, match="fractional part"):
        load_spec(None, ["--model.n_layers=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.dataset=" + "a" * 256, "path component of 256 bytes"),
        ("--data.dataset=" + "ab/" * 1400, "more than a path may be"),
        ("--data.tokenizer=" + "t" * 300, "path component of 300 bytes"),
        ("--tracking.runs_root=" + "r" * 256, "path component"),
        ("--tracking.runs_root=''", "not empty"),
        ('--data.dataset="a\\x00b"', "NUL"),
    ],
)
def test_a_name_or_path_the_os_would_refuse_is_a_spec_error(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec(None, [override])


def test_a_key_given_twice_in_a_spec_or_overrides_file_is_refused(tmp_path):
    """JSON keeps the last of two equal keys, silently: a spec saying seed 1 and seed 2 ran seed 2."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"experiment": "x", "seed": 1, "train": {"lr": 0.1, "lr": 0.2}}')
    with pytest.raises(SpecError, match=f"{spec}: key 'lr' appears twice in one object"):
        load_spec(spec)
    spec.write_text('{"experiment": "x"}')
    overrides = tmp_path / "o.json"
    overrides.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(SpecError, match=f"{overrides}: key 'seed' appears twice"):
        load_spec(spec, [], (str(overrides),))


@pytest.mark.parametrize(
    "override",
    [
        '{"seed": 1, "seed": 2}',  # ${args_json}
        "--model={'n_experts': 8, 'n_experts': 2}",  # a Python literal, as the agent writes a dict
        '--model={"n_experts": 8, "n_experts": 2}',
        "--model={'n_experts': 8, 'moe': {'a': 1, 'a': 2}}",  # at any depth
        "--model={-1: 2, -1: 3}",  # keys that are no constant to Python's parser
        '--model {"n_experts": 8, "n_experts": 2}',  # ${args_no_equals}
    ],
)
def test_a_key_given_twice_in_one_override_is_refused(override):
    with pytest.raises(SpecError, match="appears twice in one object") as error:
        load_spec(None, override.split(" ", 1) if override.startswith("--model {") else [override])
    assert f"override {override!r}" in str(error.value)  # the whole override, its value too


def test_a_literal_without_repeated_keys_still_parses():
    assert parse_value("{'n_experts': 8, 'top_k': 2}") == {"n_experts": 8, "top_k": 2}
    assert parse_value("[{'a': 1}, {'a': 2}]") == [{"a": 1}, {"a": 2}]  # the same key in two objects
    assert parse_value("not a literal") == "not a literal"


@pytest.mark.parametrize(
    "layer, key, other",
    [
        ({"train.lr": 0.003, "train": {"lr": 0.5}}, "train", "train.lr"),
        ({"train": {"lr": 0.5}, "train.lr": 0.003}, "train.lr", "train"),
        ({"model": {"n_experts": 4}, "model.n_experts": 8}, "model.n_experts", "model"),
    ],
)
def test_one_field_set_by_a_dotted_and_a_nested_key_is_refused(tmp_path, layer, key, other):
    """A sweep giving `train.lr: {values: …}` and `train: {parameters: {lr: …}}` would otherwise run its whole grid
    at whichever came last: the agent writes both into one parameters file, read here."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"experiment": "x"}')
    overrides = tmp_path / "o.json"
    overrides.write_text(json.dumps(layer))
    leaf = key if "." in key else other
    with pytest.raises(SpecError, match=f"{overrides}: {key}: sets {leaf}, which key '{other}' sets too"):
        load_spec(spec, [], (str(overrides),))
    overrides.write_text(json.dumps({"train.lr": 0.003, "train": {"steps": 5}}))  # two fields: both kept
    train = load_spec(spec, [], (str(overrides),)).train
    assert (train.lr, train.steps) == (0.003, 5)


@pytest.mark.parametrize(
    "overrides, source, path",
    [
        (["--train.batch_size=auto", "--train.steps=5"], "override --train.batch_size=auto", "train.batch_size"),
        (["--model.n_heads=3", "--model.dropout=0.0"], "override --model.n_heads=3", "model.n_heads"),
        (["--data.seq_len=2048", "--seed=1"], "override --data.seq_len=2048", "data.seq_len"),
        (["--model.max_seq_len=64", "--seed=1"], "override --model.max_seq_len=64", "model.max_seq_len"),
        # a field the message only says in an aside ("optimizer step") or inside a value it quotes is not blamed
        (
            ["--train.batch_size=auto", "--train.optimizer=adamw"],
            "override --train.batch_size=auto",
            "train.batch_size",
        ),  # noqa: E501
        (['--tags=["' + "x" * 68 + ' lr"]', "--train.lr=0.001"], 'override --tags=["' + "x" * 68 + ' lr"]', "tags"),
        (
            ["--tags=[\"it's " + "x" * 64 + ' lr"]', "--train.lr=0.001"],
            "override --tags=[\"it's " + "x" * 64 + ' lr"]',
            "tags",
        ),  # noqa: E501
    ],
)
def test_a_check_across_fields_blames_the_field_it_names_not_the_last_override(overrides, source, path):
    """A section's (or the spec's) own check fails at the section: the error names the source and path of the
    field its message names that was set last, not whichever override touched the section last."""
    with pytest.raises(SpecError) as caught:
        load_spec("experiments/quickstart.json", overrides)
    ((where, field, _),) = caught.value.problems
    assert (where, field) == (source, path)
