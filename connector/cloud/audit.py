"""The cloud side's audit log: one JSON line per request its proxies refuse.

Theory of operation. The node audits every request that reaches it; what the cloud's proxies turn
away before a node is involved (bad or missing credentials, malformed or smuggling-shaped
requests, CONNECT, no connector, too slow a client) would otherwise leave no trace. Such a
refusal is written here with the node's writer (`connector.agent.audit.AuditLog`: JSON lines,
file 0600, one unbuffered write per line, write errors counted and never raised) and the node's
request fields, so one query reads both logs: `decision` is "denied", `reason` the error token the
client got, `status` the HTTP status (for SOCKS5 the reply name in `reply`, status null). Two
fields are the cloud's own: `proxy` ("http" or "socks5") and `client` (the application's
address). Credentials never appear: only the subaccount they proved, if any.

`wait_records(n)` lets tests wait for the nth record instead of polling.
"""

from __future__ import annotations

from typing import Any

import trio

from connector.agent.audit import AuditLog


class CloudAudit:
    """Refusals of the cloud's proxies, as audit records (see the module docstring)."""

    def __init__(self, log: AuditLog | None = None) -> None:
        """`log` defaults to an in-memory log (the recent records only, no file)."""
        self.log = log if log is not None else AuditLog(None)
        self._written = 0
        self._changed = trio.Event()

    @classmethod
    def open(cls, path: str | None) -> CloudAudit:
        """Append to the file `path` (created 0600), or keep records in memory only if None."""
        return cls(AuditLog(path))

    def refusal(
        self,
        *,
        proxy: str,
        client: str,
        reason: str,
        status: int | None = None,
        subaccount: str | None = None,
        location: str | None = None,
        virtual_target: str | None = None,
        method: str | None = None,
        path: str | None = None,
        duration_seconds: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Record one refused request or connection; returns the record."""
        record = self.log.request(
            subaccount=subaccount, location=location, virtual_target=virtual_target, mapping=None,
            method=method, path=path, decision="denied", reason=reason, status=status,
            duration_seconds=None if duration_seconds is None else round(duration_seconds, 6),
            proxy=proxy, client=client, **extra,
        )
        self._written += 1
        self._changed.set()
        self._changed = trio.Event()
        return record

    @property
    def written(self) -> int:
        """Records written since this log was opened."""
        return self._written

    def records(self) -> list[dict[str, Any]]:
        """The most recent records in memory, oldest first."""
        return self.log.records("request")

    async def wait_records(self, n: int) -> list[dict[str, Any]]:
        """Wait until `n` records were written since opening; return the recent ones."""
        while self._written < n:
            await self._changed.wait()
        return self.records()

    def close(self) -> None:
        self.log.close()
