"""Runs → configurations (same spec up to the seed) → per-configuration statistics over seeds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from blueberry.models import registry
from blueberry.report.records import Run
from blueberry.spec import RunSpec

# Spec fields that do not change what is being measured: runs differing only here are seeds of one configuration.
NOT_CONFIG = (
    "seed", "name", "experiment", "tags", "tracking",
    "train.progress", "train.threads", "train.price_per_hour", "train.keep_checkpoints", "train.checkpoint_every",
)  # fmt: skip
_NOT_CONFIG_CHILDREN = tuple(f"{name}." for name in NOT_CONFIG)  # tracking.runs_root, …


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = tuple(value) if isinstance(value, list) else value
    return out


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return flatten(RunSpec().to_json_dict())


def config_of(run: Run) -> dict[str, Any]:
    """The run's flattened spec minus NOT_CONFIG. A field the run's spec lacks (it predates the field) takes
    today's default: new spec fields default to the old behaviour, so such runs still group with newer ones.
    Precision 'auto' is the precision the run's hardware got (its record says which): a bf16 run and an fp32
    run of one spec, on two machines, are two configurations."""
    own = flatten(run.spec)
    spec = {**_defaults(), **own}
    resolved = (run.header.get("hardware") or {}).get("precision")
    if spec.get("train.precision") == "auto" and resolved:
        spec["train.precision"] = resolved
    # the model's choices as registry.canonical states them: a preset stands for its attention and ffn
    for name in registry.CHOICE_FIELDS:
        spec.pop(f"model.{name}", None)
    choices = registry.canonical({name: own.get(f"model.{name}") for name in registry.CHOICE_FIELDS})
    spec.update({f"model.{name}": value for name, value in choices.items()})
    return {k: v for k, v in spec.items() if k not in NOT_CONFIG and not k.startswith(_NOT_CONFIG_CHILDREN)}


@dataclass
class Stat:
    """Mean ± sample sd (ddof 1) over seeds; sd is None with one value, everything None with none."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def sd(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else None

    def fmt(self, spec: str = ".4f", scale: float = 1.0, suffix: str = "") -> str:
        if self.mean is None:
            return "—"
        text = f"{self.mean * scale:{spec}}{suffix}"
        if self.sd is not None:
            text += f" ± {self.sd * scale:{spec}}{suffix}"
        return text


def gap_vs_noise(better: Stat, worse: Stat) -> tuple[float, float | None]:
    """(gap in means, noise = 2 standard errors of that difference); noise None without ≥2 seeds on both sides."""
    gap = worse.mean - better.mean
    if better.sd is None or worse.sd is None:
        return gap, None
    return gap, 2 * math.sqrt(better.sd**2 / better.n + worse.sd**2 / worse.n)


@dataclass
class Group:
    """One configuration: all its runs, whatever their state."""

    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    @cached_property  # read for every cell of every table; `runs` is complete once group_runs returns
    def ok(self) -> list[Run]:
        """The finished runs aggregated: one per seed, the newest (a finished spec run again is `<id>-2`, the
        same seed: counted twice it would pass for two seeds with no spread between them)."""
        newest: dict[Any, Run] = {}
        for run in self.runs:
            if run.ok:
                seed = run.seed if run.seed is not None else id(run)  # no seed recorded: each run its own
                if seed not in newest or _started(run) >= _started(newest[seed]):
                    newest[seed] = run
        kept = {id(run) for run in newest.values()}
        return [r for r in self.runs if id(r) in kept]

    @property
    def seeds(self) -> list:
        return sorted({r.seed for r in self.ok}, key=str)

    def stat(self, metric: str, scale: float = 1.0) -> Stat:
        return Stat([r.metric(metric) * scale for r in self.ok if r.metric(metric) is not None])

    @property
    def minutes(self) -> Stat:
        return self.stat("time/train_s", 1 / 60)

    @property
    def loss(self) -> Stat:
        return self.stat("val/loss")

    def params(self, kind: str) -> float | None:
        counts = [r.param_count(kind) for r in self.runs if r.param_count(kind) is not None]
        return counts[0] if counts else None

    @property
    def states(self) -> str:
        """ "3" or "2 (+1 failed)": finished seeds, then the runs not aggregated."""
        others: dict[str, int] = {}
        kept = {id(run) for run in self.ok}
        for run in self.runs:
            if id(run) not in kept:
                state = "older run of a seed" if run.ok else run.state if run.state != "finished" else "no val/loss"
                others[state] = others.get(state, 0) + 1
        extra = ", ".join(f"+{n} {state}" for state, n in sorted(others.items()))
        return f"{len(self.ok)}" + (f" ({extra})" if extra else "")

    def get(self, dotted: str) -> Any:
        return self.config.get(dotted)


def _started(run: Run) -> tuple[str, str]:
    return str(run.header.get("created_at") or ""), run.id


def group_runs(runs: list[Run]) -> list[Group]:
    """Group by configuration, in order of first appearance; runs without a readable spec are left out."""
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.spec:
            continue
        config = config_of(run)
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, Group(config)).runs.append(run)
    return list(groups.values())


def varying_keys(groups: list[Group]) -> list[str]:
    keys = sorted({k for g in groups for k in g.config})
    return [k for k in keys if len({json.dumps(g.config.get(k), default=str) for g in groups}) > 1]


def fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def label_groups(groups: list[Group], first: str | None = None) -> None:
    """Label each group by everything that differs between the groups, `first` (e.g. the variant) first and,
    for the variant, by its bare name: "mlp", or "mlp, steps=400" where more than the variant differs."""
    keys = varying_keys(groups)
    if first and (first in keys or len(groups) == 1):
        keys = [first] + [k for k in keys if k != first]
    for g in groups:
        parts = []
        for k in keys:
            if k not in g.config and k in ("model.attention", "model.ffn"):  # a preset: its variant names them
                continue
            if k not in g.config:  # left out by registry.canonical as the default (model.balance)
                parts.append(f"{k.split('.')[-1]}=default")
                continue
            if k == keys[0] == "model.variant":
                if g.get(k) is not None:  # no preset: its attention and ffn say what it is
                    parts.append(fmt_value(g.get(k)))
                continue
            parts.append(f"{k.split('.')[-1]}={fmt_value(g.get(k))}")
        g.label = ", ".join(parts) or "(one configuration)"


def rank(groups: list[Group]) -> list[Group]:
    """By mean final val loss; configurations without a finished run last."""
    return sorted(groups, key=lambda g: (g.loss.mean is None, g.loss.mean if g.loss.mean is not None else 0.0))
