"""One table of results: each row's median over rounds, its spread, and the target.

A row holds one figure per round for postdeploy and, measured in the same round
right beside it, one for its baseline. The table shows medians with the spread
(min–max) in brackets; the ratio is the median of the per-round ratios, and a
target is judged on the medians, never on one lucky round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

SPREAD = "–"  # between min and max


@dataclass
class Row:
    """One measure. ``values``/``baselines``: one figure per round (a single float is
    taken as one round); ``check`` says whether the target is met, judged on the
    medians (a bool is taken as already judged)."""

    name: str
    values: list[float]  # postdeploy's figure, one per round
    baselines: list[float] | None  # the baseline's, same rounds; None: nothing to compare
    unit: str
    baseline_name: str = ""
    target: str = ""
    check: Callable[[Row], bool] | bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, int | float):
            self.values = [float(self.values)]
        if isinstance(self.baselines, int | float):
            self.baselines = [float(self.baselines)]

    @property
    def value(self) -> float:
        return median(self.values)

    @property
    def baseline(self) -> float | None:
        return median(self.baselines) if self.baselines else None

    @property
    def ratios(self) -> list[float]:
        """postdeploy / baseline, round by round."""
        if not self.baselines:
            return []
        return [v / b for v, b in zip(self.values, self.baselines, strict=True) if b]

    @property
    def ratio(self) -> float | None:
        return median(self.ratios) if self.ratios else None

    @property
    def met(self) -> bool | None:
        if self.check is None or isinstance(self.check, bool):
            return self.check
        return self.check(self)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def _figures(values: list[float], unit: str) -> str:
    """``median unit (min–max)``."""
    shown = f"{median(values):,.2f}{unit}"
    if len(values) > 1:
        shown += f" ({min(values):,.2f}{SPREAD}{max(values):,.2f})"
    return shown


def render(rows: list[Row]) -> str:
    header = ("measure", "postdeploy", "baseline", "ratio", "target", "met")
    lines = [header]
    for row in rows:
        base = "-" if not row.baselines else _figures(row.baselines, f" {row.unit}")
        base = f"{base} [{row.baseline_name}]" if row.baseline_name else base
        ratio = "-" if row.ratio is None else _figures(row.ratios, "x")
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        lines.append((row.name, _figures(row.values, f" {row.unit}"), base, ratio,
                      row.target or "-", met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line))
                   + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
