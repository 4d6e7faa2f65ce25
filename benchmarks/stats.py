"""Pure statistics and table formatting for the benchmark report (no I/O, unit-tested).

Theory of operation: every figure of a path is compared with the `ssh -R` baseline measured in
the same run, because the machine is shared and noisy: absolute numbers move from run to run,
ratios much less. Latencies are reported as *added* latency, a quantile of the path minus the
same quantile of the direct path, both sampled interleaved in one loop so that noise hits both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import attrs


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Raises ValueError for an empty sample or q outside [0, 100], so a broken run cannot print a
    plausible-looking zero.
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """Median of repeated rounds; ValueError when there is none."""
    if not values:
        raise ValueError("median of an empty sample")
    return float(statistics.median(values))


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


@attrs.frozen
class PathResult:
    """One row of the report. None means "not measured" (shown as an em dash)."""

    path: str
    throughput_mb_s: float | None = None
    requests_per_s: float | None = None
    p50_added_ms: float | None = None
    p99_added_ms: float | None = None
    rss_mib: float | None = None
    rss_detail: str = ""
    note: str = ""


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _with_ratio(value: float | None, baseline: float | None, digits: int) -> str:
    text = _number(value, digits)
    r = ratio(value, baseline)
    if value is None or r is None:
        return text
    return f"{text} (×{r:.2f})"


def _latency(value: float | None, baseline: float | None) -> str:
    """Added latency and, if meaningful, the ratio to the baseline's added latency."""
    if value is None:
        return "—"
    text = f"{value:+.3f}"
    r = ratio(value, baseline) if value > 0 else None
    return f"{text} (×{r:.2f})" if r is not None else text


def render_table(rows: Sequence[PathResult], baseline: str) -> str:
    """A markdown table; every figure of a non-baseline row carries `(×ratio)` to the baseline row.

    Ratios are value / baseline for every column: above 1 is better for throughput and request
    rate, worse for latency and memory. Raises KeyError if the baseline row is missing.
    """
    base = {row.path: row for row in rows}[baseline]
    header = (
        "| path | throughput MB/s | requests/s (16 conn.) | p50 added ms | p99 added ms | RSS with 1k streams MiB |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        if row.path == baseline:
            cells = [
                _number(row.throughput_mb_s, 1),
                _number(row.requests_per_s, 0),
                _latency(row.p50_added_ms, None),
                _latency(row.p99_added_ms, None),
                _number(row.rss_mib, 1),
            ]
        else:
            cells = [
                _with_ratio(row.throughput_mb_s, base.throughput_mb_s, 1),
                _with_ratio(row.requests_per_s, base.requests_per_s, 0),
                _latency(row.p50_added_ms, base.p50_added_ms),
                _latency(row.p99_added_ms, base.p99_added_ms),
                _with_ratio(row.rss_mib, base.rss_mib, 1),
            ]
        if row.rss_detail and row.rss_mib is not None:
            cells[4] += f" ({row.rss_detail})" if row.path == baseline else f"<br>{row.rss_detail}"
        name = row.path if not row.note else f"{row.path} ({row.note})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@attrs.frozen
class Goal:
    """One of the issue's aims, checked against the same run's baseline."""

    text: str
    met: bool | None  # None: could not be measured


def check_goals(rows: Sequence[PathResult], *, project: str, baseline: str) -> list[Goal]:
    """The issue's aims: throughput >= ssh -R's (default cipher), request rate >= half of it."""
    by_path = {row.path: row for row in rows}
    ours, base = by_path.get(project), by_path.get(baseline)
    tput = ratio(ours.throughput_mb_s if ours else None, base.throughput_mb_s if base else None)
    rate = ratio(ours.requests_per_s if ours else None, base.requests_per_s if base else None)
    return [
        Goal(f"throughput at least that of {baseline}", None if tput is None else tput >= 1.0),
        Goal(f"request rate at least half of {baseline}'s", None if rate is None else rate >= 0.5),
    ]


def disruption(outcomes: Sequence[tuple[float, bool]], start: float, end: float) -> float:
    """The longest gap between successful requests around a fault, in the clock of `outcomes`.

    `outcomes` are (completion time, succeeded) pairs of the load, in any order; the fault
    window is [start, end] (from the first fault action to the moment everything was restored;
    start == end for a fault that is a single signal). The gaps considered run between
    consecutive successful completions, beginning with the last success at or before `start`
    (or `start` itself if there was none), and the gaps counted are those that begin at or
    before `end`: every stretch of the window in which no request succeeded is inside one of
    them. Under a steady load a figure close to the load's normal gap means no visible pause.
    Infinite when no request succeeded after the window, i.e. the service did not come back
    while it was observed. Raises ValueError when end < start.
    """
    if end < start:
        raise ValueError(f"fault window ends ({end}) before it starts ({start})")
    ends = sorted(t for t, ok in outcomes if ok)
    before = [t for t in ends if t <= start]
    points = [before[-1] if before else start, *(t for t in ends if t > start)]
    if points[-1] <= end:
        return math.inf
    return max(b - a for a, b in zip(points, points[1:], strict=False) if a <= end)
