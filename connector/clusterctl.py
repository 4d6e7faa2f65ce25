"""Operator commands against a running cluster: status, switch, acl, secret.

They find the cluster from a node's configuration (`--config node.toml`), or, with no argument,
from the running `connector demo` (its pointer file names the state file and the node configs).
They talk to etcd through the same `Store` the nodes use, and to nodes through their admin API,
with the admin token of the node configuration's `[admin] token_file` (one token per cluster: every
node of a cluster reads the same file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography.fernet import Fernet, InvalidToken

from connector import pki
from connector.admin import http_request
from connector.agent.acl import Mapping, overlap
from connector.agent.identity import ClusterSecrets, IdentityError, read_private_key
from connector.agent.origin import BackendError, open_backend
from connector.agent.runtime import open_store
from connector.agent.sharedconfig import (
    HISTORY_PREFIX,
    MAPPINGS_PREFIX,
    decode_mappings,
    mapping_key,
    record_history,
)
from connector.config import ConfigError, NodeConfig, load_node_config
from ha.store import SECRETS_PREFIX, Store, StoreError

ADMIN_TIMEOUT = 1.0
CHECK_CONCURRENCY = 16  # ports of a range that `acl add --check` connects to at once


class UsageError(Exception):
    pass


@attrs.frozen
class Target:
    """The cluster a command acts on, and how it was chosen (printed, so nobody guesses)."""

    config: NodeConfig
    via: str  # "--config", or which running demo

    def describe(self) -> str:
        cluster = self.config.cluster.name if self.config.cluster else "(standalone)"
        return f"cluster {cluster} (config {self.config.file}, {self.via})"


def find_target(config: str | None) -> Target:
    """`--config`, else the running demo the pointer names (see `connector.demo.claim_pointer`:
    the pointer stays with the first demo while it runs, and a later one says so)."""
    if config:
        return Target(load_node_config(config), "from --config")
    from connector.demo import pointer_file, read_pointer

    pointer = pointer_file()
    state = read_pointer(pointer)
    if state is None:
        stale = " (the demo that wrote it is gone)" if pointer.exists() else ""
        raise UsageError(f"no --config given and no running `connector demo` recorded in {pointer}{stale} "
                         "(a demo started while another ran prints its --config in its banner)")
    first = next(iter(state["nodes"].values()))
    return Target(load_node_config(first["config"]),
                  f"the demo of pid {state['pid']} in {state['workdir']}; --config picks another")


def find_config(config: str | None) -> NodeConfig:
    return find_target(config).config


def _cluster_store(config: NodeConfig) -> Store:
    store = open_store(config)
    if store is None:
        raise UsageError(f"{config.file} has no [cluster] section: this node runs standalone")
    return store


def _run(fn: Any, config: NodeConfig | Target, *args: Any) -> int:
    file = config.config.file if isinstance(config, Target) else config.file
    try:
        return int(trio.run(fn, config, *args))
    except UsageError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"connector: {exc} (etcd endpoints from {file})", file=sys.stderr)
        return 3


# --- status ------------------------------------------------------------------------------------

async def _node_status(admin_url: str | None, token: str | None) -> tuple[dict[str, Any] | None, int | None]:
    """A node's /status, and the HTTP status it answered with (None: no answer)."""
    if not admin_url:
        return None, None
    host, _, port = admin_url.removeprefix("http://").partition(":")
    try:
        status, body = await http_request(host, int(port), "/status", timeout=ADMIN_TIMEOUT, token=token)
        return (json.loads(body) if status == 200 else None), status
    except (OSError, trio.TooSlowError, ValueError):
        return None, None


async def collect_status(config: NodeConfig) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    store = _cluster_store(config)
    try:
        snapshot = await store.get_cluster()
    finally:
        await store.aclose()
    leader = snapshot.leader
    rows = []
    for name, member in sorted(snapshot.members.items()):
        live, answered = await _node_status(member.data.get("admin_url"), config.admin_token)
        is_leader = leader is not None and leader.node == name
        rows.append({
            "node": name,
            "role": "master" if is_leader else str(member.data.get("role", "?")),
            "epoch": leader.epoch if leader is not None and is_leader else None,
            "priority": member.priority,
            "health": member.data.get("health", "ok"),
            "pid": member.data.get("pid"),
            "tunnel": live["tunnel"] if live else "unknown",
            "tunnels": live.get("tunnels", []) if live else [],  # one per cloud replica
            "cloud_refusal": live.get("cloud_refusal") if live else None,
            "admin_answered": answered,
            "admin_url": member.data.get("admin_url"),
            "last_seen": "now" if live else f"member key revision {member.mod_revision}",
        })
    leader_info = {"node": leader.node, "epoch": leader.epoch} if leader else None
    return rows, leader_info


