"""Forwarding on the node: serve one tunnel stream the cloud opened, against the internal host.

`serve_stream` looks up the stream's mapping (none: reset NO_MAPPING and an audit line) and then
either serves one HTTP exchange (HTTP / HTTPS mappings: `connector.agent.exchange`) or relays raw
bytes (TCP / TCP-TLS mappings): connect first, `accept()` the stream only once the internal host
answered (so SOCKS5 clients get a real connect result), then copy both ways (`connector.relay`, in
reads of up to `relay_chunk`: 256 KiB is a quarter of the syscalls of 64 KiB reads at full speed),
propagating half-close. Each request or TCP session produces one audit line and the metrics of
`connector.metrics`.

`serve_stream` never raises (except cancellation): it runs as a task inside the tunnel session,
where an exception would take down every other stream.
"""

from __future__ import annotations

import logging
import ssl

import trio

from connector import metrics
from connector.agent import acl as acl_mod
from connector.agent.acl import AccessControl, Mapping
from connector.agent.exchange import Exchange, ForwardSettings, StreamContext
from connector.agent.origin import BackendError, open_backend
from connector.httperrors import reset_error
from connector.relay import relay
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError

__all__ = ["ForwardSettings", "StreamContext", "serve_stream", "NO_MAPPING_LABEL"]

log = logging.getLogger(__name__)

NO_MAPPING_LABEL = "-"  # mapping label when no mapping matched (virtual names are caller-chosen)
_TUNNEL_ERRORS = (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError)


async def serve_stream(stream: TunnelStream, acl: AccessControl, ctx: StreamContext) -> None:
    """Serve one stream the cloud opened, until it or the internal host is done. Never raises."""
    try:
        mapping = acl.find_mapping(stream.target)
        if mapping is None:
            metrics.REQUESTS.labels(NO_MAPPING_LABEL, "denied").inc()
            metrics.DENIALS.labels(acl_mod.NO_MAPPING).inc()
            ctx.audit.request(
                subaccount=ctx.subaccount, location=ctx.location_id,
                virtual_target=str(stream.target), mapping=None, decision="denied",
                reason=acl_mod.NO_MAPPING, duration_seconds=0.0,
            )
            await stream.reset(ErrorCode.NO_MAPPING, f"no mapping for {stream.target}")
            return
        if mapping.protocol.is_http:
            await Exchange(stream, acl, mapping, ctx).run()
        else:
            await _serve_tcp(stream, mapping, ctx)
    except _TUNNEL_ERRORS as exc:
        log.debug("stream %s to %s ended: %s", stream.stream_id, stream.target, exc)
    except Exception:
        log.exception("forwarding stream %s to %s failed", stream.stream_id, stream.target)
        await _reset_quietly(stream, ErrorCode.INTERNAL_ERROR, "internal error in the connector")


async def _reset_quietly(stream: TunnelStream, code: ErrorCode, reason: str) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.reset(code, reason)
        except _TUNNEL_ERRORS:
            pass


async def _serve_tcp(stream: TunnelStream, mapping: Mapping, ctx: StreamContext) -> None:
    started = trio.current_time()
    audit = {
        "subaccount": ctx.subaccount, "location": ctx.location_id,
        "virtual_target": str(stream.target), "mapping": mapping.name, "decision": "allowed",
    }
    metrics.REQUESTS.labels(mapping.name, "allowed").inc()
    try:
        backend = await open_backend(mapping, ctx.settings.connect_timeout, ctx.pool.secrets)
    except BackendError as exc:
        metrics.BACKEND_ERRORS.labels(mapping.name, exc.reason).inc()
        log.info("%s (TCP): %s", mapping.name, exc.message)
        ctx.audit.request(**audit, reason=exc.reason, detail=exc.message,
                          duration_seconds=trio.current_time() - started)
        await _reset_quietly(stream, exc.code, reset_error(exc.code)[2])
        return
    try:
        await stream.accept()
    except _TUNNEL_ERRORS:
        await trio.aclose_forcefully(backend)
        return
    try:
        result = await relay(stream, backend, chunk=ctx.settings.relay_chunk,
                             count_a_to_b=metrics.BYTES.labels(mapping.name, "in").inc,
                             count_b_to_a=metrics.BYTES.labels(mapping.name, "out").inc)
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(backend)
    duration = trio.current_time() - started
    metrics.REQUEST_SECONDS.labels(mapping.name, str(mapping.protocol)).observe(duration)
    reason, detail = "allowed", {}
    cause = result.error.__cause__ if result.error is not None else None
    if result.failed == "b" and isinstance(cause, ssl.SSLError):
        # TLS 1.3: the internal host refuses our client certificate (or its absence) only after
        # our side of the handshake, so after the stream was accepted
        reason, detail = "tls_error", {"detail": f"TLS to the internal host failed: {cause}"}
        metrics.BACKEND_ERRORS.labels(mapping.name, reason).inc()
        log.info("%s (TCP): %s", mapping.name, detail["detail"])
        await _reset_quietly(stream, ErrorCode.BACKEND_TLS_ERROR, reset_error(ErrorCode.BACKEND_TLS_ERROR)[2])
    elif result.failed == "b":
        reason = "backend_reset"
        metrics.BACKEND_ERRORS.labels(mapping.name, reason).inc()
        await _reset_quietly(stream, ErrorCode.BACKEND_RESET, "internal host reset the connection")
    elif result.failed == "a":
        reason = "client_gone"
        await _reset_quietly(stream, ErrorCode.CANCEL, "stream broken")
    ctx.audit.request(**audit, reason=reason, bytes_in=result.a_to_b, bytes_out=result.b_to_a,
                      duration_seconds=duration, **detail)
