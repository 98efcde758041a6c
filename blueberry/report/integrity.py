"""Integrity section: each run's causality probe, leakage audit and seed count, and its cost on a GPU.

Cost = GPU $/h × the run's device-hours (wall time × devices). The price table is an assumption, not a
measurement: override it with BLUEBERRY_GPU_PRICES (a JSON object, or a path to one) or `blueberry report
--gpu-prices`.
"""

from __future__ import annotations

import os

from blueberry.prices import LIST_PRICES, PRICE_TABLE_ENV, read_price_table, table_price
from blueberry.report.groups import group_runs
from blueberry.report.records import ReportError, Run
from blueberry.report.tables import md_table

MIN_SEEDS = 3  # with fewer seeds a sample sd, and so an error bar, means little


def gpu_prices(option: str | None = None) -> tuple[dict[str, float], str]:
    """(prices, where they came from): the CLI option, else BLUEBERRY_GPU_PRICES, else the list prices runs price
    themselves with (prices.LIST_PRICES). A run that recorded its own cost keeps it unless prices are given."""
    for source, raw in (("--gpu-prices", option), (PRICE_TABLE_ENV, os.environ.get(PRICE_TABLE_ENV))):
        if raw:
            try:
                return read_price_table(raw, source), source
            except ValueError as exc:
                raise ReportError(str(exc)) from None
    return dict(LIST_PRICES), "defaults"


def device_of(run: Run) -> tuple[str, str | None]:
    """("cuda", "NVIDIA GeForce RTX 4090") / ("cpu", None); gpu_name only if the run recorded it."""
    hw = run.header.get("hardware") or {}
    device = str(hw.get("device") or "unknown")
    return device.split(":")[0], hw.get("gpu_name")


def run_cost(run: Run, prices: dict[str, float], overridden: bool = False) -> tuple[float | None, str]:
    """(dollars, "recorded" or "priced") or (None, why there is none): the run's own recorded cost/usd unless
    prices were overridden (and name its GPU), else the table's price × the run's device-hours, a MIG slice
    paying its share of its board's price, as a run does."""
    device, gpu = device_of(run)
    recorded = run.metric("cost/usd")
    priced = device == "cuda" and gpu and (overridden or recorded is None)
    price = _table_price(gpu, prices) if priced else None
    if recorded is not None and price is None:
        return recorded, "recorded"  # a CPU run given a price too
    if device == "cpu":
        return None, "CPU"
    if device != "cuda":
        return None, "device not recorded"
    if not gpu:
        return None, "GPU model not recorded"
    if price is None:
        return None, f"no price for {gpu}"
    hours = run.metric("cost/device_hours")  # wall time × devices, earlier attempts included
    if hours is None:
        seconds, hardware = run.metric("time/train_s"), run.header.get("hardware") or {}
        if seconds is None:
            return None, "no wall time"
        hours = seconds / 3600 * (hardware.get("world_size") or 1)
    return price * hours, "priced"


def priced_costs(runs: list[Run], prices: dict[str, float], price_source: str) -> list[float]:
    """The dollars of every readable run with a cost, as the Integrity table prices them (the report's total)."""
    costs = (run_cost(r, prices, price_source != "defaults")[0] for r in runs if r.spec)
    return [usd for usd in costs if usd is not None]


def cost(run: Run, prices: dict[str, float], overridden: bool = False) -> str:
    """`run_cost` as the Integrity table shows it."""
    usd, how = run_cost(run, prices, overridden)
    if usd is None:
        return f"n/a ({how})"
    return f"${usd:.4f}" + (" (recorded)" if how == "recorded" else "")


def _table_price(gpu: str, prices: dict[str, float]) -> float | None:
    """One device's $/h from a table of GPU names, as a run looks it up (prices.table_price)."""
    from blueberry.hardware import preset_for  # imports torch: only for a GPU run priced here

    found = table_price(gpu, prices, preset_for(gpu).share)
    return None if found is None else found[0]


def _causality(run: Run) -> str:
    probe = run.header.get("causality")
    if not probe:
        return "not recorded"
    if not probe.get("checked"):
        return "not checked"
    return "ok" if probe.get("ok") else "**FAILED**"


def _leakage(run: Run) -> str:
    leak = (run.header.get("data") or {}).get("leakage") or {}
    share = leak.get("val_windows_with_train_ngram")
    if share is None and not leak.get("ngram"):
        return "not recorded"
    if share is None:
        text = "n-grams not measured (windows shorter than the n-gram)"
    else:
        text = f"{share:.2%} of val windows share a {leak.get('ngram', '?')}-gram"
    if leak.get("val_docs_in_train"):  # measured whatever the windows' length
        text += f"; **{leak['val_docs_in_train']} val documents also in train**"
    return text


def integrity_section(runs: list[Run], prices: dict[str, float], price_source: str) -> str:
    readable = [r for r in runs if r.spec]
    seeds: dict[str, int] = {}  # finished seeds of the run's configuration, within its experiment
    for experiment in {r.experiment for r in readable}:
        for g in group_runs([r for r in readable if r.experiment == experiment]):
            for r in g.runs:
                seeds[r.id] = len(g.seeds)
    causal = [_causality(r) for r in readable]
    shares = [((r.header.get("data") or {}).get("leakage") or {}).get("val_windows_with_train_ngram") for r in readable]
    shares = [s for s in shares if s is not None]
    few = sorted({r.experiment for r in readable if r.ok and seeds.get(r.id, 0) < MIN_SEEDS})
    lines = [
        f"- Causality probe: {causal.count('ok')} of {len(readable)} runs checked ok"
        + (
            f"; {len(readable) - causal.count('ok')} not ok or not recorded"
            if causal.count("ok") < len(readable)
            else ""
        )
        + ".",
    ]
    if shares:
        lines.append(f"- Leakage audit: at most {max(shares):.2%} of validation windows share an n-gram with training.")
    if few:
        lines.append(f"- Fewer than {MIN_SEEDS} finished seeds in some configurations of: {', '.join(few)}.")
    gpu_runs = [r for r in readable if device_of(r)[0] == "cuda"]
    price_text = ", ".join(f"{k} ${v:g}/h" for k, v in prices.items()) or "none"
    lines.append(
        f"- Cost: {len(gpu_runs)} GPU runs priced at {price_text} ({price_source}; an assumption, "
        "override with BLUEBERRY_GPU_PRICES); CPU runs n/a."
    )
    rows = []
    for r in sorted(readable, key=lambda r: (r.experiment, r.name)):
        device, gpu = device_of(r)
        rows.append(
            [
                r.id,
                r.experiment,
                r.state,
                _causality(r),
                _leakage(r),
                str(seeds.get(r.id, 0)),
                gpu or device,
                cost(r, prices, price_source != "defaults"),
            ]
        )
    table = md_table(["Run", "Experiment", "State", "Causality", "Leakage", "Seeds", "Device", "Cost"], rows)
    return "\n".join(lines) + "\n\n<details><summary>Per run</summary>\n\n" + table + "\n</details>\n"
