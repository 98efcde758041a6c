"""Spec loading and overrides in every form the W&B agent produces.

`wandb agent` turns sweep parameters into argv with Python `str()` of each value (see the
`${args*}` macros): `--train.lr=0.003`, `--model={'n_experts': 8}`, `--flag=False`, `--k v`,
`k=v`, `--flag` (true bool), `+k=v`/`++k=v` (Hydra forms), a JSON object (`${args_json}`),
or a JSON file (`${args_json_file}`, passed with `--overrides FILE`). All of them are parsed
into one nested dict, merged deep into the raw spec, then the whole spec is validated once.
"""

from __future__ import annotations

import ast
import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from blueberry.spec import RunSpec

# A spec, an overrides file or a sweep YAML is a few KB; the cap keeps `/dev/zero` or a runaway file from
# being read without bound.
MAX_FILE_BYTES = 1 << 20
MAX_PROBLEMS = 20  # listed per error; the rest are counted
MAX_SHOWN = 200  # characters of any one user-given text (an override, a key, a path) echoed in a message


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """`text`, cut to `limit` characters with the number left out: a 120 KB override is never echoed whole."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


class SpecError(Exception):
    """A spec or override is invalid. `problems` are (where, field path, reason) triples; `more` counts the
    problems found but not listed (see MAX_PROBLEMS)."""

    def __init__(self, problems: list[tuple[str, str, str]], title: str = "invalid run spec", more: int = 0):
        self.problems = problems
        self.title = title
        self.more = more + max(0, len(problems) - MAX_PROBLEMS)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [
            f"{clip(where)}: {clip(path)}: {clip(reason)}" if path else f"{clip(where)}: {clip(reason)}"
            for where, path, reason in self.problems[:MAX_PROBLEMS]
        ]
        if self.more:
            lines.append(f"… and {self.more:,} more")
        return f"{self.title}\n  " + "\n  ".join(lines)


def parse_value(text: str) -> Any:
    """A value as the agent wrote it: Python literal (repr), else JSON, else the raw string. DuplicateKey where an
    object in it names a key twice: both would keep the last, silently."""
    try:
        tree = ast.parse(text.lstrip(" \t"), mode="eval")  # as literal_eval parses a string
        value = ast.literal_eval(tree)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    else:
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                _unique_keys([(ast.literal_eval(key), None) for key in node.keys])  # (-1 and (1, 2) are no Constant)
        return value
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey:
        raise
    except (ValueError, RecursionError):
        return text


def parse_override_args(args: list[str] | tuple[str, ...]) -> list[tuple[str, dict]]:
    """Turn argv tokens into (source text, nested override dict) pairs, in order."""
    parsed: list[tuple[str, dict]] = []
    tokens = list(args)
    i = 0
    while i < len(tokens):
        source, override, i = _parse_override(tokens, i)
        parsed.append((source, override))
    return parsed


def _parse_override(tokens: list[str], i: int) -> tuple[str, dict, int]:
    """(source text, nested override dict, index of the next token) of the override starting at `tokens[i]`."""
    token = tokens[i]
    i += 1
    stripped = token.lstrip("-+")
    if token.lstrip().startswith("{"):  # ${args_json}: one JSON object holding every parameter
        value = _value_of(token, token)
        if not isinstance(value, dict):
            raise SpecError([(f"override {token!r}", "", "expected a JSON object")])
        return f"override {token}", expand_dotted(value, f"override {token}"), i
    if not stripped:
        raise SpecError([(f"override {token!r}", "", "empty override")])
    if "=" in stripped:
        key, raw = stripped.split("=", 1)
        value = _value_of(raw, token)
    elif token.startswith("-") and i < len(tokens) and not tokens[i].startswith("--"):
        token = f"{token} {tokens[i]}"  # ${args_no_equals}: --k v
        key, value = stripped, _value_of(tokens[i], token)
        i += 1
    elif token.startswith("-"):
        key, value = stripped, True  # ${args_no_boolean_flags}: a true bool is a bare flag
    else:
        raise SpecError([(f"override {token!r}", "", "expected KEY=VALUE or --KEY=VALUE")])
    source = f"override {token}"
    return source, expand_dotted({key: value}, source), i


def _value_of(text: str, token: str) -> Any:
    """parse_value(text) of the override `token`; one naming a key twice is a SpecError naming the override."""
    try:
        return parse_value(text)
    except DuplicateKey as exc:
        raise SpecError([(f"override {token!r}", "", f"key {clip(str(exc))!r} appears twice in one object")]) from None


def expand_dotted(flat: dict, source: str) -> dict:
    """{'train.lr': 1, 'model': {'d_model': 8}} -> {'train': {'lr': 1}, 'model': {'d_model': 8}}."""
    nested: dict = {}
    set_by: dict[str, str] = {}  # each field set so far -> the key that set it: one field, one key
    for key, value in flat.items():
        parts = str(key).split(".")
        if any(not part for part in parts):
            raise SpecError([(source, str(key), "malformed key")])
        if isinstance(value, dict):
            value = expand_dotted(value, source)
        here = ".".join(parts)
        for leaf in [f"{here}.{path}" for path in leaf_paths(value)] if isinstance(value, dict) and value else [here]:
            if leaf in set_by:  # deep_merge would keep whichever came last, silently
                raise SpecError([(source, str(key), f"sets {leaf}, which key {set_by[leaf]!r} sets too")])
            set_by[leaf] = str(key)
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
            if not isinstance(cursor, dict):
                raise SpecError([(source, str(key), "conflicts with a scalar override")])
        deep_merge(cursor, {parts[-1]: value})
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    """Merge `update` into `base` in place: dicts merge, everything else replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def value_at(tree: Any, dotted: str, default: Any = None) -> Any:
    """tree["a"]["b"] for "a.b", or `default` where a part is missing or not a dict."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        paths.extend(leaf_paths(value, path) if isinstance(value, dict) and value else [path])
    return paths


def read_text_capped(path: str | Path, what: str, title: str = "invalid run spec") -> str:
    """A small text file's contents, or SpecError naming the file: missing, unreadable, not UTF-8, or over
    MAX_FILE_BYTES (read no further than that, so an endless stream such as /dev/zero returns at once)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" in {Path.cwd()}"  # relative: to where the command runs
        raise SpecError([(str(path), "", f"{what} file not found{where}")], title) from None
    except OSError as exc:
        raise SpecError([(str(path), "", f"cannot read {what} file: {exc.strerror or exc}")], title) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError([(str(path), "", f"{what} file is larger than {MAX_FILE_BYTES >> 20} MiB")], title)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([(str(path), "", f"cannot read {what} file: not UTF-8 text ({exc.reason})")], title) from None


