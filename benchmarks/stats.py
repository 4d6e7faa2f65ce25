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
class WrkRow:
    """One path's figures from wrk (the C generator). None means "not measured"."""

    path: str
    requests_per_s: float | None = None  # 16 connections, saturating
    cpu_us_per_request: float | None = None  # the path's own hops: cloud + node, sshd + ssh
    cpu_detail: str = ""
    p50_ms: float | None = None  # moderate load
    p99_ms: float | None = None
    p99_added_ms: float | None = None  # p99 - direct's p99, same run
    note: str = ""


def render_wrk_table(rows: Sequence[WrkRow], baseline: str) -> str:
    """The wrk rows as a markdown table, rate and CPU with `(×ratio)` to the baseline row.

    Raises KeyError if the baseline row is missing.
    """
    base = {row.path: row for row in rows}[baseline]
    lines = [
        "| path | requests/s (wrk, 16 conn.) | CPU µs per request (hops) | p50 ms | p99 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        own = row.path == baseline
        cpu = _number(row.cpu_us_per_request, 0) if own else _with_ratio(row.cpu_us_per_request, base.cpu_us_per_request, 0)
        if row.cpu_detail and row.cpu_us_per_request is not None:
            cpu += f"<br>{row.cpu_detail}"
        cells = [
            _number(row.requests_per_s, 0) if own else _with_ratio(row.requests_per_s, base.requests_per_s, 0),
            cpu,
            _number(row.p50_ms, 3),
            _number(row.p99_ms, 3),
            "—" if row.p99_added_ms is None else f"{row.p99_added_ms:+.3f}",
        ]
        name = row.path if not row.note else f"{row.path} ({row.note})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@attrs.frozen
class Goal:
    """One of the issue's aims, checked against the same run's baseline."""

    text: str
    met: bool | None  # None: could not be measured
    measured: str = ""  # the figure it was judged on, "" when not measured


# The aims of issue 11, relative to ssh -N -R (default cipher) in the same run
MIN_RATE_RATIO = 0.5
MIN_THROUGHPUT_RATIO = 1.0
MAX_CPU_RATIO = 3.0
MAX_ADDED_P99_MS = 1.0


def check_goals(
    rows: Sequence[PathResult], wrk_rows: Sequence[WrkRow], *, project: str, baseline: str
) -> list[Goal]:
    """The issue's aims for the project's path: request rate (wrk), throughput (one stream),
    CPU per request of its hops, all as ratios to the baseline, and added p99 at moderate load."""
    by_path = {row.path: row for row in rows}
    ours, base = by_path.get(project), by_path.get(baseline)
    by_wrk = {row.path: row for row in wrk_rows}
    wrk_ours, wrk_base = by_wrk.get(project), by_wrk.get(baseline)
    tput = ratio(ours.throughput_mb_s if ours else None, base.throughput_mb_s if base else None)
    rate = ratio(wrk_ours.requests_per_s if wrk_ours else None, wrk_base.requests_per_s if wrk_base else None)
    cpu = ratio(
        wrk_ours.cpu_us_per_request if wrk_ours else None,
        wrk_base.cpu_us_per_request if wrk_base else None,
    )
    added = wrk_ours.p99_added_ms if wrk_ours else None

    def goal(text: str, value: float | None, met: bool, shown: str) -> Goal:
        return Goal(text, None, "") if value is None else Goal(text, met, shown)

    return [
        goal(f"request rate at 16 connections (wrk) at least {MIN_RATE_RATIO:g}x {baseline}'s",
             rate, rate is not None and rate >= MIN_RATE_RATIO, f"{rate or 0:.2f}x"),
        goal(f"single-stream throughput at least {MIN_THROUGHPUT_RATIO:g}x {baseline}'s",
             tput, tput is not None and tput >= MIN_THROUGHPUT_RATIO, f"{tput or 0:.2f}x"),
        goal(f"CPU per request of its hops at most {MAX_CPU_RATIO:g}x {baseline}'s",
             cpu, cpu is not None and cpu <= MAX_CPU_RATIO, f"{cpu or 0:.2f}x"),
        goal(f"added p99 latency at moderate load (wrk) under {MAX_ADDED_P99_MS:g} ms",
             added, added is not None and added < MAX_ADDED_P99_MS, f"{added or 0:+.3f} ms"),
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