async def _status(target: Target, as_json: bool) -> int:
    config = target.config
    if not as_json:
        print(target.describe(), flush=True)  # first: an etcd error below then names its cluster too
    rows, leader = await collect_status(config)
    cluster = config.cluster.name if config.cluster else "?"
    refused = next((r["cloud_refusal"] for r in rows if leader and r["node"] == leader["node"] and r["cloud_refusal"]),
                   None)
    if as_json:
        for row in rows:
            print(json.dumps({**row, "cluster": cluster, "config": str(config.file)}, sort_keys=True))
    else:
        print(f"location {config.location_id!r}: "
              + (f"master {leader['node']} (epoch {leader['epoch']})" if leader else "NO MASTER")
              + (", REFUSED BY THE CLOUD" if refused else ""))
        print(f"{'NODE':<12} {'ROLE':<8} {'EPOCH':>6} {'HEALTH':<8} {'TUNNEL':<11} {'PID':>7}  LAST SEEN")
        for row in rows:
            print(f"{row['node']:<12} {row['role']:<8} {str(row['epoch'] or '-'):>6} {row['health']:<8} "
                  f"{row['tunnel']:<11} {str(row['pid']):>7}  {row['last_seen']}")
        for row in rows:
            if len(row["tunnels"]) > 1 or any(t["state"] != row["tunnel"] for t in row["tunnels"]):
                print(f"{row['node']} tunnels: " + ", ".join(f"{t['replica']} {t['state']}" for t in row["tunnels"]))
        for row in rows:
            if row["cloud_refusal"]:
                print(f"{row['node']}: the cloud refuses this node: {row['cloud_refusal']}")
    for row in rows:
        if row["admin_answered"] in (401, 403):
            print(f"connector: {row['node']} refused our /status ({row['admin_answered']}): is [admin] token_file "
                  f"of {config.file} the cluster's admin token?", file=sys.stderr)
    return 0 if leader and not refused else 1


