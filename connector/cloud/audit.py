"""The cloud side's audit log: one JSON line per request its proxies refuse, and per tunnel event.

Theory of operation. The node audits every request that reaches it; what the cloud's proxies turn
away before a node is involved (bad or missing credentials, malformed or smuggling-shaped
requests, CONNECT, no connector, too slow a client) would otherwise leave no trace. Such a
refusal is written here with the node's writer (`connector.agent.audit.AuditLog`: JSON lines,
file 0600, one unbuffered write per line, write errors counted and never raised) and the node's
request fields, so one query reads both logs: `decision` is "denied", `reason` the error token the
client got, `status` the HTTP status (for SOCKS5 the reply name in `reply`, status null). Two
fields are the cloud's own: `proxy` ("http" or "socks5") and `client` (the application's
address). Credentials never appear: only the subaccount they proved, if any.

Tunnel events (kind "tunnel") are the fence's decisions, in the same file: `event` is
"registered" (a master registration accepted), "refused" (a tunnel or registration turned away:
`reason` is stale_epoch, wrong_cluster, fence_unknown or revoked), "fence_advanced" (the highest
epoch of a location rose: `old_epoch`, `new_epoch`, and `source`, "registration" here or "shared"
from another replica) or "master_switched" (`from_node`/`from_epoch` to `node`/`epoch`; a first
master switches from null). Every tunnel record carries TUNNEL_FIELDS in that order (null when
unknown), `replica` (this cloud replica's id) last, then the event's own fields.

Refusals are bounded: a node refused again and again (a standalone node fenced by a clone of
itself re-registers at once, a revoked one redials) would otherwise fill the disk. An identical
refusal (same subaccount, location, node, cluster, reason and epoch) within REFUSAL_REPEAT_SECONDS
of the last one written is counted, not written; the next one written after that carries
`repeated`, the number left out. At most REFUSALS_TRACKED such refusals are remembered (the least
recently written is forgotten first). Time comes from trio's clock.

`wait_records(n)` and `wait_tunnel_records(n)` let tests wait for the nth record instead of polling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from connector.agent.audit import AuditLog

# The fields every tunnel record carries, in this order, after ts and kind.
TUNNEL_FIELDS = ("event", "subaccount", "location", "node", "cluster", "epoch", "replica")
# Why a tunnel or a registration is refused (`tunnel_refused`); the registry's verdicts and revocation.
REFUSAL_REASONS = frozenset({"stale_epoch", "wrong_cluster", "fence_unknown", "revoked"})
REFUSAL_REPEAT_SECONDS = 60.0  # an identical refusal is written at most once in this long
REFUSALS_TRACKED = 10_000  # identical-refusal keys remembered at once (bounded memory)


class CloudAudit:
    """Refusals of the cloud's proxies, as audit records (see the module docstring)."""

    def __init__(self, log: AuditLog | None = None, *, replica: str | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        """`log` defaults to an in-memory log (the recent records only, no file); `replica` is this
        cloud replica's id, written in every tunnel record."""
        self.log = log if log is not None else AuditLog(None)
        self.replica = replica
        self._clock = clock
        # refusal key -> (when it was last written, identical refusals left out since)
        self._refusals: OrderedDict[tuple[Any, ...], tuple[float, int]] = OrderedDict()
        self._written = 0
        self._tunnel_written = 0
        self._changed = trio.Event()

    @classmethod
    def open(cls, path: str | None, *, replica: str | None = None) -> CloudAudit:
        """Append to the file `path` (created 0600), or keep records in memory only if None."""
        return cls(AuditLog(path), replica=replica)

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
        self._signal()
        return record

    # --- tunnel events (see the module docstring) --------------------------------------------

    def tunnel_registered(self, *, subaccount: str, location: str, node: str, cluster: str,
                          epoch: int) -> dict[str, Any]:
        """A master registration was accepted."""
        return self._tunnel("registered", subaccount=subaccount, location=location, node=node, cluster=cluster,
                            epoch=epoch)

    def tunnel_refused(self, *, subaccount: str, location: str, node: str, cluster: str | None, reason: str,
                       epoch: int | None = None, **extra: Any) -> dict[str, Any] | None:
        """A tunnel or a registration was refused; `reason` is one of REFUSAL_REASONS, `extra` says
        more (the registry adds `highest_epoch` and `owner`, the owning cluster). Returns the
        record, or None when it was an identical repeat left out (see the module docstring)."""
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown tunnel refusal reason {reason!r} (not one of {sorted(REFUSAL_REASONS)})")
        key = (subaccount, location, node, cluster, reason, epoch)
        now = self._clock()
        last = self._refusals.get(key)
        if last is not None and now - last[0] < REFUSAL_REPEAT_SECONDS:
            self._refusals[key] = (last[0], last[1] + 1)
            return None
        self._refusals[key] = (now, 0)
        self._refusals.move_to_end(key)
        while len(self._refusals) > REFUSALS_TRACKED:
            self._refusals.popitem(last=False)
        repeated = {"repeated": last[1]} if last is not None and last[1] else {}
        return self._tunnel("refused", subaccount=subaccount, location=location, node=node, cluster=cluster,
                            epoch=epoch, reason=reason, **extra, **repeated)

    def fence_advanced(self, *, subaccount: str, location: str, cluster: str | None, old_epoch: int,
                       new_epoch: int, source: str, node: str | None = None) -> dict[str, Any]:
        """The highest epoch of a location rose from `old_epoch` (-1: none yet) to `new_epoch`."""
        return self._tunnel("fence_advanced", subaccount=subaccount, location=location, node=node, cluster=cluster,
                            epoch=new_epoch, old_epoch=old_epoch, new_epoch=new_epoch, source=source)

    def master_switched(self, *, subaccount: str, location: str, node: str, cluster: str, epoch: int,
                        from_node: str | None, from_epoch: int | None) -> dict[str, Any]:
        """The master of a location is now `node` (epoch `epoch`), after `from_node` (None: the first)."""
        return self._tunnel("master_switched", subaccount=subaccount, location=location, node=node, cluster=cluster,
                            epoch=epoch, from_node=from_node, from_epoch=from_epoch)

    def _tunnel(self, event: str, **fields: Any) -> dict[str, Any]:
        fields["event"], fields["replica"] = event, self.replica
        record = self.log.event("tunnel", **{key: fields.pop(key, None) for key in TUNNEL_FIELDS}, **fields)
        self._tunnel_written += 1
        self._signal()
        return record

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def written(self) -> int:
        """Records written since this log was opened."""
        return self._written

    @property
    def tunnel_written(self) -> int:
        """Tunnel records written since this log was opened."""
        return self._tunnel_written

    def records(self) -> list[dict[str, Any]]:
        """The most recent refusal records in memory, oldest first."""
        return self.log.records("request")

    def tunnel_records(self) -> list[dict[str, Any]]:
        """The most recent tunnel records in memory, oldest first."""
        return self.log.records("tunnel")

    async def wait_records(self, n: int) -> list[dict[str, Any]]:
        """Wait until `n` refusal records were written since opening; return the recent ones."""
        while self._written < n:
            await self._changed.wait()
        return self.records()

    async def wait_tunnel_records(self, n: int) -> list[dict[str, Any]]:
        """Wait until `n` tunnel records were written since opening; return the recent ones."""
        while self._tunnel_written < n:
            await self._changed.wait()
        return self.tunnel_records()

    def close(self) -> None:
        self.log.close()
