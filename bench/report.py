"""One table of results: figure, baseline, ratio, target and whether it was met."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Row:
    name: str
    value: float
    baseline: float | None
    unit: str
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> str:
        if self.baseline in (None, 0):
            return "-"
        return f"{self.value / self.baseline:.2f}x"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def render(rows: list[Row]) -> str:
    header = ("measure", "postdeploy", "baseline", "ratio", "target", "met")
    lines = [header]
    for row in rows:
        base = "-" if row.baseline is None else f"{row.baseline:,.2f} {row.unit}"
        base = f"{base} ({row.baseline_name})" if row.baseline_name else base
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        lines.append((row.name, f"{row.value:,.2f} {row.unit}", base, row.ratio,
                      row.target or "-", met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line))
                   + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