def status(config: str | None, as_json: bool) -> int:
    try:
        target = find_target(config)
    except (UsageError, ConfigError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    return _run(_status, target, as_json)


# --- switch ------------------------------------------------------------------------------------

async def _switch(target: Target) -> int:
    config = target.config
    print(target.describe(), flush=True)
    if config.admin_token is None:
        raise UsageError(f"{config.file}: [admin] token_file is not set: the nodes' /switch needs the admin token")
    rows, leader = await collect_status(config)
    if leader is None:
        print("connector: the cluster has no master to hand over from", file=sys.stderr)
        return 1
    url = next((r["admin_url"] for r in rows if r["node"] == leader["node"]), None)
    if not url:
        raise UsageError(f"master {leader['node']} does not publish an admin URL")
    host, _, port = url.removeprefix("http://").partition(":")
    status_code, body = await http_request(host, int(port), "/switch", method="POST", timeout=10.0,
                                           token=config.admin_token)
    if status_code != 200:
        print(f"connector: switch refused by {leader['node']}: {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    with trio.move_on_after(10.0):
        while True:
            _, new = await collect_status(config)
            if new is not None and new["node"] != leader["node"]:
                print(f"switched: {leader['node']} (epoch {leader['epoch']}) -> {new['node']} (epoch {new['epoch']})")
                return 0
            await trio.sleep(0.1)
    print("connector: the old master resigned but no new master appeared within 10 s", file=sys.stderr)
    return 1


def switch(config: str | None) -> int:
    try:
        target = find_target(config)
    except (UsageError, ConfigError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    return _run(_switch, target)


# --- acl ---------------------------------------------------------------------------------------

def mapping_from_args(args: argparse.Namespace) -> Mapping:
    virtual_host, _, virtual_port = args.virtual.rpartition(":")
    internal_host, _, internal_port = args.internal.rpartition(":")
    resources = []
    for spec in args.path:
        websocket = spec.endswith("+ws")
        spec = spec.removesuffix("+ws")
        exact = spec.endswith("=")
        resources.append({"path": spec.removesuffix("="), "prefix": not exact, "websocket_upgrade": websocket})
    raw: dict[str, Any] = {
        "virtual_host": virtual_host,
        "virtual_port": int(virtual_port) if virtual_port.isdigit() else virtual_port,
        "internal_host": internal_host,
        "internal_port": int(internal_port) if internal_port.isdigit() else internal_port,
        "protocol": args.protocol,
        "host_in_header": args.host_in_header,
        "resources": resources,
        "principal_propagation": getattr(args, "principal_propagation", "none"),
    }
    if args.trust_store:
        # used as written on every node: a relative path would mean whatever each node's cwd is
        if not os.path.isabs(args.trust_store):
            raise ValueError(f"--trust-store {args.trust_store}: give an absolute path (nodes use it as written)")
        try:
            pki.check_trust_store(Path(args.trust_store))
        except pki.CertificateError as exc:
            raise ValueError(f"--trust-store: {exc}") from None
        raw["trust_store"] = args.trust_store
    raw.update(client_identity_from_args(args))
    return Mapping.from_dict(raw)  # validates; ValueError names the key


def client_identity_from_args(args: argparse.Namespace) -> dict[str, str]:
    """--client-cert/--client-key (absolute, checked here: a key pair, the key 0600) or
    --client-identity secret:NAME, as mapping keys."""
    cert, key = getattr(args, "client_cert", None), getattr(args, "client_key", None)
    raw = {"client_identity": args.client_identity} if getattr(args, "client_identity", None) else {}
    if cert is None and key is None:
        return raw
    if cert is None or key is None:
        raise ValueError("--client-cert and --client-key go together")
    for flag, path in (("--client-cert", cert), ("--client-key", key)):
        if not os.path.isabs(path):
            raise ValueError(f"{flag} {path}: give an absolute path (nodes use it as written)")
    try:
        read_private_key(key)
        pki.check_key_pair(Path(cert), Path(key))
    except (IdentityError, pki.CertificateError) as exc:
        raise ValueError(f"--client-key: {exc}") from None
    return raw | {"client_cert": cert, "client_key": key}


async def check_internal_host(mapping: Mapping, connect_timeout: float,
                              secrets: ClusterSecrets | None = None) -> str | None:
    """None if the internal host answers on each of `mapping`'s internal ports within
    `connect_timeout` as the node would reach it (`open_backend`: a TCP connect, and for HTTPS /
    TCP-TLS the TLS handshake verified with the mapping's trust store); else one line naming
    the lowest host:port that failed and why. The check runs from where it is called."""
    failures: dict[int, str] = {}
    limiter = trio.CapacityLimiter(CHECK_CONCURRENCY)

    async def check(port: int) -> None:
        one = mapping.for_port(port)
        async with limiter:
            try:
                stream = await open_backend(one, connect_timeout, secrets)
            except BackendError as exc:
                where = f"{one.internal_host}:{one.internal_port}"
                message = _with_socket_errors(exc)
                failures[port] = message if where in message else f"{where}: {message}"
                return
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for port in mapping.virtual_ports:
            nursery.start_soon(check, port)
    if not failures:
        return None
    more = f" (and {len(failures) - 1} more ports of the range)" if len(failures) > 1 else ""
    return failures[min(failures)] + more


def _with_socket_errors(error: BackendError) -> str:
    """`error`'s message, plus the socket errors behind trio's "all attempts to connect to ...
    failed" (its cause, an exception group), which open_backend's message does not repeat."""
    attempts = error.__context__.__cause__ if error.__context__ is not None else None
    if isinstance(attempts, BaseExceptionGroup):
        causes = sorted({e.strerror or str(e) for e in attempts.exceptions if isinstance(e, OSError)})
        if causes:
            return f"{error.message} ({', '.join(causes)})"
    return error.message


async def _acl(config: NodeConfig, args: argparse.Namespace) -> int:
    if args.acl_command == "add" and args.check:
        mapping = mapping_from_args(args)
        secrets = None
        if mapping.client_identity is not None:  # present it as the nodes will: read it from etcd
            secrets = ClusterSecrets(_cluster_store(config), cluster_fernet(config, create=False))
            try:
                await secrets.load()
            finally:
                await secrets.store.aclose()
        failure = await check_internal_host(mapping, config.connect_timeout, secrets)
        if failure is not None:
            print(f"connector: --check failed, nothing stored: {failure}", file=sys.stderr)
            return 2
    store = _cluster_store(config)
    try:
        if args.acl_command == "list":
            snapshot = await store.get_prefix(MAPPINGS_PREFIX)
            entries = []
            for key, kv in sorted(snapshot.kvs.items()):
                entries.append({"key": key, "revision": kv.mod_revision, "mapping": kv.json()})
            if getattr(args, "json", False):
                print(json.dumps({"revision": snapshot.revision, "mappings": entries}, indent=2))
            else:
                for entry in entries:
                    m = entry["mapping"]
                    paths = ", ".join(
                        r["path"] + ("*" if r.get("prefix", True) else "") + (" (ws)" if r.get("websocket_upgrade") else "")
                        for r in m.get("resources", [])
                    ) or "-"
                    print(f"{m['virtual_host']}:{m['virtual_port']} -> {m['internal_host']}:{m['internal_port']} "
                          f"{m['protocol']} rev {entry['revision']}  {paths}")
            return 0
        if args.acl_command == "add":
            mapping = mapping_from_args(args)
            key = mapping_key(mapping)
            stored, _ = decode_mappings((await store.get_prefix(MAPPINGS_PREFIX)).kvs.values())
            holder = overlap(mapping, (m for m in stored if mapping_key(m) != key))
            if holder is not None:  # nodes would skip one of the two (sharedconfig.decode_mappings)
                print(f"connector: invalid mapping: virtual_port: {mapping.name} overlaps the mapping "
                      f"{holder.name}; remove that first. Nothing stored", file=sys.stderr)
                return 2
            revision = await store.put(key, json.dumps(mapping.to_dict()), prev_revision=args.expect_revision)
            if revision is None:
                print(f"connector: {key} is not at revision {args.expect_revision}; nothing written", file=sys.stderr)
                return 1
            await record_history(store, "add", key, revision, mapping.to_dict())
            print(f"added {mapping.name} at revision {revision}")
            return 0
        if args.acl_command == "remove":
            key = MAPPINGS_PREFIX + args.virtual.lower()
            current = await store.get(key)
            if current is None or not await store.delete(key, prev_revision=current.mod_revision):
                print(f"connector: no mapping {args.virtual}", file=sys.stderr)
                return 1
            await record_history(store, "remove", key, current.mod_revision, current.json())
            print(f"removed {args.virtual}")
            return 0
        if args.acl_command == "history":
            snapshot = await store.get_prefix(HISTORY_PREFIX)
            for _, kv in sorted(snapshot.kvs.items()):
                print(format_history(kv.json()) if not getattr(args, "json", False) else kv.value.decode())
            return 0
        raise UsageError(f"unknown acl action {args.acl_command}")
    finally:
        await store.aclose()


def format_history(entry: dict[str, Any]) -> str:
    """One line of `acl history`: UTC time, user, action, key, revision (JSON with --json)."""
    when = entry.get("time")
    stamp = (datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
             if isinstance(when, (int, float)) else "?")
    return (f"{stamp}  {entry.get('user', '?'):<12} {entry.get('action', '?'):<10} "
            f"{str(entry.get('key', '')).rsplit('/', 1)[-1]}  rev {entry.get('revision')}")


def acl(args: argparse.Namespace) -> int:
    try:
        node_config = find_config(args.config)
        if args.acl_command == "add":
            mapping_from_args(args)  # validate before touching etcd
    except (UsageError, ConfigError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"connector: invalid mapping: {exc}", file=sys.stderr)
        return 2
    return _run(_acl, node_config, args)


# --- secrets -----------------------------------------------------------------------------------

def cluster_fernet(config: NodeConfig, *, create: bool) -> Fernet:
    """The cluster key encrypting secrets at rest in etcd (a Fernet key file, mode 0600)."""
    if config.cluster is None or config.cluster.secrets_key is None:
        raise UsageError(f"{config.file}: [cluster] secrets_key is not set")
    path = config.cluster.secrets_key
    if not path.exists():
        if not create:
            raise UsageError(f"cluster key {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    if path.stat().st_mode & 0o077:
        raise UsageError(f"cluster key {path} is readable by group or others; chmod 600 it")
    return Fernet(path.read_bytes().strip())


async def _secret(config: NodeConfig, args: argparse.Namespace, value: bytes | None) -> int:
    store = _cluster_store(config)
    try:
        if args.secret_command == "set":
            fernet = cluster_fernet(config, create=True)
            revision = await store.put(SECRETS_PREFIX + args.name, fernet.encrypt(value or b""))
            await record_history(store, "secret-set", SECRETS_PREFIX + args.name, revision, None)
            print(f"stored secret {args.name} (encrypted) at revision {revision}")
        elif args.secret_command == "get":
            fernet = cluster_fernet(config, create=False)
            kv = await store.get(SECRETS_PREFIX + args.name)
            if kv is None:
                print(f"connector: no secret {args.name}", file=sys.stderr)
                return 1
            try:
                sys.stdout.buffer.write(fernet.decrypt(kv.value))
            except InvalidToken:
                print("connector: the secret does not decrypt with this cluster key", file=sys.stderr)
                return 1
        else:
            snapshot = await store.get_prefix(SECRETS_PREFIX)
            for key in sorted(snapshot.kvs):
                print(key.removeprefix(SECRETS_PREFIX))
        return 0
    finally:
        await store.aclose()


def secret(args: argparse.Namespace) -> int:
    try:
        node_config = find_config(args.config)
    except (UsageError, ConfigError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    value = sys.stdin.buffer.read() if args.secret_command == "set" else None
    return _run(_secret, node_config, args, value)
