"""Resident memory and CPU time of processes and process trees, read from /proc (Linux only).

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


def stat_cpu_ticks(stat: str) -> int:
    """CPU clock ticks of one /proc/<pid>/stat line: utime + stime + cutime + cstime.

    utime and stime are the process's own user and system time; cutime and cstime those of its
    children that exited and were waited for (sshd's per-connection processes, for example), so
    a tree's total does not drop when a member ends. The command name (field 2) is in
    parentheses and may itself hold spaces and parentheses, so fields are counted after the
    *last* ")". ValueError for a line that is not a stat line.
    """
    end = stat.rfind(")")
    fields = stat[end + 2 :].split() if end >= 0 else []
    if len(fields) < 15:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return sum(int(fields[i]) for i in (11, 12, 13, 14))  # fields 14-17 of stat(5)


def cpu_seconds(pid: int) -> float:
    """CPU time of pid's tree (live members, and the children they reaped), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in descendants(pid):
        try:
            total += stat_cpu_ticks(Path(f"/proc/{member}/stat").read_text())
        except OSError:
            continue
    return total / ticks
