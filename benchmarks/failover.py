#!/usr/bin/env python3
"""Failover benchmark: `python benchmarks/failover.py [--repeat 20] [--quick]`.

Theory of operation. For each drill kind (crash = kill -9 of the master, freeze = SIGSTOP of the
master until a new one is named, then SIGCONT, graceful = SIGTERM handover) it starts one demo
cluster (real etcd, cloud side, two nodes, backend; the default HA timings) and repeats the drill
`--repeat` times under a steady, bounded load through the HTTP proxy, restarting the old master
after each crash or handover (tests/failover/harness.py does the work; the same code runs the
failover tests). Per drill it records:

* takeover: from the signal to the end of the first request the new master served (which node
  served a request is read from the nodes' audit logs, so no clock is shared between processes);
* master named: from the signal to the cloud's admin /status naming the new master;
* requests failed, and whether every checker passed (one server at a time on the cloud's routing
  log, higher epoch, every failure in flight on the lost master, the frozen master back as shadow).

The cloud drills (replica-kill, rolling-restart, cloud-etcd-outage: `benchmarks/cloud_drills.py`)
run on a cluster with two cloud replicas and a cloud etcd behind HAProxy and record, per drill, the
disruption (`benchmarks.stats.disruption`: the longest gap between successful requests around the
fault) and the failed requests.

It prints the tables and writes them, with the machine's facts and the commit, to
docs/failover-benchmarks.md (unless --no-write); the cloud drills' section and their summary in
docs/benchmarks.md sit between their own markers, so running only some kinds keeps the others'
figures. The exit status is 1 when a checker failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.cloud_drills import (  # noqa: E402
    CLOUD_DESCRIPTIONS,
    CLOUD_KINDS,
    OUTAGE_SECONDS,
    CloudDrillResult,
    repeat_cloud_drills,
)
from benchmarks.report import machine_facts  # noqa: E402
from tests.failover.harness import DrillResult, percentile, repeat_drills  # noqa: E402

KINDS = ("crash", "freeze", "graceful")
DESCRIPTIONS = {
    "crash": "kill -9 of the master",
    "freeze": "SIGSTOP of the master until another is named, then SIGCONT",
    "graceful": "SIGTERM of the master (handover)",
}
OUTPUT = REPO / "docs" / "failover-benchmarks.md"
SUMMARY = REPO / "docs" / "benchmarks.md"  # its failover block, kept in the hand-written preamble
BEGIN, END = "<!-- failover:begin -->", "<!-- failover:end -->"
CLOUD_BEGIN, CLOUD_END = "<!-- cloud-failover:begin -->", "<!-- cloud-failover:end -->"


def replace_block(text: str, begin: str, end: str, block: str) -> str:
    """`text` with its part between the markers `begin`..`end` replaced by `block` (which carries
    the markers); without the markers, `block` goes before the run.py marker (or at the end)."""
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    marker = "<!-- everything below this line"
    at = text.index(marker) if marker in text else len(text)
    return text[:at] + block + "\n\n" + text[at:]


def update_summary(path: Path, report: str) -> None:
    """Copy the results table of `report` between the failover markers of `path`."""
    table = [line for line in report.splitlines() if line.startswith("|")]
    table = table[: next((i for i, line in enumerate(table) if line.startswith("| fact")), len(table))]
    settings = next((line for line in report.splitlines() if line.startswith("Settings:")), "")
    block = "\n".join([
        BEGIN,
        "## Failover drills",
        "",
        f"`python benchmarks/failover.py` ({settings.removeprefix('Settings: ')}); method, aims and every",
        "drill's figure in [failover-benchmarks.md](failover-benchmarks.md).",
        "",
        *table,
        END,
    ])
    path.write_text(replace_block(path.read_text(), BEGIN, END, block))


def write_cloud(output: Path, summary: Path, section: str, summary_block: str) -> None:
    """The cloud drills' section into `output` and their table into `summary`, each between the
    cloud markers, leaving the on-premise drills' figures as they are."""
    text = output.read_text() if output.exists() else "# Failover benchmark\n"
    output.write_text(replace_block(text, CLOUD_BEGIN, CLOUD_END, section))
    summary.write_text(replace_block(summary.read_text(), CLOUD_BEGIN, CLOUD_END, summary_block))


