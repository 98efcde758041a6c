"""Sweep YAMLs: W&B-native sweep configs, validated by W&B's own `sweeps` engine schema."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from blueberry.overrides import SpecError, read_text_capped
from blueberry.sweep.launch import agent_macros, unknown_macro

INVALID = "invalid sweep"


def engine():
    """W&B's sweep engine (the PyPI `sweeps` package, what W&B runs server-side)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its pydantic deprecation warnings
            import sweeps
    except ImportError:
        raise SpecError(
            [("sweeps", "", "W&B's sweep engine is not installed: pip install sweeps==0.3.0 (it asks for numpy<2)")],
            INVALID,
        ) from None
    return sweeps


@dataclass
class Sweep:
    path: Path
    config: dict
    name: str
    sweep_id: str  # stable local id: same YAML, same id, so a re-run resumes

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def run_cap(self) -> int | None:
        return self.config.get("run_cap")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it keeps the last, silently: `method: grid`
    then `method: random` ran a random sweep)."""

    def construct_mapping(self, node, deep=False):
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:  # (a list, not a set: YAML keys need not be hashable before the mapping is built)
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


# A number with an exponent: YAML 1.2 and JSON read `1e-3` as a float; YAML 1.1 (PyYAML) only with a dot and a signed
# exponent (`1.0e-3`), else as text.
_EXPONENT_NUMBER = re.compile(
    r"^(?P<sign>[-+]?)(?=\.?[0-9])(?P<whole>[0-9]*)(?:\.(?P<fraction>[0-9]*))?"
    r"(?P<e>[eE])(?P<exponent_sign>[-+]?)(?P<exponent>[0-9]+)$"
)


class _Yaml12NumberLoader(yaml.SafeLoader):
    """YAML's safe loader reading `1e-3` as the float YAML 1.2 reads: only to find the numbers YAML 1.1 read as
    text, never to load a sweep (`wandb sweep` reads the same file with PyYAML, as text)."""


# PyYAML tries a scalar's resolvers in order: this one gets only what YAML 1.1's int and float left as text.
_Yaml12NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_NUMBER, list("-+.0123456789"))


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error in one line: where (line and column, from 1) and what, in its own words (its message spans
    lines, names the input `<unicode string>` and shows the line with a caret, and came out clipped). A `${…}`
    macro in a `[…]` list, whose `{` PyYAML reads as a mapping's, gets the fix."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return "not valid YAML: " + " ".join(str(exc).replace('"<unicode string>", ', "").split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    message = f"not valid YAML at {where}: {problem}" + (f" ({context})" if context else "")
    lines = text.splitlines()
    if context == "while parsing a flow sequence" and mark.line < len(lines) and "${" in lines[mark.line]:
        message += '; in a […] list quote each ${…} macro ("${args}"), or write one item a line (- ${args})'
    return message


def holds_a_sweep(path: str | Path) -> bool:
    """Whether a YAML file is meant as a W&B sweep: a mapping with a top-level key of W&B's sweep schema that no
    run spec has (`method:`, `parameters:`, `command:`, ...), whether or not the rest is valid; YAML that does not
    parse counts as one (`load_sweep` says where it breaks). SpecError where the file cannot be read."""
    from blueberry.spec import RunSpec

    try:
        tree = yaml.safe_load(read_text_capped(path, "spec"))
    except yaml.YAMLError:
        return True
    sweep_keys = set(engine().config.schema.validator.schema["properties"]) - set(RunSpec.model_fields)
    return isinstance(tree, dict) and not sweep_keys.isdisjoint(tree)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML; errors name the file, the field and what W&B's own schema or engine says."""
    path = Path(path)
    text = read_text_capped(path, "sweep", INVALID)
    try:
        config = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise SpecError([(str(path), "", _yaml_problem(exc, text))], INVALID) from None
    if not isinstance(config, dict):
        raise SpecError(
            [(str(path), "", "a sweep file must hold a mapping (method:, parameters:, command:, ...)")], INVALID
        )
    as_yaml12 = yaml.load(text, Loader=_Yaml12NumberLoader)  # a mapping too: only some scalars differ
    misread = _numbers_read_as_text(config.get("parameters"), as_yaml12.get("parameters"))
    if misread:
        raise SpecError([(str(path), field, reason) for field, reason in misread], INVALID)
    violations = _schema_violations(config)
    if violations:
        raise SpecError([(str(path), field, reason) for field, reason in violations], INVALID)
    command_problems = _command_problems(config.get("command"))
    if command_problems:
        raise SpecError([(str(path), "command", problem) for problem in command_problems], INVALID)
    _engine_accepts(path, config)
    try:
        canonical = json.dumps(config, sort_keys=True, default=str)
    except TypeError:  # keys of two types in one mapping cannot be sorted; no earlier version had an id for these
        canonical = json.dumps(_str_keys(config), sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    name = str(config.get("name") or path.stem)
    return Sweep(path=path, config=config, name=name, sweep_id=f"{_slug(name)}-{digest}")


def _numbers_read_as_text(parameters, parameters_as_yaml12, prefix: str = "parameters") -> list[tuple[str, str]]:
    """(field path, reason) for each number in a parameter's value, values, bounds... that YAML 1.1 read as text
    (`1e-3`). Our spec would coerce it, but the agent's parameters file carries the string and `wandb.init`
    prefers that file: W&B would record the parameter as text (categorical plots and filters, a str in reports),
    and a distribution's bounds fail W&B's schema with no word on why."""
    if not isinstance(parameters, dict) or not isinstance(parameters_as_yaml12, dict):
        return []  # W&B's schema says what is wrong with it
    found = []
    for name, parameter in parameters.items():
        as_yaml12 = parameters_as_yaml12.get(name)  # (a name that is itself such a number has another key there)
        if not isinstance(parameter, dict) or not isinstance(as_yaml12, dict):
            continue
        where = f"{prefix}.{name}"
        for field, value in parameter.items():
            if field != "parameters":
                found += _texts_yaml12_reads_as_numbers(value, as_yaml12.get(field), f"{where}.{field}")
        found += _numbers_read_as_text(parameter.get("parameters"), as_yaml12.get("parameters"), f"{where}.parameters")
    return found


def _texts_yaml12_reads_as_numbers(value, as_yaml12, where: str) -> list[tuple[str, str]]:
    """(field path, reason) for each text in `value`, at any depth, that is a float in `as_yaml12`."""
    if isinstance(value, str) and isinstance(as_yaml12, float):
        n = _EXPONENT_NUMBER.match(value)
        written = f"{n['sign']}{n['whole'] or 0}.{n['fraction'] or 0}{n['e']}{n['exponent_sign'] or '+'}{n['exponent']}"
        reason = (
            f"YAML 1.1 (PyYAML, which `wandb sweep` reads sweep files with too) reads {value} as text, not a number "
            f"(W&B would record the parameter as text, or refuse it as a bound); write {written}"
        )
        return [(where, reason)]
    if isinstance(value, list) and isinstance(as_yaml12, list):
        items = zip(value, as_yaml12)
        return [
            found
            for i, (v, v12) in enumerate(items)
            for found in _texts_yaml12_reads_as_numbers(v, v12, f"{where}.{i}")
        ]
    if isinstance(value, dict) and isinstance(as_yaml12, dict):
        return [
            found
            for key, v in value.items()
            for found in _texts_yaml12_reads_as_numbers(v, as_yaml12.get(key), f"{where}.{key}")
        ]
    return []


def _schema_violations(config: dict) -> list[tuple[str, str]]:
    """(field path, reason) for each way `config` breaks W&B's sweep schema, then W&B's checks beyond it (min
    below max, probabilities that sum to 1); W&B's own list says neither where nor, inside a parameter, why."""
    schema_errors = list(engine().config.schema.validator.iter_errors(config))
    if schema_errors:  # (W&B's checks beyond the schema raise on some of what it refuses: a parameter not a mapping)
        explained = (_explained(error) for error in schema_errors)
        return list(dict.fromkeys((".".join(map(str, e.absolute_path)), e.message) for e in explained))
    # validate=True / SweepConfig() silently drop nested `parameters:` (wandb/sweeps#8): check the schema only.
    beyond_schema = engine().schema_violations_from_proposed_config(config)
    return [("", message) for message in dict.fromkeys(beyond_schema)]  # (it repeats some)


def _explained(error):
    """The error that says what is wrong. Where a value must match one of several schemas (`anyOf`: W&B's kinds
    of parameter), the error of the kind it is meant to be: the kinds whose errors name no other distribution
    (`enum`) and that the value's keys and type fit (no error at its own level), if they agree."""
    from jsonschema.exceptions import best_match, relevance  # W&B's engine brings it

    if error.validator != "anyOf" or not error.context:
        return best_match([error])
    by_kind = {}
    for sub in error.context:
        by_kind.setdefault(sub.relative_schema_path[0], []).append(sub)

    def misfit(errors):
        return (any(e.validator in ("enum", "const") for e in errors), any(not e.relative_path for e in errors))

    closest = min(map(misfit, by_kind.values()))
    said = {
        (tuple(e.absolute_path), e.message): e
        for e in (_explained(max(errors, key=relevance)) for errors in by_kind.values() if misfit(errors) == closest)
    }
    if len(said) == 1:
        return next(iter(said.values()))
    return _unknown_keys(error) or error


def _unknown_keys(error):
    """Where no kind fits because the value has a key that no kind has (a typo: `valuse:`), an error saying so."""
    from jsonschema.exceptions import ValidationError

    known = set(_property_names([_resolved(kind) for kind in error.validator_value]))
    unknown = [key for key in error.instance if key not in known] if isinstance(error.instance, dict) else []
    if not unknown:
        return None
    said = []
    for key in unknown:
        close = " or ".join(map(repr, difflib.get_close_matches(str(key), sorted(known), n=2)))
        said.append(f"unknown key {key!r}" + (f" (did you mean {close}?)" if close else ""))
    return ValidationError(f"{'; '.join(said)}; W&B's keys here: {', '.join(sorted(known))}", path=error.absolute_path)


def _resolved(schema: dict) -> dict:
    """`schema` with a `$ref` into W&B's sweep schema's definitions followed."""
    ref = schema.get("$ref", "")
    if not ref.startswith("#/definitions/"):
        return schema
    return engine().config.schema.validator.schema["definitions"][ref.removeprefix("#/definitions/")]


def _property_names(schemas: list):
    """The property names the schemas (and the alternatives nested in them) allow."""
    for schema in schemas:
        if isinstance(schema, dict):
            yield from schema.get("properties", {})
            yield from _property_names([_resolved(s) for s in schema.get("anyOf", []) + schema.get("oneOf", [])])


def _command_problems(command) -> list[str]:
    """What makes `command:` no command line the agent can run as written."""
    if not isinstance(command, list) or not all(isinstance(t, (str, int, float)) for t in command):
        return ["a list of strings is required (the `blueberry run` command line)"]
    if not command:
        return [
            "it is empty, so W&B's agent would run its default, `${env} ${interpreter} ${program} ${args}` (python "
            "with the sweep's `program:`), not `blueberry run`: write the command line"
        ]
    unknown = [token for token in map(str, command) if unknown_macro(token)]
    if not unknown:
        return []
    said = [
        f"{token}: the agent splices this dict's keys into the command, not a command line"
        if token == "${args_dict}"
        else f"{token}: no macro of W&B's agent, which drops the token from the command without a word"
        for token in unknown
    ]
    return [*said, f"W&B's macros (${{name}}): {', '.join(agent_macros())}, envvar:NAME"]


def _engine_accepts(path: Path, config: dict) -> None:
    """SpecError unless W&B's engine can propose a run and judge early termination for `config`: its schema
    allows what its engine refuses (a distribution in a grid, bayes or hyperband without `metric:`, method
    `custom`), which would otherwise surface only once trials run."""
    try:
        engine().next_run(config, [], validate=False)
        if config.get("early_terminate"):
            engine().stop_runs(config, [])
    except ValueError as exc:
        message = re.sub(r"\.wbnest\[[0-9a-f]+\]", "", str(exc))  # the engine's name for a nested section
        raise SpecError([(str(path), "", f"W&B's sweep engine refuses it: {message}")], INVALID) from None


def _str_keys(value):
    """`value` with every mapping key a string, as JSON (and W&B) has them: YAML allows `{1: a, b: c}`."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:48].strip("-") or "sweep"
