"""The node's audit log: one JSON line per request decision and per configuration change.

Theory of operation. Auditing must never take the request path down: a line that cannot be
written (disk full, file removed, stream closed) is counted in
`connector_audit_write_errors_total` and logged, and the request goes on. The file is opened once
in append mode with mode 0600 (audit lines name internal paths), line-buffered so each record
reaches the OS as soon as it is written and a crash loses at most the line being written.
The most recent records are also kept in memory (a bounded deque) for tests and the admin API.

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
        self._file: IO[str] | None = None
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)  # an existing file readable by others is tightened
            except OSError:
                log.warning("audit log %s: could not restrict permissions to 0600", path)
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def request(self, **fields: Any) -> dict[str, Any]:
        """Record one allowed or denied request (or TCP session); returns the record."""
        record: dict[str, Any] = {"ts": self._clock(), "kind": "request"}
        for key in REQUEST_FIELDS:
            record[key] = fields.pop(key, None)
        record.update(fields)
        self._write(record)
        return record

    def config_change(self, **fields: Any) -> dict[str, Any]:
        """Record one configuration change (who/what/old/new as the caller provides)."""
        record: dict[str, Any] = {"ts": self._clock(), "kind": "config"}
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

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                metrics.AUDIT_WRITE_ERRORS.inc()
            self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        self._recent.append(record)
        try:
            line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        except (TypeError, ValueError):  # e.g. a circular structure: still leave a trace
            metrics.AUDIT_WRITE_ERRORS.inc()
            log.exception("audit record not serialisable")
            return
        for sink in (self._file, self._stream):
            if sink is None:
                continue
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError) as exc:  # ValueError: I/O on a closed file
                metrics.AUDIT_WRITE_ERRORS.inc()
                log.error("audit write failed: %s", exc)
