"""Sweep YAMLs: W&B-native sweep configs, validated by W&B's own `sweeps` engine schema."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from blueberry.overrides import SpecError, read_text_capped

INVALID = "invalid sweep"


def engine():
    """W&B's sweep engine (the PyPI `sweeps` package, what W&B runs server-side)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its pydantic deprecation warnings
            import sweeps
    except ImportError:
        raise SpecError(
            [("sweeps", "", "W&B's sweep engine is not installed: pip install --no-deps sweeps==0.3.0")], INVALID
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


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML; errors name the file and carry W&B's own violation messages."""
    path = Path(path)
    text = read_text_capped(path, "sweep", INVALID)
    try:
        config = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise SpecError([(str(path), "", f"not valid YAML: {exc}")], INVALID) from None
    if not isinstance(config, dict):
        raise SpecError(
            [(str(path), "", "a sweep file must hold a mapping (method:, parameters:, command:, ...)")], INVALID
        )
    # validate=True / SweepConfig() silently drop nested `parameters:` (wandb/sweeps#8): check the schema only.
    violations = list(dict.fromkeys(engine().schema_violations_from_proposed_config(config)))  # it repeats some
    if violations:
        raise SpecError([(str(path), "", violation) for violation in violations], INVALID)
    if not isinstance(config.get("command"), list) or not all(
        isinstance(t, (str, int, float)) for t in config["command"]
    ):
        raise SpecError(
            [(str(path), "command", "a list of strings is required (the `blueberry run` command line)")], INVALID
        )
    _engine_accepts(path, config)
    try:
        canonical = json.dumps(config, sort_keys=True, default=str)
    except TypeError:  # keys of two types in one mapping cannot be sorted; no earlier version had an id for these
        canonical = json.dumps(_str_keys(config), sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    name = str(config.get("name") or path.stem)
    return Sweep(path=path, config=config, name=name, sweep_id=f"{_slug(name)}-{digest}")


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
