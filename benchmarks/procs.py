"""Resident memory of processes and process trees, read from /proc (Linux only).

VmRSS counts pages shared with other processes (libraries) in each process, so a tree's sum
slightly over-counts; the same rule applies to every path, so ratios stay fair.
"""

from __future__ import annotations

import os
from pathlib import Path


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB; FileNotFoundError if it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS line


def descendants(pid: int) -> list[int]:
    """pid and every live descendant, found through /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_rss_mib(pid: int) -> float:
    total = 0
    for member in descendants(pid):
        try:
            total += rss_kib(member)
        except OSError:
            pass
    return total / 1024.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid's tree (live members only), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in descendants(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks
