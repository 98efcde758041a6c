"""Hostile input, property-based (hypothesis): through the real CLI, every invalid spec file, override or
overrides file exits 2 with a message naming the field (or the file), never a traceback, and writes nothing.

The runner is replaced by a stub that raises `Reached`: a fuzzed spec that happens to be valid must get
there (and train nothing), an invalid one must not.
"""

import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import blueberry.runner
from blueberry.cli import main
from blueberry.spec import RunSpec

# Each example is a fresh temp dir; the only function-scoped fixtures are the hermetic env and one patch.
# Nothing written into the repository: no example database, and hypothesis's constants cache in /tmp.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "blueberry-hypothesis")
FUZZ = settings(
    max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
BASE = {
    "experiment": "fuzz",
    "model": {"variant": "baseline", "d_model": 64, "n_heads": 4, "n_experts": 4, "top_k": 2, "max_seq_len": 128},
    "data": {"seq_len": 64},
    "train": {"steps": 10},
}


class Reached(Exception):
    """The stub runner was called: the spec was valid."""


@pytest.fixture(autouse=True)
def stub_runner(monkeypatch):
    def execute(spec, **kwargs):
        raise Reached(spec)

    monkeypatch.setattr(blueberry.runner, "execute", execute)


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)  # sections too: replacing a whole section is hostile input as well
        if isinstance(value, dict):
            paths.extend(_leaves(value, path + "."))
    return paths


FIELDS = _leaves(RunSpec().to_json_dict())
UNKNOWN = ["bogus", "model.bogus", "train.lr_max", "data.seq_len.inner", "tracking.wandb_api_key"]
HUGE = [10**400, -(10**400), 2**63, 2**64 + 1, 1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf")]
# allow_subnormal=False: the runner's torch.set_flush_denormal(True), left set by earlier in-process runs,
# makes subnormal floats unrepresentable, and hypothesis refuses to draw them then.
HOSTILE = st.one_of(
    st.sampled_from([*HUGE, 0, -1, 1, 3, 65, 7.5, -0.0, True, False, None, "", " ", "../../etc", "a/b", "x" * 5000]),
    st.integers(),
    st.floats(allow_subnormal=False),
    st.text(max_size=20),
    st.lists(st.one_of(st.integers(), st.floats(allow_subnormal=False), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _options(args: tuple[str, ...]) -> tuple[str, ...]:
    """The arguments click reads as options: those before a `--`, which makes the rest positional."""
    return args[: args.index("--")] if "--" in args else args


def _asks_for_help(arg: str) -> bool:
    """click's help flag, wherever it stands: `--help`, `-h`, or `-h` in a cluster of short options (`-h0` is
    `-h -0`; help is eager, so it is shown before the unknown `-0` is reported)."""
    return arg == "--help" or (arg.startswith("-") and not arg.startswith("--") and "h" in arg)


def run_cli(tmp: Path, *args: str):
    """Invoke `blueberry run` in-process; assert the invariants every input must keep; return (code, output)."""
    before = sorted(tmp.rglob("*"))
    result = CliRunner().invoke(main, ["run", *args])
    assert "Traceback" not in result.output
    if isinstance(result.exception, Reached):
        code = "valid"
    elif result.exit_code == 0 and any(_asks_for_help(arg) for arg in _options(args)):
        assert result.output.startswith("Usage: "), result.output
        code = "help"
    else:
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        assert result.output.startswith("error: "), result.output
        code = 2
    assert sorted(tmp.rglob("*")) == before  # nothing written: no run dir, no temp files
    return code, result.output


def _set(tree: dict, path: str, value) -> dict:
    tree = json.loads(json.dumps(tree))
    *parents, leaf = path.split(".")
    cursor = tree
    for part in parents:
        if not isinstance(cursor.get(part), dict):
            cursor[part] = {}
        cursor = cursor[part]
    cursor[leaf] = value
    return tree


@FUZZ
@given(path=st.sampled_from(FIELDS + UNKNOWN), value=HOSTILE)
@example(path="data.dataset", value="")
@example(path="data.dataset", value="../../etc")  # a directory of no one format
def test_fuzzed_spec_files(path, value):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = _set({**BASE, "tracking": {"runs_root": str(tmp / "runs")}}, path, value)
        (tmp / "spec.json").write_text(json.dumps(spec))  # NaN/Infinity and 400-digit integers included
        code, output = run_cli(tmp, str(tmp / "spec.json"))
        event(f"outcome: {code}")
        if code == 2:  # the field, or the field that a deeper path replaced ("data.seq_len" for data.seq_len.x)
            parts = path.split(".")
            assert str(tmp / "spec.json") in output and any(p in output for p in parts[1:] or parts), output


# argv holds neither NUL nor lone surrogates (they cannot be encoded)
TOKEN_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
VALUE_TEXT = st.one_of(
    TOKEN_TEXT,
    st.sampled_from(["1e999", "-1e999", "nan", "NaN", "inf", "1" * 5000, "None", "{}", "[]", "0x10", "1_000"]),
    st.integers(min_value=1, max_value=3000).map(lambda n: "{'a': " * n + "1" + "}" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
)


@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(FIELDS + UNKNOWN), VALUE_TEXT).map(lambda kv: f"--{kv[0]}={kv[1]}"),
            st.tuples(st.sampled_from(FIELDS), HOSTILE).map(lambda kv: f"--{kv[0]}={kv[1]!r}"),
            st.sampled_from(["--", "-", "=", "+", "++", "--=1", "--.=1", "--a..b=1", "x", "{", '{"model": 3}', "--k"]),
            TOKEN_TEXT,
        ),
        min_size=1,
        max_size=4,
    )
)
@example(overrides=["-h"])
@example(overrides=["-h0"])
def test_fuzzed_overrides(overrides):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps({**BASE, "tracking": {"runs_root": str(tmp / "runs")}}))
        code, output = run_cli(tmp, str(tmp / "spec.json"), *overrides)
        event(f"outcome: {code}")
        if code == 2 and "invalid run spec" in output:  # names the override (or file) to blame and a field
            assert "override" in output or str(tmp / "spec.json") in output, output


