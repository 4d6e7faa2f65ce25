"""The node's audit log: one JSON line per request decision and per configuration change.

Theory of operation. Auditing must never take the request path down: a line that cannot be
written (disk full, file removed, stream closed) is counted in
`connector_audit_write_errors_total` and logged, and the request goes on. The file is opened once
in append mode with mode 0600 (audit lines name internal paths). Each record is encoded (one
pre-built JSON encoder, insertion order, no key sort) and handed to the OS with one `os.write`
of the whole line, unbuffered: a record exists in the file before the response it describes
reaches the client (forward.py relies on that, and so do the failover drills), and a crash loses
at most the line being written. Buffering lines and flushing on a timer was measured (about 4%
of the node's CPU per request saved) and not done: it would give up that ordering.
The most recent records are also kept in memory (a bounded deque) for tests and the admin API,
and counted per kind: `wait_records(n)` lets a test wait for the nth record instead of polling.

Timestamps are wall-clock (UTC, ISO 8601): an audit trail is read by people against other logs.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
from collections.abc import Callable
from typing import IO, Any

import trio

from connector import metrics

log = logging.getLogger(__name__)

# The fields a request record carries, in this order (missing ones are written as null).
REQUEST_FIELDS = (
    "subaccount",
    "location",
    "virtual_target",
    "mapping",
    "method",
    "path",
    "decision",
    "reason",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_seconds",
)


# One encoder for every record: json.dumps with keyword arguments builds a new one per call.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=True)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Append-only JSON-lines audit log to a file and/or a text stream (either may be None)."""

    def __init__(
        self,
        path: str | None,
        stream: IO[str] | None = None,
        *,
        keep: int = 1000,
        clock: Callable[[], str] = _utc_now,
    ) -> None:
        """Open `path` for appending (created 0600; raises OSError if it cannot be opened)."""
        self.path = path
        self._stream = stream
        self._clock = clock
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._written: collections.Counter[str | None] = collections.Counter()  # by kind; None: all
        self._written_lot = trio.lowlevel.ParkingLot()
        self._fd: int | None = None
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)  # an existing file readable by others is tightened
            except OSError:
                log.warning("audit log %s: could not restrict permissions to 0600", path)
            self._fd = fd

    def request(self, **fields: Any) -> dict[str, Any]:
        """Record one allowed or denied request (or TCP session); returns the record.

        Fields beyond REQUEST_FIELDS follow them, e.g. `detail`: why a request failed or was
        refused, with what only the node may know (internal host names, resolver and TLS errors,
        trust store paths); the application gets a reason and a generic sentence instead."""
        record: dict[str, Any] = {"ts": self._clock(), "kind": "request"}
        for key in REQUEST_FIELDS:
            record[key] = fields.pop(key, None)
        record.update(fields)
        self._write(record)
        return record

    def config_change(self, **fields: Any) -> dict[str, Any]:
        """Record one configuration change (who/what/old/new as the caller provides)."""
        return self.event("config", **fields)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record one event of another `kind` (the cloud's "tunnel" events), fields in the caller's order."""
        record: dict[str, Any] = {"ts": self._clock(), "kind": kind}
        record.update(fields)
        self._write(record)
        return record

    @property
    def recent(self) -> list[dict[str, Any]]:
        """The last records kept in memory, oldest first (served by the admin API)."""
        return list(self._recent)

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Like `recent`, optionally only the records of one kind ("request" or "config")."""
        return [r for r in self._recent if kind is None or r["kind"] == kind]

    async def wait_records(self, n: int, kind: str | None = None) -> list[dict[str, Any]]:
        """Wait until `n` records (of `kind`, if given) were written since opening, at once if
        they were; return the recent ones (of that kind)."""
        await trio.lowlevel.checkpoint()
        while self._written[kind] < n:
            await self._written_lot.park()
        return self.records(kind)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                metrics.AUDIT_WRITE_ERRORS.inc()
            self._fd = None

    def _write(self, record: dict[str, Any]) -> None:
        self._recent.append(record)
        self._written[record["kind"]] += 1
        self._written[None] += 1
        self._written_lot.unpark_all()
        try:
            line = _ENCODER.encode(record) + "\n"
        except (TypeError, ValueError):  # e.g. a circular structure: still leave a trace
            metrics.AUDIT_WRITE_ERRORS.inc()
            log.exception("audit record not serialisable")
            return
        if self._fd is not None:
            try:
                data = line.encode()  # ASCII: ensure_ascii escapes everything else
                while data:  # a regular file takes it whole; a short write is retried
                    data = data[os.write(self._fd, data):]
            except OSError as exc:
                metrics.AUDIT_WRITE_ERRORS.inc()
                log.error("audit write failed: %s", exc)
        if self._stream is not None:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: I/O on a closed file
                metrics.AUDIT_WRITE_ERRORS.inc()
                log.error("audit write failed: %s", exc)