def _ms(value: float) -> str:
    return "n/a" if value != value else f"{value * 1000:.0f} ms"  # NaN check


def summarize(kind: str, results: Sequence[DrillResult]) -> dict[str, object]:
    takeovers = [r.takeover for r in results if r.takeover is not None]
    named = [r.master_changed for r in results if r.master_changed is not None]
    failures = [r.failed for r in results]
    return {
        "kind": kind,
        "drills": len(results),
        "p50": percentile(takeovers, 0.5),
        "p95": percentile(takeovers, 0.95),
        "max": max(takeovers) if len(takeovers) == len(results) and takeovers else float("nan"),
        "named_p50": percentile(named, 0.5),
        "failed_mean": sum(failures) / len(failures) if failures else float("nan"),
        "failed_max": max(failures) if failures else 0,
        "failed_total": sum(failures),
        "requests": sum(r.requests for r in results),
        "bad_drills": sum(1 for r in results if r.problems),
    }


def aims(rows: dict[str, dict[str, object]]) -> list[tuple[str, bool | None]]:
    """The issue's aims, each with met (True/False) or None when that drill was not run."""
    crash, graceful = rows.get("crash"), rows.get("graceful")
    return [
        ("crash takeover p50 < 1 s", None if crash is None else float(crash["p50"]) < 1.0),  # type: ignore[arg-type]
        ("crash takeover max < 3 s", None if crash is None else float(crash["max"]) < 3.0),  # type: ignore[arg-type]
        ("graceful takeover max < 0.5 s", None if graceful is None else float(graceful["max"]) < 0.5),  # type: ignore[arg-type]
        ("graceful: zero failed requests", None if graceful is None else graceful["failed_total"] == 0),
    ]


