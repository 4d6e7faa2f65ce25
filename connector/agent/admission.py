"""Admission of one HTTP request on the node, from its typed head: one place for every rule.

`admit` decides a request head before anything reaches the internal host: the head's size, its
framing (Content-Length with Transfer-Encoding, or framing headers named in Connection: request
smuggling), and the allow-list on the canonical path (`connector.agent.acl`, which also says
whether a WebSocket upgrade is allowed). A refusal carries its HTTP status, reason token and the
sentence the application reads; the detail stays on the node. `origin_request` is what the
internal host is then sent: the checked path (the path checked is the path served) and the Host
the mapping asks for, without hop-by-hop headers.
"""

from __future__ import annotations

import attrs
import h11

from connector.agent import acl as acl_mod
from connector.agent.acl import AccessControl, Decision, Mapping
from connector.http1 import framing_error, header_tokens, strip_hop_by_hop
from connector.tunnel.heads import RequestHead

__all__ = ["Refusal", "admit", "origin_request", "is_switch", "has_body"]


@attrs.frozen
class Refusal:
    """Why a request is answered by the node itself: status, reason token, what the application
    reads, and the detail for the node only."""

    status: int
    reason: str
    message: str
    detail: str | None = None


def admit(acl: AccessControl, mapping: Mapping, head: RequestHead, max_header_bytes: int) -> Decision | Refusal:
    """The admission decision for one request head: the allow-list's Decision, or a Refusal."""
    head_size = len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers)
    if head_size > max_header_bytes:
        return Refusal(431, acl_mod.BAD_REQUEST, "request head too large")
    framing = framing_error(head.headers)  # the proxy refuses these too: a second line of defence
    if framing is not None:
        return Refusal(400, acl_mod.BAD_REQUEST, framing)
    decision = acl.check_request(mapping, head.method, head.target, head.headers)
    if decision.allowed:
        return decision
    status = 400 if decision.reason in (acl_mod.BAD_REQUEST, acl_mod.AMBIGUOUS_PATH, acl_mod.HOST_MISMATCH) else 403
    return Refusal(status, decision.reason, f"the connector's access control denied this request ({decision.reason})",
                   decision.detail)


def origin_request(mapping: Mapping, head: RequestHead, decision: Decision) -> h11.Request:
    """The request for the internal host: checked target, the mapping's Host, no hop-by-hop."""
    headers = [(k, v) for k, v in strip_hop_by_hop(head.headers)
               if k not in (b"host", b"x-forwarded-host", b"expect")]
    if mapping.host_in_header is acl_mod.HostInHeader.INTERNAL:
        host = f"{mapping.internal_host}:{mapping.internal_port}".encode()
        headers.append((b"x-forwarded-host", f"{mapping.virtual_host}:{mapping.virtual_port}".encode()))
    else:
        host = f"{mapping.virtual_host}:{mapping.virtual_port}".encode()
    if is_switch(head, decision):
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    assert decision.forward_target is not None
    return h11.Request(method=head.method, target=decision.forward_target, headers=[(b"host", host), *headers])


def is_switch(head: RequestHead, decision: Decision) -> bool:
    """An allowed WebSocket upgrade that the client really proposed (Connection: upgrade)."""
    return decision.websocket and b"upgrade" in header_tokens(head.headers, b"connection")


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
