"""Which table layout each experiment gets: a small, ordered list of rules matched on the experiment name.

The study's experiments (named as in the sweep YAMLs) get the study's layouts; any other experiment gets
the generic table, so every experiment with runs appears in the report. A CPU twin of an experiment
(suffix "-cpu") is recognised as that experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from blueberry.models.registry import DEFAULT_PRESET

TWIN_SUFFIX = "-cpu"


@dataclass(frozen=True)
class Study:
    pattern: str  # fnmatch pattern on the experiment name (without the "-cpu" suffix)
    kind: str  # ablation | lr | extended | generic
    title: str
    # Timeline baseline: spec values (dotted paths) naming the baseline configuration; empty: the
    # configuration whose runs are tagged "baseline", if any.
    baseline: dict = field(default_factory=dict)
    extended: str | None = None  # the experiment holding this study's extended run (T3 "Phase" table)


STUDIES: tuple[Study, ...] = (
    Study("exp1-ablation", "ablation", "Experiment 1: ablation of the variants", {"model.variant": DEFAULT_PRESET}),
    Study("factorial", "ablation", "Factorial: attention × feed-forward", {"model.variant": DEFAULT_PRESET}),
    Study(
        "exp2-lr-attention-mlp",
        "lr",
        "Experiment 2: learning rate for DeepSeek attention + MLP",
        {"train.lr": 0.01},
        extended="exp2-extended",
    ),
    Study(
        "exp3-lr-attention-moe",
        "lr",
        "Experiment 3: learning rate for DeepSeek attention + GLM4 MoE",
        {"train.lr": 0.01},
        extended="exp3-extended",
    ),
    Study(
        "exp3-experts",
        "generic",
        "Experiment 3: experts × top-k",
        {"model.n_experts": 4, "model.top_k": 2},
    ),
    Study("exp2-extended", "extended", "Experiment 2: extended run"),
    Study("exp3-extended", "extended", "Experiment 3: extended run"),
    # The T4 README's timeline experiments (sweeps/t4/*.yaml); each baseline is experiments/t4_preset.json's value
    # of what the sweep varies (its CPU twin sweeps the same values from experiments/cpu_base.json).
    Study("t4-lr", "lr", "T4: learning rate", {"train.lr": 0.01}),
    Study("t4-experts", "generic", "T4: number of experts", {"model.n_experts": 8}),
    Study("t4-schedule", "generic", "T4: LR schedule", {"train.warmup_fraction": 0.1, "train.min_lr_ratio": 0.1}),
    Study("t4-accum-dropout", "generic", "T4: accumulation × dropout", {"train.grad_accum": 3, "model.dropout": 0.1}),
    # Catch-alls, so new experiments named by the same conventions get the right layout.
    Study("*ablation*", "ablation", "Ablation", {"model.variant": DEFAULT_PRESET}),
    Study("*-lr-*", "lr", "Learning-rate sweep", {"train.lr": 0.01}),
    Study("*-lr", "lr", "Learning-rate sweep", {"train.lr": 0.01}),
    Study("*extended*", "extended", "Extended run"),
    Study("t4-*", "generic", "T4 experiment"),
)
GENERIC = Study("*", "generic", "Experiment")


def base_name(experiment: str) -> tuple[str, str]:
    """("exp1-ablation", "-cpu") for "exp1-ablation-cpu"."""
    if experiment.endswith(TWIN_SUFFIX):
        return experiment[: -len(TWIN_SUFFIX)], TWIN_SUFFIX
    return experiment, ""


def study_for(experiment: str, studies: tuple[Study, ...] = STUDIES) -> Study:
    name, _ = base_name(experiment)
    for study in studies:
        if fnmatchcase(name, study.pattern):
            return study
    return GENERIC


def extended_experiment(experiment: str, study: Study) -> str | None:
    """The extended-run experiment paired with an LR study, keeping a CPU twin's suffix."""
    if not study.extended:
        return None
    return study.extended + base_name(experiment)[1]


def report_order(experiment: str) -> tuple[int, str]:
    """Experiments in the study's order (exp1, exp2, exp3 LR then extended, T4), then the rest by name."""
    study = study_for(experiment)
    return (STUDIES.index(study) if study in STUDIES else len(STUDIES), experiment)