def render(rows: dict[str, dict[str, object]], results: dict[str, list[DrillResult]], seconds: float,
           settings: str) -> str:
    lines = [
        "# Failover benchmark",
        "",
        "Written by `python benchmarks/failover.py` (see its docstring and `tests/failover/harness.py`).",
        "Each drill runs under a steady load through the HTTP proxy (2 workers, one fresh connection",
        "per request, 10 ms pause between requests), on a demo cluster of two nodes with the default",
        "HA timings (ttl 3 s, loop_wait 0.5 s, probes every 0.5 s, 3 misses) and a 5 s failover hold.",
        "",
        "- **takeover**: from the signal to the end of the first request served by the new master;",
        "- **named**: from the signal to the cloud's `/status` naming the new master (polled every 20 ms);",
        "- **failed/drill**: requests that did not get a 200, per drill (mean / max); every one of them",
        "  was checked to be in flight on the lost master (a 502 `connector_connection_lost` or a reset), never",
        "  a hold timeout;",
        "- **checks failed**: drills where a checker failed (two servers at once on the cloud's routing",
        "  log, epoch not higher, a failure not explained by the fault, frozen master not back as shadow).",
        "",
        f"Settings: {settings}. Wall time of the run: {seconds:.0f} s.",
        "",
        "| drill | drills | takeover p50 | p95 | max | named p50 | failed/drill (mean / max) | requests | checks failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in rows.items():
        lines.append(
            f"| {kind}: {DESCRIPTIONS[kind]} | {row['drills']} | {_ms(row['p50'])} | {_ms(row['p95'])} | "  # type: ignore[arg-type]
            f"{_ms(row['max'])} | {_ms(row['named_p50'])} | "  # type: ignore[arg-type]
            f"{float(row['failed_mean']):.2f} / {row['failed_max']} | {row['requests']} | {row['bad_drills']} |"  # type: ignore[arg-type]
        )
    lines += [
        "",
        "Why no request fails: until the cloud learns that a master is gone it still routes new",
        "streams to it (milliseconds after a kill, one probe period x misses after a freeze). A request",
        "lost that way, with no response byte yet, is replayed once by the proxy when that is safe",
        "(the node refused it as NOT_MASTER, or the method is idempotent: the load sends GETs); the",
        "replay waits in the failover hold for the new master. A non-idempotent request (POST) in",
        "flight on a dying master still fails with a 502 `connector_connection_lost`: it may have run.",
    ]
    lines += ["", "Aims (from the issue):", ""]
    for name, met in aims(rows):
        lines.append(f"- {name}: {'not run' if met is None else ('met' if met else '**not met**')}")
    problems = [(kind, i, p) for kind, rs in results.items() for i, r in enumerate(rs) for p in r.problems]
    if problems:
        lines += ["", "Checker failures:", ""]
        lines += [f"- {kind} #{i}: {p}" for kind, i, p in problems[:30]]
    lines += ["", "Takeover per drill (ms, in order):", ""]
    for kind, rs in results.items():
        values = ", ".join("—" if r.takeover is None else f"{r.takeover * 1000:.0f}" for r in rs)
        lines.append(f"- {kind}: {values}")
    lines += ["", "## Machine", "", "| fact | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in machine_facts(REPO) if name != "OpenSSH"]
    return "\n".join(lines) + "\n"


def _gap(value: float) -> str:
    return "none back" if value == float("inf") else _ms(value)


def summarize_cloud(kind: str, results: Sequence[CloudDrillResult]) -> dict[str, object]:
    disruptions = [r.disruption for r in results]
    failures = [r.failed for r in results]
    return {
        "kind": kind,
        "drills": len(results),
        "p50": percentile(disruptions, 0.5),
        "p95": percentile(disruptions, 0.95),
        "max": max(disruptions) if disruptions else float("nan"),
        "quiet_p50": percentile([r.quiet_gap for r in results if r.quiet_gap == r.quiet_gap], 0.5),
        "window_p50": percentile([r.window for r in results], 0.5),
        "failed_mean": sum(failures) / len(failures) if failures else float("nan"),
        "failed_max": max(failures) if failures else 0,
        "failed_total": sum(failures),
        "requests": sum(r.requests for r in results),
        "bad_drills": sum(1 for r in results if r.problems),
    }


def render_cloud(rows: dict[str, dict[str, object]], results: dict[str, list[CloudDrillResult]], seconds: float,
                 settings: str) -> tuple[str, str]:
    """The cloud drills' section of failover-benchmarks.md, and their block for benchmarks.md."""
    table = [
        "| drill | drills | disruption p50 | p95 | max | quiet gap p50 | fault window p50 | "
        "failed/drill (mean / max) | requests | checks failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in rows.items():
        table.append(
            f"| {kind}: {CLOUD_DESCRIPTIONS[kind]} | {row['drills']} | {_gap(row['p50'])} | "  # type: ignore[arg-type]
            f"{_gap(row['p95'])} | {_gap(row['max'])} | {_ms(row['quiet_p50'])} | "  # type: ignore[arg-type]
            f"{_ms(row['window_p50'])} | {float(row['failed_mean']):.2f} / {row['failed_max']} | "  # type: ignore[arg-type]
            f"{row['requests']} | {row['bad_drills']} |"
        )
    facts = dict(machine_facts(REPO))
    machine = (f"Run {facts.get('date (UTC)', '?')} UTC at commit {facts.get('commit', '?')}, "
               f"{facts.get('cores', '?')} cores, load average at the end "
               f"{facts.get('load average at the end (1/5/15 min)', '?')}: the machine may be shared "
               "with other work, which these figures include.")
    lines = [
        CLOUD_BEGIN,
        "## Cloud drills",
        "",
        "Written by `python benchmarks/failover.py --kinds " + ",".join(CLOUD_KINDS) + "` (see",
        "`benchmarks/cloud_drills.py`). One demo cluster with `--cloud-replicas 2`: a cloud etcd, two",
        "`connector cloud` replicas behind HAProxy (health checks on `/readyz` every 200 ms), two nodes",
        "dialling both replicas. The load is the one above (2 workers, one fresh connection per request,",
        "10 ms pause), sent to HAProxy's front door, so every request is balanced anew.",
        "",
        "- **fault window**: from the first fault action to the moment everything is restored (each",
        "  replica's `/readyz` 200 with a master and both nodes' tunnels; etcd back); for a kill it",
        "  includes 1 s with one replica and the restart, for an etcd outage the "
        f"{OUTAGE_SECONDS:g} s without etcd;",
        "- **disruption**: the longest gap between two successful requests (their completion times)",
        "  that begins at or after the last success before the fault and no later than the end of the",
        "  fault window (`benchmarks.stats.disruption`, unit-tested). Every stretch of the window in",
        "  which no request succeeded lies inside such a gap; \"none back\" if nothing succeeded after it;",
        "- **quiet gap**: the longest gap between successes during the warm-up of the same drill, before",
        "  any fault: what the disruption is when the fault is invisible to the applications;",
        "- **failed/drill**: requests that did not get a 200 (mean / max per drill);",
        "- **checks failed**: drills where the cluster was not restored within 40 s, or more requests",
        "  failed than allowed (none for a rolling restart or an etcd outage; for a kill, the requests",
        "  in flight on the killed replica: at most one per worker).",
        "",
        f"Settings: {settings}. Wall time of the cloud drills: {seconds:.0f} s.",
        "",
        machine,
        "",
        *table,
    ]
    problems = [(kind, i, p) for kind, rs in results.items() for i, r in enumerate(rs) for p in r.problems]
    if problems:
        lines += ["", "Checker failures:", ""]
        lines += [f"- {kind} #{i + 1}: {p}" for kind, i, p in problems[:30]]
    failing = [(kind, i, r) for kind, rs in results.items() for i, r in enumerate(rs) if r.failures]
    if failing:
        lines += ["", "Failed requests by status, reason and the step of the fault they started in "
                  "(steps in seconds after the fault began):", ""]
        lines += [f"- {kind} #{i + 1}: " + "; ".join(f"{n} x {what}" for what, n in r.failures.items())
                  + " (steps: " + ", ".join(f"{label} +{at:.2f}" for label, at in r.marks) + ")"
                  for kind, i, r in failing[:40]]
    lines += ["", "Disruption per drill (ms, in order; failed requests in brackets when any):", ""]
    for kind, rs in results.items():
        values = ", ".join(("inf" if r.disruption == float("inf") else f"{r.disruption * 1000:.0f}")
                           + (f" [{r.failed}]" if r.failed else "") for r in rs)
        lines.append(f"- {kind}: {values}")
    lines.append(CLOUD_END)
    summary = "\n".join([
        CLOUD_BEGIN,
        "## Cloud drills (2 replicas behind HAProxy)",
        "",
        f"`python benchmarks/failover.py --kinds {','.join(CLOUD_KINDS)}` ({settings}); the disruption is",
        "the longest gap between successful requests around the fault, defined with every drill's figure",
        "in [failover-benchmarks.md](failover-benchmarks.md#cloud-drills).",
        "",
        *table,
        CLOUD_END,
    ])
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=20, help="drills per kind (default 20)")
    parser.add_argument("--freeze-repeat", type=int, default=None, help="drills for freeze (default: --repeat)")
    parser.add_argument("--quick", action="store_true", help="3 drills per kind, for a smoke run")
    parser.add_argument("--kinds", default=",".join((*KINDS, *CLOUD_KINDS)),
                        help="comma-separated subset of " + ",".join((*KINDS, *CLOUD_KINDS)))
    parser.add_argument("--no-write", action="store_true", help=f"do not write {OUTPUT.relative_to(REPO)}")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS) - set(CLOUD_KINDS))
    if unknown:
        parser.error(f"unknown drill kinds {unknown}; known: {[*KINDS, *CLOUD_KINDS]}")
    repeat = 3 if args.quick else args.repeat
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    counts = {k: (args.freeze_repeat if k == "freeze" and args.freeze_repeat else repeat) for k in kinds}

    def progress(kind: str):  # type: ignore[no-untyped-def]
        def report(index: int, result: DrillResult) -> None:
            takeover = "none" if result.takeover is None else f"{result.takeover * 1000:.0f} ms"
            print(f"  {kind} #{index + 1}/{counts[kind]}: {result.old_master} -> {result.new_master} "
                  f"epoch {result.old_epoch} -> {result.new_epoch}, takeover {takeover}, "
                  f"failed {result.failed}/{result.requests}" + (f", PROBLEMS {result.problems}" if result.problems else ""),
                  flush=True)
        return report

    def cloud_progress(kind: str):  # type: ignore[no-untyped-def]
        def report(index: int, result: CloudDrillResult) -> None:
            print(f"  {kind} #{index + 1}/{counts[kind]}: {result.target}, disruption {_gap(result.disruption)} "
                  f"(quiet {_ms(result.quiet_gap)}), window {_ms(result.window)}, failed {result.failed}/"
                  f"{result.requests}" + (f" {result.failures} steps {result.marks}" if result.failures else "")
                  + (f", PROBLEMS {result.problems}" if result.problems else ""), flush=True)
        return report

    onprem = [k for k in kinds if k in KINDS]
    cloud = [k for k in kinds if k in CLOUD_KINDS]

    async def run() -> tuple[dict[str, list[DrillResult]], dict[str, list[CloudDrillResult]], float]:
        results: dict[str, list[DrillResult]] = {}
        for kind in onprem:
            print(f"{kind}: {counts[kind]} drills ({DESCRIPTIONS[kind]})", flush=True)
            results[kind] = await repeat_drills(kind, counts[kind], on_result=progress(kind),
                                                warmup=0.3, after=0.5)
        started = trio.current_time()
        cloud_results: dict[str, list[CloudDrillResult]] = {}
        for kind in cloud:
            print(f"{kind}: {counts[kind]} drills ({CLOUD_DESCRIPTIONS[kind]})", flush=True)
            cloud_results[kind] = await repeat_cloud_drills(kind, counts[kind], on_result=cloud_progress(kind))
        return results, cloud_results, trio.current_time() - started

    started = time.monotonic()
    results, cloud_results, cloud_seconds = trio.run(run)
    seconds = time.monotonic() - started - cloud_seconds
    if results:
        rows = {kind: summarize(kind, rs) for kind, rs in results.items()}
        settings = ", ".join(f"{k} x {counts[k]}" for k in onprem)
        text = render(rows, results, seconds, settings)
        print()
        print(text)
        if not args.no_write:
            update_summary(SUMMARY, text)
            previous = OUTPUT.read_text() if OUTPUT.exists() else ""
            if CLOUD_BEGIN in previous and CLOUD_END in previous:  # keep the cloud drills' figures
                kept = previous[previous.index(CLOUD_BEGIN):previous.index(CLOUD_END) + len(CLOUD_END)]
                text = replace_block(text, CLOUD_BEGIN, CLOUD_END, kept)
            OUTPUT.write_text(text)
            print(f"written to {OUTPUT.relative_to(REPO)} (summary in {SUMMARY.relative_to(REPO)})")
    if cloud_results:
        cloud_rows = {kind: summarize_cloud(kind, rs) for kind, rs in cloud_results.items()}
        settings = ", ".join(f"{k} x {counts[k]}" for k in cloud)
        section, summary = render_cloud(cloud_rows, cloud_results, cloud_seconds, settings)
        print()
        print(section)
        if not args.no_write:
            write_cloud(OUTPUT, SUMMARY, section, summary)
            print(f"cloud drills written to {OUTPUT.relative_to(REPO)} (summary in {SUMMARY.relative_to(REPO)})")
    if any(r.problems for rs in cloud_results.values() for r in rs):
        return 1
    return 1 if any(r.problems for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
