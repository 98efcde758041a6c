"""The run record's format, defined once: file names, header keys, metric namespaces, W&B config keys.

The writer (runner.py through tracking/record.py), the report's reader (report/records.py) and the
synthetic-run writer (report/synthetic.py) all build or read a record through this module, so a new metric
namespace or header key is added here and reaches the report without another filter to update.
"""

from __future__ import annotations

import re
from typing import Any

SPEC_FILE, STATUS_FILE, SUMMARY_FILE, METRICS_FILE = "spec.json", "status.json", "summary.json", "metrics.jsonl"
RECORD_FILES = (SPEC_FILE, STATUS_FILE, SUMMARY_FILE, METRICS_FILE)

# metrics.jsonl: each row is {"step": optimizer step, "time": seconds since start, <metric>: value, ...}.
STEP, TIME = "step", "time"
WANDB_STEP = "trainer/step"  # the one step axis in W&B (define_metric), the optimizer step

# Metric names are `<namespace>/<name>`: train/ (loss, LR, gradient norm over the log window), val/, trainer/
# (step, tokens), perf/ (blueberry/train/metrics.py), moe/ (per MoE layer), gpu/ (blueberry/gpu_monitor.py), and in
# the summary only cost/, time/, params/, weights/. A new namespace needs no entry here: every metric reaches the
# summary and the report's history, except the per-expert router loads (one column per layer × expert), which
# stay in metrics.jsonl and W&B.
PER_EXPERT = re.compile(r"^moe/layer\d+/load_e\d+$")


def keep_metric(key: str) -> bool:
    """Whether a logged metric goes into the run's summary and the report's history: all but per-expert loads."""
    return not PER_EXPERT.match(key)


# spec.json: the run's header. The report keeps these keys of it (libraries, code, data stats stay on disk).
HEADER_KEYS = ("params", "data", "causality", "hardware", "wandb", "created_at")


def make_header(
    *,
    run_id: str,
    name: str,
    spec,
    params: dict,
    data: dict,
    hardware: dict,
    created_at: str,
    sweep: dict | None = None,
    **extra: Any,
) -> dict:
    """spec.json's content. `name`: the run's (runner.display_name); `spec` is a RunSpec; `params` {total, active,
    embedding}; `data` {fingerprint, stats, leakage, unigram_loss}; `hardware` the RunPlan's header; `extra`:
    wandb, code, libraries."""
    return {
        "run_id": run_id,
        "name": name,
        "experiment": spec.experiment,
        "seed": spec.seed,
        "sweep": sweep,
        "spec_hash": spec.spec_hash(),
        "spec": spec.to_json_dict(),
        "params": params,
        "data": data,
        "causality": {"checked": True, "ok": True},
        "hardware": hardware,
        **extra,
        "created_at": created_at,
    }


# W&B run config: the spec's sections at the top level plus these derived keys (flat, so W&B can filter and
# group on them); `header_from_wandb_config` maps them back for the report's W&B loader.
SPEC_KEYS = ("name", "experiment", "tags", "seed", "model", "data", "train", "tracking")


def wandb_config(header: dict, name_the_sweep: bool = False) -> dict:
    """The W&B run config of a run whose spec.json is `header`; `name_the_sweep`: a `blueberry sweep` trial's,
    which belongs to no W&B sweep (under `wandb agent` W&B shows the run's sweep itself)."""
    data, params, sweep = header["data"], header["params"], header.get("sweep")
    return {
        **header["spec"],
        "variant": model_label(header["spec"]["model"]),
        "spec_hash": header["spec_hash"],
        "params_total": params["total"],
        "params_active": params["active"],
        "data_fingerprint": data["fingerprint"],
        "unigram_loss": data["unigram_loss"],
        "leakage_val_windows": data["leakage"]["val_windows_with_train_ngram"],
        "leakage_ngram": data["leakage"].get("ngram"),
        "causality_ok": (header.get("causality") or {}).get("ok"),
        "hardware": header["hardware"],
        # keys W&B's run table can filter and group a synced `blueberry sweep` trial on
        **(
            {"sweep_id": sweep["id"], "sweep_name": sweep["name"]}
            if name_the_sweep and (sweep := header["sweep"])
            else {}
        ),
    }


def header_from_wandb_config(config: dict, created_at: str | None = None) -> dict:
    """The header keys the report uses, rebuilt from a W&B run config written by `wandb_config` (the
    integrity section's device, causality and leakage included: else a report from W&B priced no run and said
    none passed the causality probe)."""
    causal = config.get("causality_ok")
    hardware = config.get("hardware")
    return {
        "params": {"total": config.get("params_total"), "active": config.get("params_active")},
        "data": {
            "fingerprint": config.get("data_fingerprint"),
            "unigram_loss": config.get("unigram_loss"),
            "leakage": {
                "val_windows_with_train_ngram": config.get("leakage_val_windows"),
                "ngram": config.get("leakage_ngram"),
            },
        },
        **({"causality": {"checked": True, "ok": causal}} if isinstance(causal, bool) else {}),
        **({"hardware": hardware} if isinstance(hardware, dict) else {}),
        "created_at": created_at,
    }


TAG_LIMIT = 64  # W&B rejects longer tags (wandb_settings.Settings.validate_run_tags)


def sweep_tag(name: str) -> str:
    return f"sweep:{name}"[:TAG_LIMIT]


def model_label(model: dict) -> str | None:
    """A spec's model as runs are labelled: its preset, or attention-ffn for a pair no preset names
    (as ModelSpec.label)."""
    if model.get("variant") or not (model.get("attention") and model.get("ffn")):
        return model.get("variant")
    return f"{model['attention']}-{model['ffn']}"


def run_tags(spec: dict) -> list[str]:
    """A run's W&B tags as its spec gives them (its model label, the spec's tags), for records that do not say
    which tags W&B was given (the header's `wandb` section, kept since W&B settings are recorded)."""
    variant = model_label(spec["model"]) if isinstance(spec.get("model"), dict) else None
    return [t for t in [variant, *spec.get("tags", [])] if t]