class DuplicateKey(ValueError):
    """A JSON object names one key twice (json.loads would keep the last, silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def read_json_object(path: str | Path, what: str) -> dict:
    """Read a JSON object from a file, or raise SpecError naming the file."""
    path = Path(path)
    text = read_text_capped(path, what)
    if not text.strip():
        raise SpecError([(str(path), "", f"{what} file is empty")])
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as exc:
        raise SpecError([(str(path), "", f"key {clip(str(exc))!r} appears twice in one object")]) from None
    except json.JSONDecodeError as exc:
        raise SpecError(
            [(str(path), "", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
        ) from None
    except RecursionError:
        raise SpecError([(str(path), "", "JSON nested too deeply")]) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int-parsing limit)
        raise SpecError([(str(path), "", f"not valid JSON: {exc}")]) from None
    if not isinstance(value, dict):
        raise SpecError([(str(path), "", f"{what} must be a JSON object, got {type(value).__name__}")])
    return value


def load_spec(
    spec_path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), override_files: tuple[str, ...] = ()
) -> RunSpec:
    """Read a spec file, merge overrides (files first, then argv, in order) and validate once."""
    base_source = str(spec_path) if spec_path else "defaults"
    raw, sources = merged_spec(spec_path, overrides, override_files)
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        blame = _Blame(sources, base_source)
        errors = exc.errors(include_url=False, include_context=False)
        problems = [_problem(err, blame) for err in errors[:MAX_PROBLEMS]]
        raise SpecError(problems, more=len(errors) - len(problems)) from None


def merged_spec(
    spec_path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), override_files: tuple[str, ...] = ()
) -> tuple[dict, dict[str, str]]:
    """The spec as written, its overrides merged in (files first, then argv, in order), not yet validated; and
    the source that set each leaf (the last one applied)."""
    base_source = str(spec_path) if spec_path else "defaults"
    raw = read_json_object(spec_path, "spec") if spec_path else {}
    sources: dict[str, str] = {path: base_source for path in leaf_paths(raw)}
    layers = [(str(f), expand_dotted(read_json_object(f, "overrides"), str(f))) for f in override_files]
    layers += parse_override_args(overrides)
    for source, layer in layers:
        deep_merge(raw, layer)
        for path in leaf_paths(layer):  # re-insert: later layers come last and win the blame below
            sources.pop(path, None)
            sources[path] = source
    return raw, sources


class _Blame:
    """Which source (file or override) set a field path: the last one applied that set the path, a parent of it
    or a child of it. Indexed once, so blaming each of n errors costs its path depth, not n."""

    def __init__(self, sources: dict[str, str], base_source: str):
        self.base_source = base_source
        self.order = {path: (rank, source) for rank, (path, source) in enumerate(sources.items())}
        self.latest_below: dict[str, tuple[int, str]] = {}  # path -> the latest source set under it
        for path, (rank, source) in self.order.items():
            parts = path.split(".")
            for depth in range(1, len(parts)):
                prefix = ".".join(parts[:depth])
                if self.latest_below.get(prefix, (-1, ""))[0] < rank:
                    self.latest_below[prefix] = (rank, source)

    def __call__(self, path: str) -> str:
        parts = path.split(".")
        found = [self.order.get(".".join(parts[:depth])) for depth in range(1, len(parts) + 1)]
        found.append(self.latest_below.get(path))
        found = [f for f in found if f is not None]
        return max(found)[1] if found else self.base_source

    def named_in(self, section: str, message: str) -> str | None:
        """Of the fields under `section` (a dotted path, "" for the whole spec) that a source set, the one set last
        among those `message` names (by its own name: `n_heads` for model.n_heads), or None."""
        prefix = f"{section}." if section else ""
        names = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)", "", message)  # not the values it quotes, nor its asides
        named = [
            (rank, path)
            for path, (rank, _) in self.order.items()
            if path.startswith(prefix) and re.search(rf"(?<!\w){re.escape(path.rsplit('.', 1)[-1])}\b", names)
        ]
        return max(named)[1] if named else None


def _problem(err: dict, blame: _Blame) -> tuple[str, str, str]:
    path = ".".join(str(part) for part in err["loc"])
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        # a check across a section's fields fails at the section: blame the field it names that was set last
        path = blame.named_in(path, err["msg"]) or path
    where = blame(path)
    reason = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing", "extra_forbidden") and "input" in err and not isinstance(err["input"], dict):
        reason += f" (got {_short(err['input'])})"
    if err["type"] == "extra_forbidden":
        reason = "unknown field"
        close = difflib.get_close_matches(str(err["loc"][-1]), _field_names(err["loc"][:-1]), n=1)
        if close:
            reason += f" (did you mean '{close[0]}'?)"
    elif err["type"] == "literal_error" and isinstance(err.get("input"), str):
        # pydantic's message lists the allowed values, quoted: "Input should be 'cosine' or 'constant'"
        allowed = re.findall(r"'([^']*)'", err["msg"])
        close = difflib.get_close_matches(err["input"], allowed, n=1)
        if close:
            reason += f" (did you mean '{close[0]}'?)"
    return where, path, reason


def _field_names(loc: tuple) -> list[str]:
    """The fields the spec section at `loc` accepts (e.g. ("model",) -> ModelSpec's fields)."""
    model: Any = RunSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = object()


def unreached(params: dict, written: dict, run: RunSpec) -> list[str]:
    """Dotted names of the swept values the run does not get. The run's spec (`run`, from its command line, which
    `written` is before validation) is compared, field by field, with the spec it would be if the parameters were
    applied last, as `${args_json_file}` applies them: so dotted names (`train.lr:`), quoted numbers that
    validation reads as numbers and fields validation derives (a null model.variant) compare as the run sees
    them. Parameters the spec cannot take at all are not this check's: they fail validation."""
    swept = expand_dotted(params, "the sweep's parameters")
    try:
        meant = RunSpec.model_validate(deep_merge(copy.deepcopy(written), swept)).model_dump(mode="json")
    except ValidationError:
        return []
    got = run.model_dump(mode="json")
    return [path for path in leaf_paths(swept) if value_at(meant, path, _MISSING) != value_at(got, path, _MISSING)]
