"""TOML configuration for `connector cloud` and `connector node`, validated at load.

Theory of operation: `load_cloud_config` / `load_node_config` read a TOML file with `tomllib` and
build frozen attrs records. Every problem raises `ConfigError` naming the file, the dotted key and
what is wrong; nothing is defaulted silently where a typo is likelier than intent (unknown keys are
errors too). Relative paths are resolved against the directory of the file, so a config directory
can be moved as a whole.
"""

from __future__ import annotations

import builtins
import collections.abc
import difflib
import json
import logging
import os
import socket
import ssl
import tomllib
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import attrs

from connector import pki
from connector.agent.acl import Mapping, check_no_overlap
from connector.agent.identity import IdentityError, read_private_key
from connector.agent.principal import PrincipalSettings
from connector.cloud.admission import StreamLimits
from connector.cloud.bindings import UserAccount
from connector.cloud.clients import AuthThrottleSettings, ConnectionLimits
from connector.cloud.destinations import DestinationLimits
from connector.cloud.drain import DrainSettings
from connector.cloud.idp_keys import DEFAULT_REFRESH, MIN_FETCH_INTERVAL
from connector.cloud.jwtauth import TrustedIssuer
from connector.cloud.oauth import OAuthSettings
from connector.cloud.token_client import TokenClientSettings
from connector.tunnel.egress import EgressPolicy, egress_policy
from ha.timing import HATiming

T = TypeVar("T")
Environment = collections.abc.Mapping[str, str]  # os.environ, or a test's own

MIN_ADMIN_TOKEN = 16  # characters in [admin] token_file: `connector certs init` writes 43

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message names file and key."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")
        self.file = str(file)
        self.key = key


