"""Prices per device-hour given by the user: one reader, so a run's cost and the report's agree on what a valid
price is (a leaf: imports nothing of ours).

A price is a finite number ≥ 0 in USD per hour. A price table is a JSON object of GPU name → price, given inline
or as the path of a file holding one (`BLUEBERRY_GPU_PRICES`, `blueberry report --gpu-prices`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

PRICE_ENV = "BLUEBERRY_PRICE_PER_HOUR"  # one price for every run of this environment
PRICE_TABLE_ENV = "BLUEBERRY_GPU_PRICES"  # a table: a run takes its GPU's row, the report matches GPU names
EXAMPLE = '{"RTX 4090": 0.18}'
# Rough 2025 cloud rental list prices per device-hour (spot prices can be half that), by hardware preset name:
# what a run on such a GPU pays unless told otherwise, and the report's default table.
LIST_PRICES = {
    "T4": 0.35, "RTX 4090": 0.40, "A100": 1.50, "H100 PCIe": 2.50, "H100 NVL": 3.00, "H100": 3.00,
    "H200 NVL": 3.50, "H200": 3.50, "GH200": 3.50,
}  # fmt: skip


def _is_price(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def read_price(raw: str, source: str) -> float:
    """A single price, e.g. `BLUEBERRY_PRICE_PER_HOUR=0.4`; ValueError naming `source` otherwise."""
    try:
        price = float(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not a number (USD per device-hour, e.g. 0.4)") from None
    if not _is_price(price):
        raise ValueError(f"{source}={raw!r}: a price must be a finite number ≥ 0 (USD per device-hour)")
    return price


class RepeatedRow(ValueError):
    """A price table naming one device twice (GPU names match case-blind): json.loads would keep the last."""


def _once_each(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for name, _ in pairs:
        if name.lower() in seen:
            raise RepeatedRow(f"key {name!r} appears twice (names match whatever their case)")
        seen.add(name.lower())
    return dict(pairs)


def read_price_table(raw: str, source: str) -> dict[str, float]:
    """GPU name → USD per hour from an inline JSON object or a file holding one; ValueError naming `source`."""
    where = source
    if not raw.lstrip().startswith("{"):
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"{source}: {raw!r} is neither a JSON object nor a file (expected e.g. '{EXAMPLE}')")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source}: cannot read {path}: {exc}") from None
        where = f"{source} ({path})"
    try:
        table = json.loads(raw, object_pairs_hook=_once_each)
    except RepeatedRow as exc:
        raise ValueError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc}); expected e.g. '{EXAMPLE}'") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a JSON object of GPU name → $/h, got {type(table).__name__}")
    wrong = {name: value for name, value in table.items() if not _is_price(value)}
    if wrong:
        raise ValueError(f"{where}: prices must be finite numbers ≥ 0 (USD per hour), got {wrong}")
    return {str(name): float(value) for name, value in table.items()}


def names_words(name: str, words) -> bool:
    """Whether every one of `words` is a word of the device name `name` (case-insensitive), not a piece of one:
    "A100" is in "NVIDIA A100-SXM4-80GB" but not in "NVIDIA RTX A1000", "T4" not in "NVIDIA T400"."""
    lowered = name.lower()
    # "." joins a MIG profile's parts: "3g.40gb" is not a word of "1c.3g.40gb" (a compute instance of that slice)
    return all(re.search(rf"(?<![a-z0-9.]){re.escape(word.lower())}(?![a-z0-9.])", lowered) for word in words)


def table_price(device_name: str, table: dict[str, float], share: float = 1.0) -> tuple[float, str, float] | None:
    """A device's $/h from a table of GPU names, the one lookup a run and the report both use: the longest row
    whose words are all words of the device's name ("H100 NVL" before "H100"). A row naming a MIG slice
    ("A100 MIG 3g.40gb") is that slice's price; a board's row is multiplied by `share`, the slice's share of
    its board (1 for a whole GPU). (price, the row, the factor applied to the row's price) or None."""
    for row in sorted(table, key=len, reverse=True):
        if names_words(device_name, row.split()):
            factor = 1.0 if "mig" in row.lower().split() else share
            return table[row] * factor, row, factor
    return None