DEEP = st.integers(min_value=1, max_value=100_000)
FILE_BYTES = st.one_of(
    st.binary(max_size=200),
    TOKEN_TEXT.map(str.encode),
    st.sampled_from([b"", b"  \n", b"\xef\xbb\xbf{}", b"\xff\xfe{", b'{"model": \x80}', b"null", b"[]", b"1" * 5000]),
    DEEP.map(lambda n: b"[" * n + b"]" * n),
    DEEP.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    DEEP.map(lambda n: b'{"model":' * min(n, 3000) + b"{}" + b"}" * min(n, 3000)),
)


@FUZZ
@given(content=FILE_BYTES, as_overrides=st.booleans())
def test_fuzzed_files(content, as_overrides):
    """Malformed JSON, empty files, non-UTF-8 bytes, huge numbers, deep nesting: as a spec or an overrides file."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hostile = tmp / "hostile.json"
        hostile.write_bytes(content)
        if as_overrides:
            (tmp / "spec.json").write_text(json.dumps({**BASE, "tracking": {"runs_root": str(tmp / "runs")}}))
            code, output = run_cli(tmp, str(tmp / "spec.json"), "--overrides", str(hostile))
        else:
            code, output = run_cli(tmp, str(hostile), f"--tracking.runs_root={tmp / 'runs'}")
        event(f"outcome: {code}")
        if code == 2:
            assert str(hostile) in output, output


@pytest.mark.parametrize(
    "override, field",
    [
        ("--train.lr=-0.1", "train.lr"),
        ("--model.top_k=5", "top_k (5) cannot exceed n_experts"),
        ("--model.n_heads=3", "divisible by n_heads"),
        ("--data.seq_len=256", "exceeds model.max_seq_len"),
        ("--model.d_ff=1e308", "model.d_ff"),
        ("--train.lr=1e999", "train.lr"),
        ("--name=../../escape", "name"),
        ("--experiment=a/b", "experiment"),
        ("--tracking.runs_root=", "tracking.runs_root"),
    ],
)
def test_named_hostile_cases(tmp_path, override, field):
    """The cases the issue lists, each checked by name."""
    (tmp_path / "spec.json").write_text(json.dumps({**BASE, "tracking": {"runs_root": str(tmp_path / "runs")}}))
    code, output = run_cli(tmp_path, str(tmp_path / "spec.json"), override)
    assert code == 2 and field in output, output