@attrs.frozen
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _Section:
    """Typed reads from one TOML table, each error naming file and dotted key.

    The readers are named after the types they read, so in this class body a bare ``str`` in an
    annotation would mean the method: signatures spell the types ``builtins.str`` etc.
    """

    def __init__(self, file: Path, prefix: builtins.str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(file, prefix, "must be a table")
        self.file, self.prefix, self.table = file, prefix, table
        self.seen: set[str] = set()

    def key(self, name: builtins.str) -> builtins.str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _get(self, name: builtins.str, kind: type | tuple[type, ...], default: Any, required: builtins.bool) -> Any:
        self.seen.add(name)
        if name not in self.table:
            if required:
                raise ConfigError(self.file, self.key(name), "is required")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(self.file, self.key(name), f"must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.file, self.key(name), f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def str(self, name: builtins.str, default: builtins.str | None = None, *, required: builtins.bool = False) -> Any:
        return self._get(name, str, default, required)

    def int(self, name: builtins.str, default: builtins.int | None = None, *, required: builtins.bool = False,
            minimum: builtins.int | None = None) -> Any:
        value = self._get(name, int, default, required)
        if value is not None and minimum is not None and value < minimum:
            raise ConfigError(self.file, self.key(name), f"must be at least {minimum}, got {value}")
        return value

    def float(self, name: builtins.str, default: builtins.float | None = None, *, required: builtins.bool = False,
              positive: builtins.bool = True) -> Any:
        value = self._get(name, (int, float), default, required)
        if value is not None and positive and value <= 0:
            raise ConfigError(self.file, self.key(name), f"must be positive, got {value}")
        return float(value) if value is not None else None

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        return bool(self._get(name, bool, default, False))

    def str_list(self, name: builtins.str, default: list[builtins.str] | None = None) -> list[builtins.str]:
        value = self._get(name, list, default if default is not None else [], False)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(self.file, f"{self.key(name)}[{i}]", "must be a string")
        return list(value)

    @overload
    def path(self, name: builtins.str, *, required: Literal[True], must_exist: builtins.bool = True) -> Path: ...

    @overload
    def path(self, name: builtins.str, *, required: builtins.bool = False,
             must_exist: builtins.bool = True) -> Path | None: ...

    def path(self, name: builtins.str, *, required: builtins.bool = False, must_exist: builtins.bool = True) -> Path | None:
        value = self.str(name, required=required)
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            path = self.file.parent / path
        if must_exist and not path.exists():
            raise ConfigError(self.file, self.key(name), f"file {path} does not exist")
        return path

    @overload
    def listen(self, name: builtins.str, default: builtins.str, *, required: builtins.bool = False) -> Listen: ...

    @overload
    def listen(self, name: builtins.str, default: None, *, required: Literal[True]) -> Listen: ...

    @overload
    def listen(self, name: builtins.str, default: None, *, required: builtins.bool = False) -> Listen | None: ...

    def listen(self, name: builtins.str, default: builtins.str | None, *, required: builtins.bool = False) -> Listen | None:
        value = self.str(name, default, required=required)
        if value is None:
            return None
        return parse_listen(value, lambda msg: ConfigError(self.file, self.key(name), msg))

    @overload
    def sub(self, name: builtins.str, *, required: Literal[True]) -> _Section: ...

    @overload
    def sub(self, name: builtins.str, *, required: builtins.bool = False) -> _Section | None: ...

    def sub(self, name: builtins.str, *, required: builtins.bool = False) -> _Section | None:
        self.seen.add(name)
        if name not in self.table:
            if required:
                typo = difflib.get_close_matches(name, [k for k in self.table if k not in self.seen], n=1, cutoff=0.7)
                if typo:  # `[tunel]`: the typo is the error, not the section it was meant to be
                    raise ConfigError(self.file, self.key(typo[0]),
                                      f"unknown key (typo? did you mean [{self.key(name)}], which is required?)")
                raise ConfigError(self.file, self.key(name), "section is required")
            return None
        return _Section(self.file, self.key(name), self.table[name])

    def subs(self, name: builtins.str) -> list[_Section]:
        self.seen.add(name)
        value = self.table.get(name, [])
        if not isinstance(value, list):
            raise ConfigError(self.file, self.key(name), "must be an array of tables ([[...]])")
        return [_Section(self.file, f"{self.key(name)}[{i}]", item) for i, item in enumerate(value)]

    def retired(self, name: builtins.str, why: builtins.str) -> None:
        """A key an earlier version read: accepted with a warning saying why it is gone."""
        self.seen.add(name)
        if name in self.table:
            log.warning("%s: %s is no longer used (%s); remove it", self.file, self.key(name), why)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.7)
            hint = f" did you mean {close[0]!r}?" if close else ""
            raise ConfigError(self.file, self.key(unknown[0]), f"unknown key (typo?{hint})")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_listen(value: str, error: Callable[[str], Exception]) -> Listen:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise error(f"must be HOST:PORT, got {value!r}")
    return Listen(host.strip("[]"), int(port))


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None


# --- cloud side -------------------------------------------------------------------------------

@attrs.frozen
class SubaccountConfig:
    id: str
    ca: Path  # client certificates of this subaccount's nodes must chain to it
    token_sha256: tuple[str, ...]
    locations: tuple[str, ...]  # locations held for during failover even before first seen
    destination_admin_sha256: tuple[str, ...] = ()  # tokens that manage destinations (not proxy tokens)
    clusters: dict[str, str] = attrs.field(factory=dict)  # location -> the one cluster that may serve it
    max_streams_per_token: int | None = None  # None: [proxy] max_streams_per_token
    users: tuple[UserAccount, ...] = ()  # [[subaccounts.users]]: the password grant's users ([oauth])
    trusted_issuers: tuple[TrustedIssuer, ...] = ()  # [[subaccounts.trusted_issuers]]: jwt-bearer assertions ([oauth])

    ca_key: Path | None = None  # the CA's key: the cloud renews its nodes' certificates (None: offline)


@attrs.frozen
class OAuthConfig:
    """[oauth]: the token service and the application bindings (connector.cloud.oauth)."""

    listen: Listen
    cert: Path  # TLS certificate (default: the tunnel endpoint's, signed by the cloud CA)
    key: Path
    bindings: Path  # the bindings file (`connector binding` writes it, the cloud reads it); [shared]: imported once
    signing_keys: Path  # the signing key ring (written by the cloud, mode 0600); [shared]: imported once
    proxy_host: str  # the proxies' host as applications reach it (onpremise_proxy_host)
    settings: OAuthSettings


@attrs.frozen
class CloudConfig:
    file: Path
    tunnel_listen: Listen
    tunnel_cert: Path
    tunnel_key: Path
    http_listen: Listen
    socks5_listen: Listen
    admin_listen: Listen
    destinations_listen: Listen | None
    destinations_store: Path | None
    hold_seconds: float
    hold_max: int
    audit_log: Path | None  # refusals of the proxies, JSON lines (None: kept in memory only)
    request_head_timeout: float  # the HTTP proxy's deadlines and minimum rate (ProxySettings)
    idle_timeout: float
    min_request_body_rate: float
    request_body_grace: float
    response_write_timeout: float
    ping_interval: float
    ping_timeout: float
    tls_handshake_timeout: float  # deadlines of the tunnel endpoint's handshake phases
    upgrade_timeout: float
    hello_timeout: float
    state_file: Path | None  # highest epochs, so a restarted cloud keeps fencing
    subaccounts: tuple[SubaccountConfig, ...]
    oauth: OAuthConfig | None = None  # None: no token service, static tokens only
    destination_limits: DestinationLimits = DestinationLimits()
    destination_tokens: TokenClientSettings = TokenClientSettings()  # [destinations] token_service_ca, token_timeout
    stream_wait_seconds: float = 5.0
    stream_limits: StreamLimits = StreamLimits()
    auth_throttle: AuthThrottleSettings = AuthThrottleSettings()
    connection_limits: ConnectionLimits = ConnectionLimits()
    drain: DrainSettings = DrainSettings()  # [drain]: graceful shutdown (connector.cloud.drain)
    replica: ReplicaConfig | None = None  # None only for configurations built by hand (tests)
    shared: SharedConfig | None = None  # None: one replica, local files


@attrs.frozen
class ReplicaConfig:
    """[replica]: who this cloud replica is, as other replicas, nodes and operators see it."""

    id: str  # unique per replica; default: the host name
    tunnel_url: str | None  # how nodes dial this replica; None: wss://<tunnel listen>/tunnel (bound port)
    admin_url: str | None  # how operators reach its admin API; None: http://<admin listen> (bound port)
    lease_ttl: int = 10  # seconds its entry in the replica set outlives it (kill -9)


@attrs.frozen
class SharedConfig:
    """[shared]: the cloud's own etcd, holding what every replica must agree on."""

    etcd: EtcdConfig
    prefix: str  # the key space, "/connector-cloud" (one path segment)
    secrets_key: Path | None  # Fernet key shared by the replicas: destination secrets, token signing keys


def _users(subaccount: _Section) -> tuple[UserAccount, ...]:
    """[[subaccounts.users]]: user_name, password_scrypt (a hash_secret hash), email, origin, user_id."""
    users: list[UserAccount] = []
    for section in subaccount.subs("users"):
        try:
            users.append(UserAccount(
                subaccount=subaccount.str("id", required=True), user_name=section.str("user_name", required=True),
                password_hash=section.str("password_scrypt", required=True), email=section.str("email", ""),
                origin=section.str("origin", "connector"), user_id=section.str("user_id", ""),
            ))
        except ValueError as exc:
            raise ConfigError(section.file, section.prefix, str(exc)) from None
        section.done()
    names = [u.user_name for u in users]
    if len(set(names)) != len(names):
        raise ConfigError(subaccount.file, subaccount.key("users"), "a user_name appears twice")
    return tuple(users)


def _trusted_issuers(subaccount: _Section) -> tuple[TrustedIssuer, ...]:
    """[[subaccounts.trusted_issuers]]: issuer, audience (required), and the provider's keys: jwks
    (a JWKS file, read at load) or jwks_uri (fetched by the cloud, with ca, refresh_seconds, timeout)."""
    issuers: list[TrustedIssuer] = []
    for section in subaccount.subs("trusted_issuers"):
        issuer, audience = section.str("issuer", required=True), section.str("audience", required=True)
        sub = subaccount.str("id", required=True)
        jwks, uri = section.path("jwks"), section.str("jwks_uri")
        if (jwks is None) == (uri is None):
            raise ConfigError(section.file, section.prefix, "needs exactly one of jwks (a file) and jwks_uri")
        if jwks is not None:
            for name in ("ca", "refresh_seconds", "timeout"):
                if name in section.table:
                    raise ConfigError(section.file, section.key(name), "applies to jwks_uri only")
            try:
                issuers.append(TrustedIssuer.from_jwks(sub, issuer, json.loads(jwks.read_bytes()), audience))
            except (ValueError, OSError) as exc:
                raise ConfigError(section.file, section.key("jwks"), f"{jwks}: {exc}") from None
        else:
            assert uri is not None
            refresh = section.float("refresh_seconds", DEFAULT_REFRESH)
            if refresh < MIN_FETCH_INTERVAL:
                raise ConfigError(section.file, section.key("refresh_seconds"),
                                  f"must be at least {MIN_FETCH_INTERVAL:g} (keys are fetched at most once a minute)")
            settings = TokenClientSettings(ca=section.path("ca"), timeout=section.float("timeout", 10.0))
            try:
                settings.ssl_context()
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(section.file, section.key("ca"), f"holds no usable CA certificate: {exc}") from None
            try:
                issuers.append(TrustedIssuer.from_uri(sub, issuer, uri, audience, settings, refresh))
            except ValueError as exc:
                raise ConfigError(section.file, section.key("jwks_uri"), str(exc)) from None
        section.done()
    names = [issuer.issuer for issuer in issuers]
    if len(set(names)) != len(names):
        raise ConfigError(subaccount.file, subaccount.key("trusted_issuers"), "an issuer appears twice")
    return tuple(issuers)


def _drain_settings(drain: _Section) -> DrainSettings:
    """[drain]: how long a replica stays in rotation after SIGTERM, and how long requests get."""
    values = {}
    for name, default in attrs.asdict(DrainSettings()).items():
        values[name] = drain.float(name, default, positive=False)
        if values[name] < 0:
            raise ConfigError(drain.file, drain.key(name), f"must be zero or more, got {values[name]:g}")
    return DrainSettings(**values)


def _digests(section: _Section, name: str) -> list[str]:
    digests = section.str_list(name)
    for i, digest in enumerate(digests):
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(section.file, f"{section.key(name)}[{i}]", "must be a lowercase SHA-256 hex digest")
    return digests


def _destination_limits(dest: _Section) -> DestinationLimits:
    defaults = DestinationLimits()
    try:
        return DestinationLimits(
            max_body_bytes=dest.int("max_body_bytes", defaults.max_body_bytes, minimum=1),
            max_json_depth=dest.int("max_json_depth", defaults.max_json_depth, minimum=2),
            max_destination_bytes=dest.int("max_destination_bytes", defaults.max_destination_bytes, minimum=1),
            max_destinations=dest.int("max_destinations", defaults.max_destinations, minimum=1),
            max_connections=dest.int("max_connections", defaults.max_connections, minimum=1),
            max_connections_per_client_address=dest.int(
                "max_connections_per_client_address", defaults.max_connections_per_client_address, minimum=1),
            request_timeout=dest.float("request_timeout", defaults.request_timeout),
            idle_timeout=dest.float("idle_timeout", defaults.idle_timeout),
        )
    except ValueError as exc:
        raise ConfigError(dest.file, dest.prefix, str(exc)) from None


def _destination_tokens(dest: _Section, limits: DestinationLimits) -> TokenClientSettings:
    """[destinations] token_service_ca, token_timeout: how OAuth2 destinations' tokens are fetched."""
    timeout = dest.float("token_timeout", min(TokenClientSettings().timeout, limits.request_timeout / 2))
    if timeout >= limits.request_timeout:
        raise ConfigError(dest.file, dest.key("token_timeout"), "must be shorter than request_timeout (a find "
                          "fetches its token within its own deadline)")
    settings = TokenClientSettings(ca=dest.path("token_service_ca"), timeout=timeout)
    try:
        settings.ssl_context()  # a file that holds no certificate fails here, not at start
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(dest.file, dest.key("token_service_ca"), f"holds no usable CA certificate: {exc}") from None
    return settings


def load_cloud_config(path: str | Path) -> CloudConfig:
    file = Path(path).resolve()
    root = _Section(file, "", _read(file))
    tunnel = root.sub("tunnel", required=True)
    proxy = root.sub("proxy") or _Section(file, "proxy", {})
    admin = root.sub("admin") or _Section(file, "admin", {})
    dest = root.sub("destinations")
    shared = _shared_config(root.sub("shared"))
    replica = _replica_config(root.sub("replica") or _Section(file, "replica", {}))
    drain = root.sub("drain") or _Section(file, "drain", {})
    subaccounts = []
    for section in root.subs("subaccounts"):
        clusters = section.sub("clusters") or _Section(file, section.key("clusters"), {})
        pins = {location: clusters.str(location, required=True) for location in clusters.table}
        for location, cluster in pins.items():
            if not cluster:
                raise ConfigError(file, clusters.key(location), "must name a cluster")
        subaccounts.append(
            SubaccountConfig(
                id=section.str("id", required=True),
                ca=section.path("ca", required=True),
                token_sha256=tuple(_digests(section, "token_sha256")),
                locations=tuple(section.str_list("locations", [""])),
                destination_admin_sha256=tuple(_digests(section, "destination_admin_sha256")),
                clusters=pins,
                max_streams_per_token=section.int("max_streams_per_token", minimum=0),
                users=_users(section),
                trusted_issuers=_trusted_issuers(section),

                ca_key=section.path("ca_key"),
            )
        )
        section.done()
    if not subaccounts:
        raise ConfigError(file, "subaccounts", "at least one [[subaccounts]] is required")
    ids = [s.id for s in subaccounts]
    if len(set(ids)) != len(ids):
        raise ConfigError(file, "subaccounts", "duplicate subaccount id")
    proxy_digests = {d for s in subaccounts for d in s.token_sha256}
    admin_digests = [d for s in subaccounts for d in s.destination_admin_sha256]
    if proxy_digests & set(admin_digests) or len(set(admin_digests)) != len(admin_digests):
        raise ConfigError(file, "subaccounts", "a destination_admin_sha256 digest is also a token_sha256 digest or "
                          "configured twice: each admin token is its own, or a proxy token could manage destinations")
    config = CloudConfig(
        file=file,
        tunnel_listen=tunnel.listen("listen", "127.0.0.1:8443"),
        tunnel_cert=tunnel.path("cert", required=True),
        tunnel_key=tunnel.path("key", required=True),
        ping_interval=tunnel.float("ping_interval", 1.0),
        ping_timeout=tunnel.float("ping_timeout", 3.0),
        tls_handshake_timeout=tunnel.float("tls_handshake_timeout", 5.0),
        upgrade_timeout=tunnel.float("upgrade_timeout", 5.0),
        hello_timeout=tunnel.float("hello_timeout", 5.0),
        http_listen=proxy.listen("http_listen", "127.0.0.1:20003"),
        socks5_listen=proxy.listen("socks5_listen", "127.0.0.1:20004"),
        hold_seconds=proxy.float("hold_seconds", 5.0),
        hold_max=proxy.int("hold_max", 1000, minimum=0),
        stream_wait_seconds=proxy.float("stream_wait_seconds", 5.0),
        stream_limits=StreamLimits(
            per_token=proxy.int("max_streams_per_token", 256, minimum=0),
            per_client_address=proxy.int("max_streams_per_client_address", 512, minimum=0),
            per_token_by_subaccount={
                s.id: s.max_streams_per_token for s in subaccounts if s.max_streams_per_token is not None
            },
        ),
        auth_throttle=_auth_throttle(proxy),
        connection_limits=ConnectionLimits(
            total=proxy.int("max_connections", 8192, minimum=0),
            per_client_address=proxy.int("max_connections_per_client_address", 1024, minimum=0),
        ),
        audit_log=proxy.path("audit_log", must_exist=False),
        request_head_timeout=proxy.float("request_head_timeout", 30.0),
        idle_timeout=proxy.float("idle_timeout", 120.0),
        min_request_body_rate=proxy.float("min_request_body_rate", 240.0),
        request_body_grace=proxy.float("request_body_grace", 5.0),
        response_write_timeout=proxy.float("response_write_timeout", 60.0),
        admin_listen=admin.listen("listen", "127.0.0.1:20006"),
        destinations_listen=dest.listen("listen", "127.0.0.1:20005") if dest else None,
        destinations_store=(dest.path("store", must_exist=False) or file.parent / "destinations.json") if dest else None,
        state_file=root.path("state_file", must_exist=False),
        subaccounts=tuple(subaccounts),
        destination_limits=_destination_limits(dest) if dest else DestinationLimits(),
        destination_tokens=_destination_tokens(dest, _destination_limits(dest)) if dest else TokenClientSettings(),
        replica=replica,
        shared=shared,
        drain=_drain_settings(drain),
    )
    oauth_section = root.sub("oauth")
    if oauth_section is not None:
        config = attrs.evolve(config, oauth=_oauth(oauth_section, config))
    proxy.retired("stream_idle_timeout", "every request has its own tunnel stream since tunnel protocol 2")
    for section in (tunnel, proxy, admin, drain, *( [dest] if dest else [] ), *([oauth_section] if oauth_section else [])):
        section.done()
    root.done()
    if config.ping_timeout <= config.ping_interval:
        raise ConfigError(file, "tunnel.ping_timeout", "must be longer than tunnel.ping_interval")
    for url, listen, what in ((replica.tunnel_url, config.tunnel_listen, "tunnel"),
                              (replica.admin_url, config.admin_listen, "admin")):
        if shared is not None and url is None and listen.host in _WILDCARDS:
            raise ConfigError(file, f"replica.{what}_url", f"is required when {what}.listen is a wildcard address: "
                              "nodes and operators must know where to reach this replica")
    if shared is not None and config.state_file is not None:
        raise ConfigError(file, "state_file", "with [shared] the fence lives in the cloud's etcd, which every "
                          "replica reads: remove state_file (a local copy could only be older)")
    if shared is not None and config.destinations_store is not None and shared.secrets_key is None:
        raise ConfigError(file, "shared.secrets_key", "is required with [destinations] and [shared]: the key file "
                          "(the same on every replica) that encrypts the destinations' secrets in etcd")
    if shared is not None and config.oauth is not None and shared.secrets_key is None:
        raise ConfigError(file, "shared.secrets_key", "is required with [oauth] and [shared]: the key file (the "
                          "same on every replica) that encrypts the token service's signing keys in etcd")
    return config


_WILDCARDS = ("0.0.0.0", "::", "")


def _replica_config(section: _Section) -> ReplicaConfig:

    replica = ReplicaConfig(
        id=section.str("id", socket.gethostname()),
        tunnel_url=section.str("tunnel_url"),
        admin_url=section.str("admin_url"),
        lease_ttl=section.int("lease_ttl", 10, minimum=1),
    )
    section.done()
    if not replica.id or "/" in replica.id:
        raise ConfigError(section.file, section.key("id"), f"must be a non-empty name without '/', got {replica.id!r}")
    if replica.tunnel_url is not None and not replica.tunnel_url.startswith("wss://"):
        raise ConfigError(section.file, section.key("tunnel_url"), "must start with wss:// (the tunnel is always TLS)")
    if replica.admin_url is not None and not replica.admin_url.startswith(("http://", "https://")):
        raise ConfigError(section.file, section.key("admin_url"), "must start with http:// or https://")
    return replica


def _shared_config(section: _Section | None) -> SharedConfig | None:
    if section is None:
        return None
    prefix = section.str("prefix", "/connector-cloud")
    if not prefix.startswith("/") or len(prefix) < 2 or "/" in prefix[1:] or "\x00" in prefix:
        raise ConfigError(section.file, section.key("prefix"), f"must be one path segment like /connector-cloud, got {prefix!r}")
    shared = SharedConfig(etcd=_etcd_config(section), prefix=prefix, secrets_key=section.path("secrets_key", must_exist=False))
    section.done()
    return shared


def _auth_throttle(proxy: _Section) -> AuthThrottleSettings:
    delay = proxy.float("auth_failure_delay", 1.0)
    max_delay = proxy.float("auth_failure_max_delay", 5.0)
    if max_delay < delay:
        raise ConfigError(proxy.file, proxy.key("auth_failure_max_delay"), "must be at least auth_failure_delay")
    return AuthThrottleSettings(
        failures=proxy.int("auth_failures_before_delay", 10, minimum=0),
        delay=delay,
        max_delay=max_delay,
        forget_after=proxy.float("auth_failure_memory_seconds", 60.0),
        max_addresses=proxy.int("auth_tracked_addresses", 10000, minimum=1),
    )


def _oauth(section: _Section, cloud: CloudConfig) -> OAuthConfig:
    listen = section.listen("listen", "127.0.0.1:20007")
    defaults = OAuthSettings(url="https://localhost")
    try:
        settings = OAuthSettings(
            url=section.str("url", f"https://{listen.host}:{listen.port}"),
            token_lifetime=section.float("token_lifetime", defaults.token_lifetime),
            rotate_after=section.float("rotate_after", defaults.rotate_after),
            key_overlap=section.float("key_overlap", defaults.key_overlap),
            max_body_bytes=section.int("max_body_bytes", defaults.max_body_bytes, minimum=1),
            max_connections=section.int("max_connections", defaults.max_connections, minimum=1),
            request_timeout=section.float("request_timeout", defaults.request_timeout),
            idle_timeout=section.float("idle_timeout", defaults.idle_timeout),
        )
    except ValueError as exc:
        raise ConfigError(section.file, section.prefix, str(exc)) from None
    cert, key = section.path("cert"), section.path("key")
    if (cert is None) != (key is None):
        raise ConfigError(section.file, section.key("cert"), "cert and key go together (or neither: the tunnel's)")
    return OAuthConfig(
        listen=listen,
        cert=cert or cloud.tunnel_cert,
        key=key or cloud.tunnel_key,
        bindings=section.path("bindings", must_exist=False) or section.file.parent / "bindings.json",
        signing_keys=section.path("signing_keys", must_exist=False) or section.file.parent / "signing-keys.json",
        proxy_host=section.str("proxy_host", cloud.http_listen.host),
        settings=settings,
    )


# --- node side --------------------------------------------------------------------------------

@attrs.frozen
class EtcdConfig:
    endpoints: tuple[str, ...]
    ca: Path | None
    cert: Path | None
    key: Path | None
    user: str | None
    password: str | None = attrs.field(repr=False)  # never in a log line or a traceback
    timeout: float = 1.0


@attrs.frozen
class ClusterConfig:
    name: str
    etcd: EtcdConfig
    timing: HATiming
    secrets_key: Path | None  # cluster key encrypting /<cluster>/secrets/


@attrs.frozen
class NodeConfig:
    file: Path
    node_id: str
    subaccount: str
    location_id: str
    priority: int
    tunnel_urls: tuple[str, ...]  # every cloud replica (or a name resolving to them): see tunnel.dial
    tunnel_ca: Path | None
    tunnel_cert: Path
    tunnel_key: Path
    ping_interval: float
    ping_timeout: float
    tunnel_connect_timeout: float  # TLS + WebSocket + tunnel handshake, as one deadline
    admin_listen: Listen
    admin_advertise_url: str | None  # how other nodes reach our admin API (probes, switch)
    admin_token_file: Path | None  # where the CLI finds the token too
    admin_token: str | None = attrs.field(repr=False)  # guards /status, /switch, /audit; None: refused
    admin_allowed_hosts: tuple[str, ...]  # Host names accepted on guarded routes besides our own
    audit_log: Path | None
    connect_timeout: float
    response_timeout: float
    drain_seconds: float
    mappings: tuple[Mapping, ...]
    cluster: ClusterConfig | None
    # [forward] bounds on what a slow or absent application holds (connector.agent.forward)
    request_head_timeout: float = 30.0
    min_request_body_rate: float = 240.0
    request_body_grace: float = 5.0
    response_write_timeout: float = 60.0
    pool_max_idle: int = 32  # idle kept-alive connections to internal hosts, per mapping
    pool_idle_seconds: float = 30.0  # an idle one older than this is closed
    # [tunnel] proxy, else https_proxy/no_proxy of the environment (connector.tunnel.egress)
    egress: EgressPolicy = EgressPolicy()
    # [principal_propagation]: how mappings log users on (connector.agent.principal); None: absent
    principal_propagation: PrincipalSettings | None = None

    # [tunnel] renew_at: the fraction of its validity after which the node asks the cloud to renew
    # its certificate (connector.agent.renew); 0: never (renewed by an operator)
    tunnel_renew_at: float = 0.67

    @property
    def tunnel_url(self) -> str:
        """The first configured tunnel URL (messages and tools that name one cloud address)."""
        return self.tunnel_urls[0]


def _owner_only(path: Path) -> bool:
    return path.stat().st_mode & 0o077 == 0


def _read_private_file(section: _Section, name: str, path: Path) -> str:
    """The stripped text of a secret file, which must be private to its owner (mode 0600)."""
    key = section.key(name)
    try:  # one open: the mode checked is the mode of the file read
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise ConfigError(section.file, key, f"{path} is readable by others (mode "
                                  f"{mode & 0o777:o}): chmod 600 it")
            text = f.read().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(section.file, key, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(section.file, key, f"{path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(section.file, key, f"{path} is empty")
    return text


def _admin_token(admin: _Section) -> str | None:
    """[admin] token_file: the bearer token guarding the node's sensitive admin routes (0600)."""
    path = admin.path("token_file")
    if path is None:
        return None
    token = _read_private_file(admin, "token_file", path)
    if len(token) < MIN_ADMIN_TOKEN:
        raise ConfigError(admin.file, admin.key("token_file"),
                          f"{path} holds a token of {len(token)} characters; use at least {MIN_ADMIN_TOKEN}")
    return token


def _etcd_password(cluster: _Section) -> str | None:
    """[cluster] etcd_password_file (preferred) or etcd_password; either file must be private to
    its owner (mode 0600, like a private key), or the node refuses to start."""
    inline = cluster.str("etcd_password")
    password_file = cluster.path("etcd_password_file")
    if inline is not None and password_file is not None:
        raise ConfigError(cluster.file, cluster.key("etcd_password"), "give etcd_password or etcd_password_file, not both")
    if password_file is not None:
        return _read_private_file(cluster, "etcd_password_file", password_file)
    if inline is not None and not _owner_only(cluster.file):
        raise ConfigError(cluster.file, cluster.key("etcd_password"),
                          f"this file holds a password but is readable by others (mode "
                          f"{cluster.file.stat().st_mode & 0o777:o}): chmod 600 it, or use etcd_password_file")
    return inline


def _tunnel_urls(tunnel: _Section) -> tuple[str, ...]:
    """[tunnel] url: one wss:// URL or a non-empty list of them (the cloud's replicas)."""
    value = tunnel._get("url", (str, list), None, True)
    urls = [value] if isinstance(value, str) else value
    if not urls:
        raise ConfigError(tunnel.file, tunnel.key("url"), "needs at least one URL")
    for i, url in enumerate(urls):
        key = tunnel.key("url") if isinstance(value, str) else f"{tunnel.key('url')}[{i}]"
        if not isinstance(url, str):
            raise ConfigError(tunnel.file, key, "must be a string")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "wss" or not parsed.hostname:
            raise ConfigError(tunnel.file, key, f"must be wss://HOST[:PORT]/tunnel (the tunnel is always TLS), "
                              f"got {url!r}")
        try:
            parsed.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            raise ConfigError(tunnel.file, key, f"has an invalid port: {url!r}") from None
    if len(set(urls)) != len(urls):
        raise ConfigError(tunnel.file, tunnel.key("url"), "lists a URL twice")
    return tuple(urls)


def _etcd_config(section: _Section) -> EtcdConfig:
    """The etcd client keys (etcd, etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password[_file],
    etcd_timeout) of the node's [cluster] or the cloud's [shared], validated the same way."""
    name = section.prefix
    etcd = EtcdConfig(
        endpoints=tuple(section.str_list("etcd", ["http://127.0.0.1:2379"])),
        ca=section.path("etcd_ca"),
        cert=section.path("etcd_cert"),
        key=section.path("etcd_key"),
        user=section.str("etcd_user"),
        password=_etcd_password(section),
        timeout=section.float("etcd_timeout", 1.0),
    )
    if not etcd.endpoints:
        raise ConfigError(section.file, f"{name}.etcd", "needs at least one endpoint")
    if (etcd.user is None) != (etcd.password is None):
        raise ConfigError(section.file, f"{name}.etcd_user", "etcd_user and a password go together (or neither)")
    if etcd.user is not None and not all(
            e.startswith("https://") or ("://" not in e and etcd.ca) for e in etcd.endpoints):
        raise ConfigError(section.file, f"{name}.etcd_user", "password authentication needs https:// etcd "
                          "endpoints (and etcd_ca): a password never crosses the network in clear text")
    return etcd


def etcd_settings(etcd: EtcdConfig) -> Any:
    """The `ha.etcd.EtcdSettings` of an [cluster] or [shared] etcd (imported late: grpc is heavy)."""
    from ha.etcd import EtcdSettings

    return EtcdSettings(
        endpoints=tuple(etcd.endpoints),
        ca_file=str(etcd.ca) if etcd.ca else None,
        cert_file=str(etcd.cert) if etcd.cert else None,
        key_file=str(etcd.key) if etcd.key else None,
        user=etcd.user,
        password=etcd.password,
        timeout=etcd.timeout,
    )


def check_node_certificate(config: NodeConfig) -> list[str]:
    """Compare the node's configuration with what its tunnel certificate says (the cloud trusts only
    the certificate). A different subaccount (O=) or cluster (OU=) is a ConfigError naming file, key
    and both values; a different node id (CN=) only a warning, returned: the cloud uses the CN."""
    from connector import pki

    try:
        cert = pki.load_certificate(config.tunnel_cert)
        subaccount = pki.subaccount_of(cert)
        cluster = pki.cluster_of(cert)
    except pki.CertificateError as exc:
        raise ConfigError(config.file, "tunnel.cert", str(exc)) from None
    if subaccount != config.subaccount:
        raise ConfigError(config.file, "node.subaccount",
                          f"is {config.subaccount!r} but the certificate {config.tunnel_cert} is for subaccount "
                          f"{subaccount!r} (O=): the cloud would serve this node as {subaccount!r}")
    configured_cluster = config.cluster.name if config.cluster else None
    if cluster is not None and cluster != configured_cluster:
        raise ConfigError(config.file, "cluster.name",
                          f"is {configured_cluster!r} but the certificate {config.tunnel_cert} binds this node to "
                          f"cluster {cluster!r} (OU=)")
    node = pki.common_name_of(cert)
    if node != config.node_id:
        return [f"{config.file}: node.id is {config.node_id!r} but the certificate {config.tunnel_cert} names "
                f"node {node!r} (CN=): the cloud knows this node as {node!r}"]
    return []


def _egress(tunnel: _Section, environ: Environment) -> EgressPolicy:
    """[tunnel] proxy (a URL, or "none"/"" for direct), else the environment's https_proxy and no_proxy."""
    key = tunnel.str("proxy")
    try:
        return egress_policy(key, environ)
    except ValueError as exc:
        if key is None:  # the message names the environment variable
            raise ConfigError(tunnel.file, "tunnel.proxy", f"is not set, and {exc}") from None
        raise ConfigError(tunnel.file, tunnel.key("proxy"), str(exc)) from None


def _principal_propagation(root: _Section, mappings: list[Mapping]) -> PrincipalSettings | None:
    """[principal_propagation]: the CA (certificate mode; its key must be 0600), the subject and
    header templates; required when a mapping propagates principals ("certificate" or "header")."""
    section = root.sub("principal_propagation")
    modes = {m.principal_propagation for m in mappings} - {"none"}
    if section is None:
        if modes:
            raise ConfigError(root.file, "principal_propagation",
                              f"section is required: a mapping sets principal_propagation = {sorted(modes)[0]!r}")
        return None
    defaults = PrincipalSettings()
    required = "certificate" in modes
    ca_cert = section.path("ca_cert", required=required)
    ca_key = section.path("ca_key", required=required)
    try:
        settings = PrincipalSettings(
            ca_cert=ca_cert, ca_key=ca_key, subject=section.str("subject", defaults.subject),
            validity_minutes=section.float("validity_minutes", defaults.validity_minutes),
            header_name=section.str("header_name", defaults.header_name),
            header_value=section.str("header_value", defaults.header_value),
        )
    except ValueError as exc:
        key, _, message = str(exc).partition(": ")
        raise ConfigError(root.file, section.key(key) if message else "principal_propagation",
                          message or str(exc)) from None
    try:
        settings.load_ca()
    except (pki.CertificateError, OSError) as exc:
        raise ConfigError(root.file, section.key("ca_key"), str(exc)) from None
    section.done()
    return settings


def load_node_config(path: str | Path, environ: Environment | None = None) -> NodeConfig:
    """The node's configuration; `environ` (default os.environ) gives https_proxy and no_proxy."""
    file = Path(path).resolve()
    root = _Section(file, "", _read(file))
    node = root.sub("node", required=True)
    tunnel = root.sub("tunnel", required=True)
    admin = root.sub("admin") or _Section(file, "admin", {})
    forward = root.sub("forward") or _Section(file, "forward", {})
    mappings = []
    for section in root.subs("mappings"):
        try:
            mappings.append(Mapping.from_dict(section.table))
        except (ValueError, TypeError) as exc:
            raise ConfigError(file, section.prefix, str(exc)) from None
    try:
        check_no_overlap(mappings)
    except ValueError as exc:
        raise ConfigError(file, "mappings", "two mappings share a virtual host:port: "
                          + str(exc).removeprefix("virtual_port: ")) from None
    urls = _tunnel_urls(tunnel)
    cluster = None
    cluster_section = root.sub("cluster")
    if cluster_section is not None:
        etcd = _etcd_config(cluster_section)
        timing_keys = {"ttl", "loop_wait", "retry_timeout", "probe_interval", "probe_failures",
                       "priority_step", "keep_serving_without_store"}
        raw_timing = {k: v for k, v in cluster_section.table.items() if k in timing_keys}
        cluster_section.seen.update(timing_keys)
        try:
            timing = HATiming.from_dict(raw_timing)
        except (ValueError, TypeError) as exc:
            raise ConfigError(file, "cluster", str(exc)) from None
        cluster = ClusterConfig(
            name=cluster_section.str("name", required=True),
            etcd=etcd,
            timing=timing,
            secrets_key=cluster_section.path("secrets_key", must_exist=False),
        )
        cluster_section.done()
    for i, mapping in enumerate(mappings):
        if mapping.client_identity is not None and (cluster is None or cluster.secrets_key is None):
            raise ConfigError(file, f"mappings[{i}].client_identity", "names a cluster secret: the node needs "
                              "[cluster] secrets_key (the key the secrets are encrypted with)")
    config = NodeConfig(
        file=file,
        node_id=node.str("id", required=True),
        subaccount=node.str("subaccount", required=True),
        location_id=node.str("location_id", ""),
        priority=node.int("priority", 100, minimum=0),
        audit_log=node.path("audit_log", must_exist=False),
        tunnel_urls=urls,
        tunnel_ca=tunnel.path("ca"),
        tunnel_cert=tunnel.path("cert", required=True),
        tunnel_key=tunnel.path("key", required=True),
        ping_interval=tunnel.float("ping_interval", 1.0),
        ping_timeout=tunnel.float("ping_timeout", 3.0),
        tunnel_connect_timeout=tunnel.float("connect_timeout", 5.0),
        tunnel_renew_at=_fraction(tunnel, "renew_at", 0.67),
        admin_listen=admin.listen("listen", "127.0.0.1:0"),
        admin_advertise_url=admin.str("advertise_url"),
        admin_token_file=admin.path("token_file"),
        admin_token=_admin_token(admin),
        admin_allowed_hosts=tuple(h.lower() for h in admin.str_list("allowed_hosts")),
        connect_timeout=forward.float("connect_timeout", 5.0),
        response_timeout=forward.float("response_timeout", 30.0),
        drain_seconds=forward.float("drain_seconds", 10.0),
        mappings=tuple(mappings),
        cluster=cluster,
        request_head_timeout=forward.float("request_head_timeout", 30.0),
        min_request_body_rate=forward.float("min_request_body_rate", 240.0),
        request_body_grace=forward.float("request_body_grace", 5.0),
        response_write_timeout=forward.float("response_write_timeout", 60.0),
        pool_max_idle=forward.int("pool_max_idle", 32, minimum=0),
        pool_idle_seconds=forward.float("pool_idle_seconds", 30.0),
        egress=_egress(tunnel, os.environ if environ is None else environ),
        principal_propagation=_principal_propagation(root, mappings),
    )
    forward.retired("keepalive_timeout", "every request has its own tunnel stream since tunnel protocol 2; "
                                         "idle internal-host connections follow pool_idle_seconds")
    for section in (node, tunnel, admin, forward):
        section.done()
    root.done()
    advertise = config.admin_advertise_url
    if advertise is not None and not (advertise.startswith("http://") and advertise.rpartition(":")[2].isdigit()):
        raise ConfigError(file, "admin.advertise_url", f"must look like http://HOST:PORT, got {advertise!r}")
    if config.cluster is not None and advertise is None and config.admin_listen.host in ("0.0.0.0", "::", ""):
        raise ConfigError(file, "admin.advertise_url", "is required when admin.listen is a wildcard address: "
                          "shadows must know where to probe this node")
    if config.ping_timeout <= config.ping_interval:
        raise ConfigError(file, "tunnel.ping_timeout", "must be longer than tunnel.ping_interval")
    return config


def _fraction(section: _Section, name: str, default: float) -> float:
    value = float(section.float(name, default, positive=False))
    if not 0 <= value < 1:
        raise ConfigError(section.file, section.key(name), f"must be at least 0 (off) and below 1, got {value}")
    return value


# --- files start-up will open ----------------------------------------------------------------

def check_cloud_files(config: CloudConfig) -> None:
    """Open what `connector cloud` opens at start (certificates, keys, trust stores, the state and
    destination store directories), so `--check` and start-up fail with ConfigError naming the
    file and key instead of a process that starts and then exits."""
    file = config.file
    _key_pair(file, "tunnel.cert", "tunnel.key", config.tunnel_cert, config.tunnel_key)
    for i, subaccount in enumerate(config.subaccounts):
        _trust_store(file, f"subaccounts[{i}].ca", subaccount.ca)
        if subaccount.ca_key is not None:
            _key_pair(file, f"subaccounts[{i}].ca", f"subaccounts[{i}].ca_key", subaccount.ca, subaccount.ca_key)
    if config.oauth is not None:
        _key_pair(file, "oauth.cert", "oauth.key", config.oauth.cert, config.oauth.key)
        _writable_directory(file, "oauth.signing_keys", config.oauth.signing_keys)
    if config.state_file is not None:
        _writable_directory(file, "state_file", config.state_file)
    if config.destinations_store is not None and config.shared is None:
        _writable_directory(file, "destinations.store", config.destinations_store)
    if config.shared is not None:
        _etcd_files(file, "shared", config.shared.etcd)
        key = config.shared.secrets_key
        if key is not None and not key.exists():
            _writable_directory(file, "shared.secrets_key", key)


def check_node_files(config: NodeConfig) -> None:
    """`check_cloud_files` for `connector node`: tunnel and etcd TLS material, the trust stores of
    the configured mappings, the audit log's directory."""
    file = config.file
    if config.tunnel_ca is not None:
        _trust_store(file, "tunnel.ca", config.tunnel_ca)
    _key_pair(file, "tunnel.cert", "tunnel.key", config.tunnel_cert, config.tunnel_key)
    if config.audit_log is not None:
        _writable_directory(file, "node.audit_log", config.audit_log)
    if config.cluster is not None:
        _etcd_files(file, "cluster", config.cluster.etcd)
    for i, mapping in enumerate(config.mappings):
        if mapping.trust_store is not None:
            _trust_store(file, f"mappings[{i}].trust_store", Path(mapping.trust_store))
        if mapping.client_cert is not None and mapping.client_key is not None:
            try:  # private to its owner, as the node checks it each time it reads it
                read_private_key(mapping.client_key)
            except IdentityError as exc:
                raise ConfigError(file, f"mappings[{i}].client_key", str(exc)) from None
            _key_pair(file, f"mappings[{i}].client_cert", f"mappings[{i}].client_key",
                      Path(mapping.client_cert), Path(mapping.client_key))


def _etcd_files(file: Path, section: str, etcd: EtcdConfig) -> None:
    if etcd.ca is not None:
        _trust_store(file, f"{section}.etcd_ca", etcd.ca)
    if (etcd.cert is None) != (etcd.key is None):
        raise ConfigError(file, f"{section}.etcd_cert", "etcd_cert and etcd_key go together (or neither)")
    if etcd.cert is not None and etcd.key is not None:
        _key_pair(file, f"{section}.etcd_cert", f"{section}.etcd_key", etcd.cert, etcd.key)


def _key_pair(file: Path, cert_key: str, key_key: str, cert: Path, key: Path) -> None:
    try:
        pki.load_certificate(cert)
    except pki.CertificateError as exc:
        raise ConfigError(file, cert_key, str(exc)) from None
    try:
        pki.check_key_pair(cert, key)
    except pki.CertificateError as exc:
        raise ConfigError(file, key_key, str(exc)) from None


def _trust_store(file: Path, key: str, path: Path) -> None:
    try:
        pki.check_trust_store(path)
    except pki.CertificateError as exc:
        raise ConfigError(file, key, str(exc)) from None


def _writable_directory(file: Path, key: str, path: Path) -> None:
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(file, key, f"directory {directory} does not exist: create it, writable by the "
                          "user the service runs as")
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(file, key, f"{path} is not writable by this user (uid {os.getuid()})")
