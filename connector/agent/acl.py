"""Access control on the node: which virtual endpoints exist, and which paths on them may be called.

Theory of operation. The node is default deny. A stream from the cloud names a `Target`
(virtual host, port, protocol); `AccessControl.find_mapping` looks up the `Mapping` for it, or
returns None (nothing is reachable that was not configured). HTTP streams carry requests that are
each checked by `AccessControl.check_request` against the mapping's resources (an allow-list of
exact paths and path prefixes; the longest matching resource decides). TCP mappings have no paths:
the mapping admits the whole connection. A TCP mapping may name a range of virtual ports
(`virtual_port = "7000-7009"`): port 7000 + i reaches internal port `internal_port` + i, and
`find_mapping` returns the one-port mapping of the port asked, so the forwarder never sees a range.
Mappings never share a virtual port of a virtual host (`check_no_overlap`).

Paths are checked in one canonical form, and the forwarder sends that same form to the internal
host, so the path that was checked is the path that is served. Canonicalisation decodes
percent-escapes of unreserved characters, removes dot segments (RFC 3986 section 5.2.4) and
collapses repeated slashes. Anything a backend might interpret differently from us is refused
rather than guessed at: encoded slashes, backslashes, NUL, encoded dots forming dot segments,
"..;" path-parameter tricks, climbing above the root, invalid escapes. The canonical path must
also mean the same thing to every internal host however it decodes (`check_path_meaning`): to one
that decodes twice, reads overlong UTF-8, or folds look-alike characters. Other escapes (an
encoded "?" or "#", valid UTF-8) are data and reach the internal host byte for byte.

`Decision.reason` is one of `REASONS`: a small fixed set, because it becomes a metrics label.
`AccessControl` is immutable; configuration changes replace it as a whole, so a request is
checked against one consistent configuration.
"""

from __future__ import annotations

import enum
import re
import string
import unicodedata
import urllib.parse
from collections.abc import Iterable
from collections.abc import Mapping as AbcMapping
from typing import Any

import attrs

from connector.agent.identity import secret_name
from connector.http1 import header_tokens
from connector.tunnel.types import StreamProtocol, Target

# --- decision reasons (metrics label values) ---------------------------------------------------
ALLOWED = "allowed"
NO_MAPPING = "no_mapping"
NO_RESOURCE = "no_resource"
RESOURCE_DISABLED = "resource_disabled"
WEBSOCKET_NOT_ALLOWED = "websocket_not_allowed"
AMBIGUOUS_PATH = "ambiguous_path"
HOST_MISMATCH = "host_mismatch"
BAD_REQUEST = "bad_request"

REASONS: frozenset[str] = frozenset(
    {
        ALLOWED,
        NO_MAPPING,
        NO_RESOURCE,
        RESOURCE_DISABLED,
        WEBSOCKET_NOT_ALLOWED,
        AMBIGUOUS_PATH,
        HOST_MISMATCH,
        BAD_REQUEST,
    }
)


class BackendProtocol(enum.StrEnum):
    """How the node speaks to the internal host."""

    HTTP = "HTTP"
    HTTPS = "HTTPS"
    TCP = "TCP"
    TCP_TLS = "TCP-TLS"

    @property
    def is_http(self) -> bool:
        return self in (BackendProtocol.HTTP, BackendProtocol.HTTPS)

    @property
    def uses_tls(self) -> bool:
        return self in (BackendProtocol.HTTPS, BackendProtocol.TCP_TLS)


class HostInHeader(enum.StrEnum):
    """Which Host header the internal host sees: the virtual one, or its own name."""

    VIRTUAL = "virtual"
    INTERNAL = "internal"


