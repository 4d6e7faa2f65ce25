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

It prints the table and writes it, with the machine's facts and the commit, to
docs/failover-benchmarks.md (unless --no-write). The exit status is 1 when a checker failed.
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
    text = path.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        marker = "<!-- everything below this line"
        at = text.index(marker) if marker in text else len(text)
        text = text[:at] + block + "\n\n" + text[at:]
    path.write_text(text)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=20, help="drills per kind (default 20)")
    parser.add_argument("--freeze-repeat", type=int, default=None, help="drills for freeze (default: --repeat)")
    parser.add_argument("--quick", action="store_true", help="3 drills per kind, for a smoke run")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of crash,freeze,graceful")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {OUTPUT.relative_to(REPO)}")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown drill kinds {unknown}; known: {list(KINDS)}")
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

    async def run() -> dict[str, list[DrillResult]]:
        results: dict[str, list[DrillResult]] = {}
        for kind in kinds:
            print(f"{kind}: {counts[kind]} drills ({DESCRIPTIONS[kind]})", flush=True)
            results[kind] = await repeat_drills(kind, counts[kind], on_result=progress(kind),
                                                warmup=0.3, after=0.5)
        return results

    started = time.monotonic()
    results = trio.run(run)
    seconds = time.monotonic() - started
    rows = {kind: summarize(kind, rs) for kind, rs in results.items()}
    settings = ", ".join(f"{k} x {counts[k]}" for k in kinds)
    text = render(rows, results, seconds, settings)
    print()
    print(text)
    if not args.no_write:
        OUTPUT.write_text(text)
        update_summary(SUMMARY, text)
        print(f"written to {OUTPUT.relative_to(REPO)} (summary in {SUMMARY.relative_to(REPO)})")
    return 1 if any(r.problems for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
