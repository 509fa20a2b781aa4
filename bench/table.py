"""Table rows and cell formatting shared by every section's report (bench.report, bench.engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Row:
    layer: str
    measurement: str
    value: str = ""
    ratio: str = ""
    goal: str = ""
    result: str = ""  # PASS | MISS | ERROR | ""
    # for the chart
    chart: str = ""  # "ratio" | "goal" | ""
    number: float | None = None
    limit: float | None = None
    higher_is_better: bool = True
    label: str = ""  # chart label, when the measurement name alone does not say what the ratio is


def fmt(x: float | None, unit: str = "", digits: int | None = None) -> str:
    if x is None:
        return "–"
    if digits is None:
        digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2 if abs(x) >= 1 else 3
    return f"{x:,.{digits}f}{(' ' + unit) if unit else ''}"


def mm(s: dict[str, Any] | None, unit: str = "", scale: float = 1.0, digits: int | None = None) -> str:
    """``median [min – max] unit`` of a summary."""
    if not s or s.get("median") is None:
        return "–"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s.get("n", 0) <= 1:
        return f"{fmt(med, unit, digits)} (n=1)"
    return f"{fmt(med, '', digits)} [{fmt(lo, '', digits)} – {fmt(hi, '', digits)}] {unit}".rstrip()


def judge(value: float | None, limit: float, higher_is_better: bool) -> str:
    if value is None:
        return "MISS"
    return "PASS" if (value >= limit if higher_is_better else value <= limit) else "MISS"


def goal_row(
    layer: str,
    name: str,
    value: str,
    number: float | None,
    limit: float,
    higher: bool,
    goal: str,
    ratio_text: str = "",
    chart: str = "goal",
    label: str = "",
) -> Row:
    return Row(layer, name, value, ratio_text, goal, judge(number, limit, higher), chart, number, limit, higher, label)
