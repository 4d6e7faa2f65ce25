"""`run.py --profile`: where the cloud and node processes spend their CPU, sampled with py-spy.

Theory of operation. py-spy attaches to a running process (ptrace) and samples its Python
stacks at a fixed rate without changing its code, so it profiles the very cloud and node
processes the benchmark measures, during the load only (not their start). It is installed into
the running interpreter's environment by `ensure_py_spy` when `--profile` is asked, never as a
dependency of the connector. Samples of idle threads (waiting in epoll) are dropped by py-spy, so
every sample is CPU the process spent. The raw output ("frame;frame;...;leaf count" lines, frames
"function (file)") is summarised by `summarize` (pure, unit-tested):

* self: samples whose leaf is the function (time spent in it, not below it);
* cumulative: samples with the function anywhere in the stack (counted once per sample), for
  this repository's functions (below the entry points `connector/__main__.py`, `cli.py`): which
  of our code paths the time is spent under;
* by area: self samples grouped by module or library (`area`), which answers "h11 parsing,
  websocket framing, TLS, trio scheduling or our own code?", and the samples with the area
  anywhere on the stack (h11 with what it calls, for instance).

In --nonblocking mode a stack read while the process runs is sometimes cut short at the root
side (about a third of the samples of a trial lacked the outermost frames): leaves, and so self
counts and areas, are sound; cumulative counts are lower bounds.

A sample whose stack py-spy could not read (it changed under it) is an empty stack in the raw
output: it is counted, as "(stack not read)" (about 1.5% of the samples in a trial).

py-spy runs with `--nonblocking`: it reads the stacks without pausing the process, which costs
the process almost nothing and, more important here, keeps py-spy's idle detection right (a
paused process shows every thread as stopped, and threads waiting on a lock or in epoll were
then counted as busy: 10-20% of the node's samples in a trial). The profiled load still runs
after the measured ones (py-spy's own CPU competes for the 2 cores) and its figures are not
reported as measurements.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import attrs

RATE = 200  # samples per second per process
UNREAD = "(stack not read)"  # a busy sample whose stack changed while it was read (--nonblocking)


@attrs.frozen
class ProfileSummary:
    """One process's profile: sample counts by function and by area, highest first."""

    samples: int
    self_samples: list[tuple[str, int]]  # (function, samples): the leaf of the sample
    cumulative_samples: list[tuple[str, int]]  # our functions anywhere on the stack
    area_samples: list[tuple[str, int]]  # (area, samples): the leaf's
    area_cumulative: dict[str, int]  # area -> samples with it anywhere on the stack


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")


OURS = ("connector", "ha", "benchmarks")  # this repository's top-level packages
ENTRY_POINTS = ("connector/__main__.py:", "connector/cli.py:")  # under every sample


def short_path(filename: str) -> str:
    """A frame's file relative to where it was imported from: site-packages, the standard
    library's directory, or this repository ("connector/cloud/proxy.py"); else unchanged."""
    parts = filename.split("/")
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    for i in range(1, len(parts) - 1):
        if parts[i - 1] == "lib" and re.fullmatch(r"python3\.\d+", parts[i]):
            return "/".join(parts[i + 1 :])
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in OURS:
            return "/".join(parts[i:])
    return filename


def area(filename: str) -> str:
    """The module or library a frame's file belongs to, for grouping: a library's or the
    standard library's top-level package or module ("h11", "trio", "ssl"), this repository's
    dotted module ("connector.cloud.proxy"), or the file name as given."""
    short = short_path(filename)
    if short == filename:
        return filename
    parts = short.removesuffix(".py").split("/")
    return ".".join(parts) if parts[0] in OURS else parts[0]


def _split_frame(frame: str) -> tuple[str, str]:
    found = _FRAME.match(frame)
    return (found.group("function"), found.group("file")) if found else (frame, "")


def function_name(frame: str) -> str:
    """A frame "send_all (/v/lib/python3.11/site-packages/trio/_ssl.py)" as "trio/_ssl.py:send_all"."""
    function, file = _split_frame(frame)
    return f"{short_path(file)}:{function}" if file else function


def frame_area(frame: str) -> str:
    function, file = _split_frame(frame)
    return area(file) if file else function


def summarize(raw: str, top: int = 15) -> ProfileSummary:
    """py-spy's raw (collapsed stacks) output as a ProfileSummary; ValueError on a bad line."""
    self_counts: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    areas_on_stack: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            raise ValueError(f"not a collapsed-stack line: {line[:120]!r}")
        count = int(count_text)
        frames = stack.split(";") if stack else [UNREAD]
        total += count
        self_counts[function_name(frames[-1])] += count
        areas[frame_area(frames[-1])] += count
        for name in {function_name(frame) for frame in frames}:
            if name.startswith(OURS) and not name.startswith(ENTRY_POINTS):
                cumulative[name] += count
        for name in {frame_area(frame) for frame in frames}:
            areas_on_stack[name] += count
    return ProfileSummary(
        total, _highest(self_counts, top), _highest(cumulative, top), _highest(areas, top), dict(areas_on_stack)
    )


def _highest(counts: Counter[str], top: int) -> list[tuple[str, int]]:
    """The `top` most counted, ties by name (a stable report from the same samples)."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]


def render(label: str, summary: ProfileSummary, seconds: float, requests: int | None) -> list[str]:
    """Markdown lines for one process: areas, then top functions by self and cumulative samples."""
    cpu_s = summary.samples / RATE
    per_request = f", about {cpu_s / requests * 1e6:.0f} µs per request" if requests else ""
    out = [
        f"#### {label}: {summary.samples} samples in {seconds:g} s at {RATE} Hz "
        f"(≈ {cpu_s:.1f} s of CPU{per_request})",
        "",
        "| area | self | on the stack |",
        "|---|---:|---:|",
    ]
    out += [
        f"| {name} | {n / summary.samples:.0%} | {summary.area_cumulative.get(name, n) / summary.samples:.0%} |"
        for name, n in summary.area_samples
    ]
    out += ["", "| function, by self samples | self | our function, by cumulative samples | cumulative |",
            "|---|---:|---|---:|"]
    rows = max(len(summary.self_samples), len(summary.cumulative_samples))
    for i in range(rows):
        own = summary.self_samples[i] if i < len(summary.self_samples) else ("", 0)
        cum = summary.cumulative_samples[i] if i < len(summary.cumulative_samples) else ("", 0)
        out.append(
            f"| `{own[0]}` | {own[1] / summary.samples:.1%} | `{cum[0]}` | {cum[1] / summary.samples:.0%} |"
        )
    return out


def ensure_py_spy() -> str:
    """py-spy's path; installed with pip into this interpreter's environment if it is missing."""
    beside = Path(sys.executable).parent / "py-spy"  # the venv's bin (not resolved: a venv links)
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found:
        return found
    print("installing py-spy (for --profile) with pip", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True, timeout=600)
    return str(beside)


def record_argv(py_spy: str, pid: int, output: Path, seconds: float) -> list[str]:
    return [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(RATE), "--format", "raw", "--output", str(output),
            "--full-filenames", "--nolineno", "--nonblocking"]