class PathRejected(ValueError):
    """A request path that cannot be checked unambiguously; `.reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEXDIGITS = frozenset(string.hexdigits)
_VCHAR = frozenset(chr(c) for c in range(0x21, 0x7F))


def _decode_segment(segment: str) -> str:
    """Decode escapes of unreserved characters in one path segment; keep the others (upper-cased)."""
    if "%" not in segment:
        return segment
    out: list[str] = []
    encoded_dot = False
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        hexpair = segment[i + 1 : i + 3]
        if len(hexpair) != 2 or not set(hexpair) <= _HEXDIGITS:
            raise PathRejected(AMBIGUOUS_PATH, "invalid percent escape")
        decoded = chr(int(hexpair, 16))
        if decoded == "/":
            raise PathRejected(AMBIGUOUS_PATH, "encoded slash")
        if decoded == "\\":
            raise PathRejected(AMBIGUOUS_PATH, "encoded backslash")
        if decoded == "\x00":
            raise PathRejected(AMBIGUOUS_PATH, "encoded NUL")
        if decoded in _UNRESERVED:
            out.append(decoded)
            encoded_dot = encoded_dot or decoded == "."
        else:
            out.append("%" + hexpair.upper())
        i += 3
    result = "".join(out)
    if encoded_dot and result.split(";", 1)[0] in (".", ".."):
        raise PathRejected(AMBIGUOUS_PATH, "encoded dot segment")
    return result


def normalise_path(path: str) -> str:
    """Return the canonical form of an origin-form path (no query); raise `PathRejected`.

    The result starts with "/", has no "." or ".." segments, no "//", no backslash, and
    `normalise_path(normalise_path(p)) == normalise_path(p)`. A trailing slash is kept.
    """
    if not path.startswith("/"):
        raise PathRejected(BAD_REQUEST, "path must start with '/'")
    if "\x00" in path:
        raise PathRejected(AMBIGUOUS_PATH, "NUL in path")
    if "\\" in path:
        raise PathRejected(AMBIGUOUS_PATH, "backslash in path")
    if not set(path) <= _VCHAR:
        raise PathRejected(BAD_REQUEST, "path has characters outside visible ASCII")
    if "#" in path:
        raise PathRejected(BAD_REQUEST, "fragment in request target")
    segments = path.split("/")[1:]
    kept: list[str] = []
    trailing_slash = False
    last = len(segments) - 1
    for index, raw in enumerate(segments):
        segment = _decode_segment(raw)
        bare = segment.split(";", 1)[0]
        if bare in (".", "..") and ";" in segment:
            # Servlet containers treat "..;x" as ".."; we would not: refuse the difference.
            raise PathRejected(AMBIGUOUS_PATH, "dot segment with parameters")
        if segment in ("", ".", ".."):
            if segment == "..":
                if not kept:
                    raise PathRejected(AMBIGUOUS_PATH, "path climbs above the root")
                kept.pop()
            trailing_slash = index == last
            continue
        kept.append(segment)
    canonical = "/" + "/".join(kept) + ("/" if trailing_slash else "") if kept else "/"
    check_path_meaning(canonical)
    return canonical


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Characters that some internal host reads as a separator although Unicode compatibility folding
# (NFKC) does not: Windows "best fit" code pages map them to "/" or "\" (U+00A5 and U+20A9 are
# the backslash of Japanese and Korean code pages).
_BEST_FIT_SEPARATORS = frozenset("\u2215\u2044\u29f8\u2216\u29f5\u00a5\u20a9")


def check_path_meaning(path: str) -> None:
    """Raise `PathRejected` (AMBIGUOUS_PATH) if another decoder could read `path` as another path.

    `path` is a canonical path (visible ASCII, valid escapes only). Its escapes are decoded once,
    as an internal host does, and the result must be final: no escape left that a second decoding
    would turn into something else, valid UTF-8 (no overlong forms, surrogates or stray bytes), no
    control character, no character that folds (NFKC) or is best-fit mapped to a separator, and no
    segment that is "." or ".." (also with ";parameters") once folded. Pure; the table of cases is
    in tests/unit/test_acl.py.

    An encoded "?" or "#" is data and stays: a host that decodes and then cuts the path there sees
    a prefix of it, which still lies under the resource that allowed it (resources may not contain
    one, see `_check_resource_path`).
    """
    if "%" not in path:
        return  # nothing to decode: the checks of normalise_path are the whole story
    raw = urllib.parse.unquote_to_bytes(path)
    try:
        text = raw.decode("utf-8")  # strict: overlong forms, surrogates and stray bytes fail
    except UnicodeDecodeError:
        raise PathRejected(AMBIGUOUS_PATH, "escapes that are not UTF-8") from None
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise PathRejected(AMBIGUOUS_PATH, "encoded control character")
    folded = unicodedata.normalize("NFKC", text)
    for view in (text, folded):
        if _ESCAPE.search(view):
            raise PathRejected(AMBIGUOUS_PATH, "percent-encoding that survives one decoding")
        if "\\" in view or _BEST_FIT_SEPARATORS.intersection(view):
            raise PathRejected(AMBIGUOUS_PATH, "a character read as a separator")
        if view.count("/") != path.count("/"):
            raise PathRejected(AMBIGUOUS_PATH, "a character that folds to a slash")
        if any(segment.split(";", 1)[0] in (".", "..") for segment in view.split("/")):
            raise PathRejected(AMBIGUOUS_PATH, "a segment that decodes or folds to a dot segment")


def is_websocket_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True if the request asks to upgrade to WebSocket (Upgrade: websocket)."""
    return b"websocket" in header_tokens(headers, b"upgrade")


# --- configuration objects ---------------------------------------------------------------------


def _check_resource_path(_instance: object, _attribute: object, value: str) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("path: must be a string starting with '/'")
    try:
        canonical = normalise_path(value)
    except PathRejected as exc:
        raise ValueError(f"path: {exc.detail}") from None
    if canonical != value:
        raise ValueError(f"path: not in canonical form (would be {canonical!r})")
    if "%3F" in value or "%23" in value:
        # a host that decodes and cuts the path at "?" or "#" would see less than the resource
        raise ValueError("path: an encoded '?' or '#' cannot be part of a resource")


@attrs.frozen
class Resource:
    """A path on a mapping that may be called: exactly, or as a prefix of whole segments."""

    path: str = attrs.field(validator=_check_resource_path)
    prefix: bool = True
    enabled: bool = True
    websocket_upgrade: bool = False

    def matches(self, path: str) -> bool:
        """Exact match, or (prefix) `path` lies under this path on a segment boundary."""
        if path == self.path:
            return True
        if not self.prefix:
            return False
        base = self.path if self.path.endswith("/") else self.path + "/"
        return path.startswith(base)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "prefix": self.prefix,
            "enabled": self.enabled,
            "websocket_upgrade": self.websocket_upgrade,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Resource:
        """Build from JSON/TOML data; ValueError names the bad key ("path: ...")."""
        if not isinstance(data, AbcMapping):
            raise ValueError(f"must be a table/object, not {type(data).__name__}")
        unknown = set(data) - {"path", "prefix", "enabled", "websocket_upgrade"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key")
        if "path" not in data:
            raise ValueError("path: missing")
        kwargs: dict[str, Any] = {"path": data["path"]}
        for key in ("prefix", "enabled", "websocket_upgrade"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ValueError(f"{key}: must be true or false")
                kwargs[key] = data[key]
        return cls(**kwargs)


MAX_PORT_RANGE = 1024  # ports in one range mapping: each is a virtual endpoint of its own


def parse_ports(key: str, value: Any) -> tuple[int, int]:
    """(first port, count) of a port (an integer) or a range ("7000-7009"); ValueError names `key`."""
    if isinstance(value, str) and "-" in value:
        first, _, last = value.partition("-")
        if not (first.strip().isdigit() and last.strip().isdigit()) or not 1 <= int(first) <= int(last) <= 65535:
            raise ValueError(f"{key}: {value!r} is not a range of ports like \"7000-7009\" (low-high, 1..65535)")
        return int(first), int(last) - int(first) + 1
    return value, 1  # a single port, checked by Mapping


def format_ports(first: int, count: int) -> str:
    """"7000" or "7000-7009": how a port or a range is written in names and messages."""
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


_HOST_CHARS = frozenset(string.ascii_letters + string.digits + "-._:[]")


def _check_host(attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name}: must be a non-empty string")
    if not set(value) <= _HOST_CHARS or len(value) > 253:
        raise ValueError(f"{attribute.name}: {value!r} is not a valid host name or address")


def _check_port(attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{attribute.name}: must be an integer port 1..65535, not {value!r}")


def _validate_host(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check_host(attribute, value)


def _validate_port(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check_port(attribute, value)


PROPAGATION_MODES = ("none", "certificate", "header")


def _check_propagation(mode: Any, protocol: BackendProtocol) -> None:
    if mode not in PROPAGATION_MODES:
        raise ValueError(f"principal_propagation: {mode!r} is not one of {', '.join(PROPAGATION_MODES)}")
    if mode == "certificate" and protocol is not BackendProtocol.HTTPS:
        raise ValueError("principal_propagation: \"certificate\" logs on with a client certificate: "
                         "the mapping's protocol must be HTTPS")
    if mode == "header" and not protocol.is_http:
        raise ValueError("principal_propagation: \"header\" needs an HTTP or HTTPS mapping")


@attrs.frozen
class Mapping:
    """A virtual endpoint the cloud may call, and the internal host that serves it."""

    virtual_host: str = attrs.field(validator=_validate_host)
    virtual_port: int = attrs.field(validator=_validate_port)
    internal_host: str = attrs.field(validator=_validate_host)
    internal_port: int = attrs.field(validator=_validate_port)
    protocol: BackendProtocol = BackendProtocol.HTTP
    host_in_header: HostInHeader = HostInHeader.VIRTUAL
    resources: tuple[Resource, ...] = ()
    trust_store: str | None = None  # CA bundle for HTTPS / TCP-TLS backends; None = system default
    port_count: int = 1  # > 1: the virtual ports virtual_port.. map to internal_port.. (TCP only)
    # what the internal host gets of a request's validated user: connector.agent.principal
    principal_propagation: str = "none"
    # the certificate presented to an HTTPS / TCP-TLS internal host (connector.agent.identity):
    # PEM files, or "secret:<name>" of the cluster's encrypted secrets
    client_cert: str | None = None
    client_key: str | None = None
    client_identity: str | None = None

    def __attrs_post_init__(self) -> None:
        count = self.port_count
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PORT_RANGE:
            raise ValueError(f"virtual_port: a range holds 1..{MAX_PORT_RANGE} ports, not {count!r}")
        if count > 1:
            if self.protocol.is_http:
                raise ValueError("virtual_port: only TCP and TCP-TLS mappings may name a range of ports")
            for name, first in (("virtual_port", self.virtual_port), ("internal_port", self.internal_port)):
                if first + count - 1 > 65535:
                    raise ValueError(f"{name}: the range {first}-{first + count - 1} goes past port 65535")
        if not isinstance(self.protocol, BackendProtocol):
            raise ValueError(f"protocol: must be a BackendProtocol, not {self.protocol!r}")
        if not isinstance(self.host_in_header, HostInHeader):
            raise ValueError(f"host_in_header: must be a HostInHeader, not {self.host_in_header!r}")
        if not self.protocol.is_http and self.resources:
            raise ValueError("resources: TCP and TCP-TLS mappings have no paths; remove resources")
        seen: set[tuple[str, bool]] = set()
        for index, resource in enumerate(self.resources):
            if not isinstance(resource, Resource):
                raise ValueError(f"resources[{index}]: must be a Resource")
            key = (resource.path, resource.prefix)
            if key in seen:
                raise ValueError(f"resources[{index}].path: duplicate resource {resource.path!r}")
            seen.add(key)
        if self.trust_store is not None and (
            not isinstance(self.trust_store, str) or not self.trust_store
        ):
            raise ValueError("trust_store: must be a file path or absent")
        _check_propagation(self.principal_propagation, self.protocol)
        self._check_client_identity()

    def _check_client_identity(self) -> None:
        for name in ("client_cert", "client_key", "client_identity"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}: must be a non-empty string or absent")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_key: client_cert and client_key go together (or neither)")
        if self.client_identity is not None:
            if self.client_cert is not None:
                raise ValueError("client_identity: give client_cert/client_key or client_identity, not both")
            try:
                secret_name(self.client_identity)
            except ValueError as exc:
                raise ValueError(f"client_identity: {exc}") from None
        if (self.client_cert or self.client_identity) and not self.protocol.uses_tls:
            which = "client_cert" if self.client_cert else "client_identity"
            raise ValueError(f"{which}: only HTTPS and TCP-TLS mappings present a client certificate")

    @property
    def name(self) -> str:
        """The mapping's name as operators and metrics see it: "virtual_host:virtual_port"
        ("virtual_host:7000-7009" for a range)."""
        return f"{self.virtual_host}:{format_ports(self.virtual_port, self.port_count)}"

    @property
    def virtual_ports(self) -> range:
        return range(self.virtual_port, self.virtual_port + self.port_count)

    def for_port(self, port: int) -> Mapping:
        """The one-port mapping of virtual `port` (one of `virtual_ports`): same offset inside."""
        if port not in self.virtual_ports:
            raise ValueError(f"port {port} is not in {self.name}")
        if self.port_count == 1:
            return self
        return attrs.evolve(self, virtual_port=port, internal_port=self.internal_port + port - self.virtual_port,
                            port_count=1)

    def to_dict(self) -> dict[str, Any]:
        ranged = self.port_count > 1
        data: dict[str, Any] = {
            "virtual_host": self.virtual_host,
            "virtual_port": format_ports(self.virtual_port, self.port_count) if ranged else self.virtual_port,
            "internal_host": self.internal_host,
            "internal_port": format_ports(self.internal_port, self.port_count) if ranged else self.internal_port,
            "protocol": str(self.protocol),
            "host_in_header": str(self.host_in_header),
            "resources": [r.to_dict() for r in self.resources],
        }
        if self.trust_store is not None:
            data["trust_store"] = self.trust_store
        if self.principal_propagation != "none":
            data["principal_propagation"] = self.principal_propagation
        for name in ("client_cert", "client_key", "client_identity"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Mapping:
        """Build from JSON/TOML data; ValueError names the bad key and why (e.g. "internal_port: ...")."""
        if not isinstance(data, AbcMapping):
            raise ValueError(f"mapping must be a table/object, not {type(data).__name__}")
        fields = {f.name for f in attrs.fields(cls)} - {"port_count"}  # a range is written "first-last"
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key")
        for key in ("virtual_host", "virtual_port", "internal_host", "internal_port"):
            if key not in data:
                raise ValueError(f"{key}: missing")
        virtual_port, count = parse_ports("virtual_port", data["virtual_port"])
        internal_port, internal_count = parse_ports("internal_port", data["internal_port"])
        if internal_count not in (1, count):  # an internal range must match; a single port is its start
            raise ValueError(f"internal_port: {data['internal_port']!r} holds {internal_count} ports, "
                             f"virtual_port {data['virtual_port']!r} holds {count}")
        kwargs: dict[str, Any] = {
            "virtual_host": data["virtual_host"], "virtual_port": virtual_port,
            "internal_host": data["internal_host"], "internal_port": internal_port, "port_count": count,
        }
        if "protocol" in data:
            try:
                raw_protocol = data["protocol"]
                kwargs["protocol"] = BackendProtocol(
                    raw_protocol.upper() if isinstance(raw_protocol, str) else raw_protocol
                )
            except ValueError:
                allowed = ", ".join(p.value for p in BackendProtocol)
                raise ValueError(f"protocol: {data['protocol']!r} is not one of {allowed}") from None
        if "host_in_header" in data:
            try:
                raw_hih = data["host_in_header"]
                kwargs["host_in_header"] = HostInHeader(
                    raw_hih.lower() if isinstance(raw_hih, str) else raw_hih
                )
            except ValueError:
                raise ValueError(
                    f"host_in_header: {data['host_in_header']!r} is not 'virtual' or 'internal'"
                ) from None
        if "resources" in data:
            raw = data["resources"]
            if not isinstance(raw, list | tuple):
                raise ValueError("resources: must be a list")
            resources = []
            for index, item in enumerate(raw):
                try:
                    resources.append(Resource.from_dict(item))
                except ValueError as exc:
                    raise ValueError(f"resources[{index}].{exc}") from None
            kwargs["resources"] = tuple(resources)
        if "trust_store" in data and data["trust_store"] is not None:
            if not isinstance(data["trust_store"], str):
                raise ValueError("trust_store: must be a file path string")
            kwargs["trust_store"] = data["trust_store"]
        if "principal_propagation" in data:
            kwargs["principal_propagation"] = data["principal_propagation"]
        for name in ("client_cert", "client_key", "client_identity"):
            if data.get(name) is not None:
                kwargs[name] = data[name]  # types checked by the constructor
        return cls(**kwargs)


@attrs.frozen
class Decision:
    """The verdict on one request. `reason` is one of `REASONS` ("allowed" when allowed).

    `path` is the canonical path that was checked (None if none could be derived);
    `forward_target` is the request target to send to the internal host (canonical path plus the
    original query); `websocket` is True for an allowed WebSocket upgrade; `detail` says, for the
    node's log and audit line only, why a path was refused.
    """

    allowed: bool
    reason: str
    path: str | None
    forward_target: bytes | None = None
    websocket: bool = False
    resource: Resource | None = None
    detail: str | None = None


PortTable = dict[tuple[str, int], "Mapping"]  # (lower-case virtual host, virtual port) -> its mapping


def claim_ports(table: PortTable, mapping: Mapping) -> Mapping | None:
    """Enter `mapping`'s virtual ports in `table`; if one is already there, enter none and return
    the mapping holding it. The one rule of overlap, for the node, its file and the shared store."""
    host = mapping.virtual_host.lower()
    holder = next((table[host, port] for port in mapping.virtual_ports if (host, port) in table), None)
    if holder is None:
        table.update(((host, port), mapping) for port in mapping.virtual_ports)
    return holder


def overlap(mapping: Mapping, others: Iterable[Mapping]) -> Mapping | None:
    """The first of `others` sharing a virtual port of `mapping`'s virtual host, or None."""
    host, ports = mapping.virtual_host.lower(), mapping.virtual_ports
    return next((other for other in others if other.virtual_host.lower() == host
                 and max(ports.start, other.virtual_port) < min(ports.stop, other.virtual_ports.stop)), None)


def check_no_overlap(mappings: Iterable[Mapping]) -> PortTable:
    """The port table of `mappings`; ValueError naming the first two that share a virtual port."""
    table: PortTable = {}
    for mapping in mappings:
        holder = claim_ports(table, mapping)
        if holder is not None:
            what = "duplicate mapping" if holder.name.lower() == mapping.name.lower() else "overlapping mappings"
            raise ValueError(f"virtual_port: {what} {holder.name!r} and {mapping.name!r}")
    return table


def _deny(reason: str, path: str | None = None, detail: str | None = None) -> Decision:
    return Decision(allowed=False, reason=reason, path=path, detail=detail)


def _split_host_port(authority: str) -> tuple[str, int | None]:
    """Split "host[:port]" / "[v6][:port]"; raise PathRejected(BAD_REQUEST) if malformed."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise PathRejected(BAD_REQUEST, "malformed authority")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise PathRejected(BAD_REQUEST, "malformed authority")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        raise PathRejected(BAD_REQUEST, "empty host")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PathRejected(BAD_REQUEST, "bad port in authority")
    return host, int(port_text)


class AccessControl:
    """The node's allow-list: mappings by virtual endpoint. Immutable; replace it as a whole."""

    def __init__(self, mappings: Iterable[Mapping]) -> None:
        self._mappings = tuple(mappings)
        self._by_endpoint = check_no_overlap(self._mappings)

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return self._mappings

    def find_mapping(self, target: Target) -> Mapping | None:
        """The mapping serving `target` (of its port alone, when a range serves it), or None.
        HTTP targets only reach HTTP/HTTPS mappings, TCP targets only TCP/TCP-TLS ones; the
        virtual host compares case-insensitively."""
        mapping = self._by_endpoint.get((target.virtual_host.lower(), target.port))
        if mapping is None:
            return None
        wants_http = target.protocol == StreamProtocol.HTTP
        if mapping.protocol.is_http != wants_http:
            return None
        return mapping.for_port(target.port)

    def check_request(
        self,
        mapping: Mapping,
        method: bytes,
        raw_target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
    ) -> Decision:
        """Decide one HTTP request on `mapping` (a mapping from `find_mapping`)."""
        if not mapping.protocol.is_http:
            return _deny(BAD_REQUEST)
        headers = list(headers)
        try:
            target = raw_target.decode("ascii")
        except UnicodeDecodeError:
            return _deny(BAD_REQUEST)
        if method.upper() == b"CONNECT" or "#" in target or not target:
            return _deny(BAD_REQUEST)
        if target == "*":
            if method != b"OPTIONS":
                return _deny(BAD_REQUEST)
            if any(r.enabled for r in mapping.resources):
                return Decision(True, ALLOWED, "*", forward_target=b"*")
            return _deny(NO_RESOURCE, "*")
        try:
            path, query = self._origin_parts(mapping, target)
            path = normalise_path(path)
        except PathRejected as exc:
            return _deny(exc.reason, detail=exc.detail)
        resource = self._best_resource(mapping, path)
        if resource is None:
            return _deny(NO_RESOURCE, path)
        if not resource.enabled:
            return _deny(RESOURCE_DISABLED, path)
        websocket = is_websocket_upgrade(headers)
        if websocket and not resource.websocket_upgrade:
            return _deny(WEBSOCKET_NOT_ALLOWED, path)
        forward = path if query is None else f"{path}?{query}"
        return Decision(
            True, ALLOWED, path, forward_target=forward.encode("ascii"), websocket=websocket,
            resource=resource,
        )

    @staticmethod
    def _origin_parts(mapping: Mapping, target: str) -> tuple[str, str | None]:
        """Split a request target into (raw path, query); absolute-form must name the mapping."""
        lowered = target[:8].lower()
        if lowered.startswith(("http://", "https://")):
            rest = target.split("://", 1)[1]
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            authority, target = rest[:cut], rest[cut:]
            if "@" in authority:
                raise PathRejected(BAD_REQUEST, "userinfo in absolute-form target")
            host, port = _split_host_port(authority)
            if host.lower() != mapping.virtual_host.lower() or (
                port is not None and port != mapping.virtual_port
            ):
                raise PathRejected(HOST_MISMATCH, "absolute-form host is not the virtual host")
            if not target or target.startswith("?"):
                target = "/" + target
        elif not target.startswith("/"):
            raise PathRejected(BAD_REQUEST, "request target is not origin-form")
        path, sep, query = target.partition("?")
        return path, (query if sep else None)

    @staticmethod
    def _best_resource(mapping: Mapping, path: str) -> Resource | None:
        """Longest matching resource; at equal length an exact resource beats a prefix one."""
        best: Resource | None = None
        for resource in mapping.resources:
            if not resource.matches(path):
                continue
            if best is None or (len(resource.path), not resource.prefix) > (
                len(best.path),
                not best.prefix,
            ):
                best = resource
        return best
