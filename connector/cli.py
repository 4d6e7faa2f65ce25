"""The `connector` command: certs, token, binding, cloud, node, demo, status, acl, secret, switch,
backup, restore, and the cloud's shared state (cloud-token, cloud-subaccount, cloud-revoke, cloud-keys)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import string
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import connector

log = logging.getLogger("connector")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --- certs and tokens ---------------------------------------------------------------------------

DEFAULT_HOSTS = ["127.0.0.1", "localhost"]  # `certs init/server` without --host: a demo on this machine
DEFAULT_NODES = ["node-a"]


def _existing_ca(directory: Path, name: str, create_with: str) -> Any:
    from connector import pki

    ca = pki.Issued(directory / f"{name}.pem", directory / f"{name}.key")
    for path in (ca.cert_path, ca.key_path):
        if not path.exists():
            raise pki.CertificateError(f"{path} does not exist: create the CA first with "
                                       f"`connector certs ca --dir {directory}{create_with}`")
    return ca


def cmd_certs(args: argparse.Namespace) -> int:
    from connector import pki

    directory = Path(args.dir)
    for option, default in (("host", DEFAULT_HOSTS), ("node", DEFAULT_NODES)):
        if getattr(args, option, "unset") is None:
            setattr(args, option, default)
            print(f"connector: no --{option} given, using {' '.join(default)}", file=sys.stderr)
    if args.certs_command == "ca":
        if args.subaccount:
            issued = pki.create_ca(directory, f"{args.subaccount}-ca", f"{args.subaccount} connector CA", force=args.force)
        else:
            issued = pki.create_ca(directory, "cloud-ca", "cloud tunnel endpoint CA", force=args.force)
        print(f"CA: {issued.cert_path} (key {issued.key_path}, mode 0600)")
    elif args.certs_command == "server":
        ca = _existing_ca(directory, "cloud-ca", "")
        issued = pki.issue(ca, directory, "tunnel-server", common_name=args.host[0], server_names=args.host, force=args.force)
        print(f"server certificate: {issued.cert_path} for {', '.join(args.host)}")
    elif args.certs_command == "client":
        ca = _existing_ca(directory, f"{args.subaccount}-ca", f" --subaccount {args.subaccount}")
        issued = pki.issue(
            ca, directory, f"node-{args.node}", common_name=args.node, organization=args.subaccount,
            cluster=args.cluster, client=True, force=args.force,
        )
        print(f"client certificate: {issued.cert_path} for node {args.node} of subaccount {args.subaccount}")
    elif args.certs_command == "init":
        paths = init_certs(directory, args.subaccount, args.node, args.host, force=args.force, cluster=args.cluster)
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0


def cmd_certs_renewal(args: argparse.Namespace) -> int:
    """`connector certs csr|sign|install`: a node certificate renewed by an operator (the cloud
    renews by itself when it holds the subaccount CA's key: `connector.agent.renew`)."""
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from connector import pki

    if args.certs_command == "csr":
        cert_path = Path(args.cert)
        out = Path(args.out) if args.out else cert_path.parent
        key_pem, csr_pem = pki.new_key_and_csr(pki.load_certificate(cert_path))
        key_path, csr_path = out / f"{cert_path.stem}.new.key", out / f"{cert_path.stem}.csr"
        pki.write_private(key_path, key_pem, overwrite=args.force)
        csr_path.write_bytes(csr_pem)
        print(f"new key: {key_path} (mode 0600, stays here); CSR: {csr_path} (for `connector certs sign`)")
    elif args.certs_command == "sign":
        ca = _existing_ca(Path(args.dir), f"{args.subaccount}-ca", f" --subaccount {args.subaccount}")
        csr = pki.load_csr(pki.read_file(Path(args.csr), "CSR"))
        names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, args.subaccount)]
        if args.cluster:
            names.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, args.cluster))
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, args.node))
        cert = pki.sign_client_csr(ca, csr, x509.Name(names),
                                   lifetime=datetime.timedelta(days=args.days) + pki.BACKDATE)
        Path(args.out).write_bytes(cert)
        print(f"certificate: {args.out} for node {args.node} of subaccount {args.subaccount}, valid {args.days} days")
    else:
        pki.check_key_pair(Path(args.cert), Path(args.key))
        pki.install_key_pair(Path(args.to_cert), Path(args.to_key), pki.read_file(Path(args.cert), "certificate"),
                             pki.read_file(Path(args.key), "private key"))
        print(f"installed: {args.to_cert} and {args.to_key}; the node reads them within seconds (or on SIGHUP)")
    return 0


def init_certs(directory: Path, subaccount: str, nodes: list[str], hosts: list[str], *, force: bool = False,
               cluster: str | None = None) -> dict[str, Path]:
    """Everything a demo or a first install needs: cloud CA + server cert, subaccount CA + node certs
    (bound to `cluster` when given), and the nodes' admin token file (`admin.token`, mode 0600)."""
    from connector import pki
    from connector.admin import create_token_file

    cloud_ca = pki.create_ca(directory, "cloud-ca", "cloud tunnel endpoint CA", force=force)
    server = pki.issue(cloud_ca, directory, "tunnel-server", common_name=hosts[0], server_names=hosts, force=force)
    sub_ca = pki.create_ca(directory, f"{subaccount}-ca", f"{subaccount} connector CA", force=force)
    result = {"cloud_ca": cloud_ca.cert_path, "server_cert": server.cert_path, "server_key": server.key_path,
              "subaccount_ca": sub_ca.cert_path}
    for node in nodes:
        client = pki.issue(sub_ca, directory, f"node-{node}", common_name=node, organization=subaccount,
                           cluster=cluster, client=True, force=force)
        result[f"node_{node}_cert"] = client.cert_path
        result[f"node_{node}_key"] = client.key_path
    token = directory / "admin.token"
    if force or not token.exists():
        create_token_file(token, force=force)
    result["admin_token"] = token
    return result


MIN_TOKEN_BITS = 128


def token_bits(token: str) -> float:
    """An upper bound of a token's entropy: its length times log2 of the smallest alphabet
    (digits, hex, lowercase, letters and digits, URL-safe base64, printable) it is written in."""
    alphabets = (string.digits, string.hexdigits.lower(), string.ascii_lowercase + string.digits,
                 string.ascii_letters + string.digits, string.ascii_letters + string.digits + "-_",
                 string.printable.strip())
    size = next((len(set(a)) for a in alphabets if set(token) <= set(a)), 256)
    return len(token) * math.log2(size)


def cmd_token(args: argparse.Namespace) -> int:
    from connector.cloud.auth import hash_token, new_token

    token = args.value if args.value is not None else new_token()
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS and not args.force:
        print(f"connector: a {len(token)}-character token has at most {bits:.0f} bits of entropy, below "
              f"{MIN_TOKEN_BITS}: anyone who can reach the proxy could guess it. Leave out --value for a "
              "random one, or add --force to accept it anyway", file=sys.stderr)
        return 2
    if args.bare:
        print(token)
    elif args.sha256:
        print(hash_token(token))
    else:
        print(json.dumps({"token": token, "token_sha256": hash_token(token)}))
    return 0


def _cloud_store(config_path: str) -> tuple[Any, Any]:
    """The cloud's configuration and its shared etcd store ([shared] required)."""
    from connector.config import ConfigError, etcd_settings, load_cloud_config
    from ha.etcd import EtcdStore

    config = load_cloud_config(config_path)
    if config.shared is None:
        raise ConfigError(config.file, "shared", "is not configured: without the cloud's etcd, tokens live in "
                          "cloud.toml ([[subaccounts]] token_sha256) and change with a restart")
    return config, EtcdStore(config.shared.prefix.lstrip("/"), etcd_settings(config.shared.etcd))


def _on_cloud_store(store: Any, body: Any) -> int:
    """Run `body()` (async, returning an exit status) against the cloud's etcd: a refused change
    (ValueError) exits 2, an unreachable etcd 1, and the store is closed either way."""
    from ha.store import StoreUnavailable

    async def run() -> int:
        try:
            return int(await body())
        except ValueError as exc:
            print(f"connector: {exc}", file=sys.stderr)
            return 2
        except StoreUnavailable as exc:
            print(f"connector: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.aclose()

    return trio.run(run)


def cmd_cloud_token(args: argparse.Namespace) -> int:
    """`connector cloud-token add|revoke|list`: application tokens in the cloud's etcd, live on
    every replica (see `connector.cloud.shared`)."""
    from connector.cloud import shared
    from connector.cloud.auth import hash_token, new_token

    if args.action in ("add", "revoke") and args.subaccount is None:
        print(f"connector: cloud-token {args.action} needs --subaccount", file=sys.stderr)
        return 2
    if args.action == "revoke" and args.sha256 is None:
        print("connector: cloud-token revoke needs --sha256 (see `connector cloud-token list`)", file=sys.stderr)
        return 2
    config, store = _cloud_store(args.config)
    if args.subaccount is not None and _unknown_subaccount(config, args.subaccount):
        return 2

    async def run() -> int:
        if args.action == "add":
            token = new_token()
            kind = args.kind.replace("-", "_")
            revision = await shared.add_token(store, hash_token(token), subaccount=args.subaccount, kind=kind,
                                              label=args.label or "")
            print(json.dumps({"token": token, "token_sha256": hash_token(token), "subaccount": args.subaccount,
                              "kind": kind, "revision": revision}))
        elif args.action == "revoke":
            revoked = await shared.revoke_tokens(store, args.sha256, subaccount=args.subaccount)
            print(json.dumps({"revoked": revoked}))
        else:
            for record in await shared.list_tokens(store, subaccount=args.subaccount):
                print(json.dumps(record))
        return 0

    return _on_cloud_store(store, run)


def _unknown_subaccount(config: Any, subaccount: str) -> bool:
    """True (and the one-line error said) when cloud.toml does not name `subaccount`."""
    if subaccount in {s.id for s in config.subaccounts}:
        return False
    print(f"connector: subaccount {subaccount!r} is not in {config.file}", file=sys.stderr)
    return True


def cmd_cloud_subaccount(args: argparse.Namespace) -> int:
    """`connector cloud-subaccount show|set`: a subaccount's live settings in the cloud's etcd."""
    import attrs

    from connector.cloud import shared

    config, store = _cloud_store(args.config)
    if _unknown_subaccount(config, args.subaccount):
        return 2
    pins: dict[str, str | None] = {}
    for pin in args.pin or []:
        location, sep, cluster = pin.partition("=")
        if not sep:
            print(f"connector: --pin takes LOCATION=CLUSTER (CLUSTER empty: unpin), got {pin!r}", file=sys.stderr)
            return 2
        pins[location] = cluster or None

    def change(current: shared.SubaccountSettings) -> shared.SubaccountSettings:
        clusters = {**current.clusters, **pins}
        return attrs.evolve(
            current,
            locations=tuple(dict.fromkeys([*current.locations, *(args.location or [])])),
            clusters={loc: c for loc, c in clusters.items() if c is not None},
            max_streams_per_token=current.max_streams_per_token if args.max_streams_per_token is None
            else (None if args.max_streams_per_token < 0 else args.max_streams_per_token),
        )

    async def run() -> int:
        if args.action == "set":
            settings, revision = await shared.update_subaccount(store, args.subaccount, change)
            print(json.dumps({**settings.to_json(), "subaccount": args.subaccount, "revision": revision}))
        else:
            kv = await store.get(shared.subaccount_key(args.subaccount))
            current = shared.SubaccountSettings.from_json(json.loads(kv.value)) if kv else shared.SubaccountSettings()
            print(json.dumps({**current.to_json(), "subaccount": args.subaccount}))
        return 0

    return _on_cloud_store(store, run)


def cmd_cloud_fence(args: argparse.Namespace) -> int:
    """`connector cloud-fence show|reset`: the fences in the cloud's etcd; an audited reset of one
    location's (`connector.cloud.fenceadmin`)."""
    from connector.cloud import fenceadmin

    if args.action == "reset" and (args.subaccount is None or args.location is None or args.epoch is None):
        print("connector: cloud-fence reset needs --subaccount, --location ('' for none) and --epoch", file=sys.stderr)
        return 2
    config, store = _cloud_store(args.config)
    if args.subaccount is not None and _unknown_subaccount(config, args.subaccount):
        return 2

    async def run() -> int:
        if args.action == "show":
            for entry in await fenceadmin.fence_report(store):
                if args.subaccount in (None, entry["subaccount"]):
                    print(json.dumps(entry))
            return 0
        result = await fenceadmin.reset_fence(store, (args.subaccount, args.location), args.epoch,
                                              reason=args.reason or "")
        print(json.dumps({"subaccount": args.subaccount, "location_id": args.location, "applied": result.applied,
                          "old": result.old.to_json(), "new": result.new.to_json(), "record": result.record_key}))
        if not result.applied:
            print("connector: the fence changed while it was being reset; nothing changed, run it again",
                  file=sys.stderr)
        return 0 if result.applied else 1

    return _on_cloud_store(store, run)


def cmd_cloud_revoke(args: argparse.Namespace) -> int:
    """`connector cloud-revoke`: put a node certificate's serial on the deny-list in the cloud's
    etcd; every replica refuses it at the handshake and closes its live tunnels within moments."""
    from connector import pki
    from connector.cloud import shared
    from connector.cloud.revocation import format_serial, parse_serial

    serials: list[int] = []
    try:
        serials += [parse_serial(text) for text in args.serial or []]
        serials += [pki.load_certificate(Path(path)).serial_number for path in args.cert or []]
    except (ValueError, pki.CertificateError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    if args.action != "list" and not serials:
        print(f"connector: cloud-revoke {args.action} needs --serial or --cert", file=sys.stderr)
        return 2
    _, store = _cloud_store(args.config)

    async def run() -> int:
        if args.action == "add":
            for serial in serials:
                revision = await shared.revoke_certificate(store, serial, reason=args.reason or "")
                print(json.dumps({"revoked": format_serial(serial), "serial": serial, "revision": revision}))
        elif args.action == "remove":
            for serial in serials:
                await shared.unrevoke_certificate(store, serial)
                print(json.dumps({"unrevoked": format_serial(serial), "serial": serial}))
        else:
            for record in await shared.list_revoked(store):
                print(json.dumps(record))
        return 0

    return _on_cloud_store(store, run)


def cmd_cloud_keys(args: argparse.Namespace) -> int:
    """`connector cloud-keys list|rotate`: the token service's signing key ring in the cloud's etcd
    (see `connector.cloud.oauth_shared`); a rotation applies on every replica within moments."""
    import time

    from connector.cloud.destination_store import load_or_create_key
    from connector.cloud.jwks import rotation
    from connector.cloud.oauth_shared import KEYRING_KEY, SharedKeyRing, decode_ring
    from connector.config import load_cloud_config

    if load_cloud_config(args.config).shared is None:
        return _local_cloud_keys(args)
    config, store = _cloud_store(args.config)
    assert config.shared is not None
    key = config.shared.secrets_key
    if config.oauth is None or key is None or not key.exists():
        print(f"connector: {config.file} needs [oauth] and an existing [shared] secrets_key (the replicas' key "
              "file) to read the signing keys", file=sys.stderr)
        return 2
    keyring = SharedKeyRing(store, load_or_create_key(key))
    overlap = config.oauth.settings.key_overlap if args.overlap is None else args.overlap
    if overlap < 0:
        print("connector: --overlap must be at least 0", file=sys.stderr)
        return 2

    async def run() -> int:
        if args.action == "rotate":
            said = await keyring.update(rotation(time.time(), overlap))
            print(json.dumps({"rotated": said, "revision": keyring.ring_revision}))
        kv = await store.get(KEYRING_KEY)
        ring = decode_ring(keyring.fernet, kv.value) if kv is not None else None
        for signing_key in ring.keys if ring is not None else ():
            print(json.dumps({"kid": signing_key.kid, "created": signing_key.created, "retires": signing_key.retires,
                              "signs": signing_key is ring.current}))  # type: ignore[union-attr]
        return 0

    try:
        return _on_cloud_store(store, run)
    except OSError as exc:  # a ring of another secrets key
        print(f"connector: {exc}", file=sys.stderr)
        return 2


def _local_cloud_keys(args: argparse.Namespace) -> int:
    """`connector cloud-keys` of a cloud without [shared]: the ring in [oauth] signing_keys, which
    the running cloud reads again when the file changes (`jwks.LocalKeys`), as it does the bindings."""
    import time

    import trio

    from connector.cloud.jwks import FileKeyStore, LocalKeys, rotation
    from connector.config import load_cloud_config

    config = load_cloud_config(args.config)
    if config.oauth is None:
        print(f"connector: {config.file} has no [oauth] section: no token service, no signing keys", file=sys.stderr)
        return 2
    overlap = config.oauth.settings.key_overlap if args.overlap is None else args.overlap
    if overlap < 0:
        print("connector: --overlap must be at least 0", file=sys.stderr)
        return 2
    try:
        keyring = LocalKeys(FileKeyStore(config.oauth.signing_keys), time.time())
        if args.action == "rotate":
            print(json.dumps({"rotated": trio.run(keyring.update, rotation(time.time(), overlap))}))
    except OSError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 1
    ring = keyring.ring
    for signing_key in ring.keys:
        print(json.dumps({"kid": signing_key.kid, "created": signing_key.created, "retires": signing_key.retires,
                          "signs": signing_key is ring.current}))
    return 0


def cloud_replicas_status(config_path: str, *, as_json: bool) -> int:
    """`connector status --cloud cloud.toml`: the replicas as the cloud's etcd has them; exit 1 if
    none is ready."""
    from connector.cloud import shared
    from ha.store import StoreUnavailable

    _, store = _cloud_store(config_path)

    async def read() -> dict[str, Any]:
        try:
            return shared.replicas_from((await store.get_prefix(shared.REPLICAS_PREFIX)).kvs)
        finally:
            await store.aclose()

    try:
        replicas = trio.run(read)
    except StoreUnavailable as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 1
    for rid, entry in sorted(replicas.items()):
        if as_json:
            print(json.dumps(entry))
            continue
        tunnels = ", ".join(f"{loc or '/'}: {info['tunnels']} (master {info['master'] or '-'})"
                            for loc, info in sorted(entry.get("locations", {}).items())) or "no tunnels"
        print(f"{rid:<16} {'ready' if entry.get('ready') else 'NOT READY':<9} {entry['tunnel_url']:<40} "
              f"{entry.get('admin_url', '')}  {tunnels}")
    return 0 if any(e.get("ready") for e in replicas.values()) else 1

def cmd_binding(args: argparse.Namespace) -> int:
    """Application credentials of the token service ([oauth] of cloud.toml): create, list, revoke.
    With [shared] they are in the cloud's etcd (live on every replica), else in the bindings file."""
    import time

    from connector.cloud import oauth_shared
    from connector.cloud.bindings import (
        BindingError,
        Endpoints,
        FileBindingStore,
        new_binding,
        vcap_services,
    )
    from connector.config import ConfigError, load_cloud_config

    config = load_cloud_config(args.config)
    if config.oauth is None:
        raise ConfigError(config.file, "oauth", "no [oauth] section: the token service is not configured")
    oauth = config.oauth
    if args.binding_command == "create" and args.subaccount not in {s.id for s in config.subaccounts}:
        raise ConfigError(config.file, "subaccounts", f"no subaccount {args.subaccount!r} is configured")

    def created(binding: Any, secret: str) -> None:
        dest = config.destinations_listen
        endpoints = Endpoints(
            token_url=oauth.settings.url.rstrip("/"), proxy_host=oauth.proxy_host,
            http_proxy_port=config.http_listen.port, socks5_proxy_port=config.socks5_listen.port,
            destination_url=f"http://{dest.host}:{dest.port}" if dest is not None else None,
        )
        print(f"connector: binding {binding.client_id} for subaccount {binding.subaccount}; its secret is "
              "shown only here (stored hashed)", file=sys.stderr)
        print(json.dumps(vcap_services(binding, secret, endpoints), indent=None if args.compact else 2))

    def listed(bindings: list[Any]) -> None:
        for binding in bindings:
            print(json.dumps({"client_id": binding.client_id, "subaccount": binding.subaccount,
                              "location": binding.location, "created": binding.created, "revoked": binding.revoked}))

    def revoked(binding: Any) -> None:
        print(f"binding {binding.client_id} of subaccount {binding.subaccount} is revoked: it gets no new "
              "tokens, and its tokens are refused")

    try:
        if config.shared is not None:
            _, store = _cloud_store(args.config)

            async def shared() -> int:
                try:
                    if args.binding_command == "create":
                        binding, secret = new_binding(args.subaccount, time.time(), location=args.location or "")
                        await oauth_shared.add_binding(store, binding)
                        created(binding, secret)
                    elif args.binding_command == "list":
                        listed(await oauth_shared.list_bindings(store))
                    else:
                        revoked(await oauth_shared.revoke_binding(store, args.client_id, time.time()))
                except BindingError as exc:
                    raise ValueError(str(exc)) from None
                return 0

            return _on_cloud_store(store, shared)
        files = FileBindingStore(oauth.bindings)
        if args.binding_command == "create":
            binding, secret = new_binding(args.subaccount, time.time(), location=args.location or "")
            files.add(binding)
            created(binding, secret)
        elif args.binding_command == "list":
            listed(files.all())
        else:
            revoked(files.revoke(args.client_id, time.time()))
    except (BindingError, ValueError, OSError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    return 0


# --- long-running processes ----------------------------------------------------------------------

async def _watch_parent(parent: int, stop: trio.Event) -> None:
    """Under a supervisor that cannot clean up after itself (the demo killed with -9), stop
    when the parent is gone rather than linger as a stray process."""
    while os.getppid() == parent:  # noqa: ASYNC110 - the kernel offers no event for a parent's death
        await trio.sleep(1.0)
    log.warning("parent process %d is gone, stopping", parent)
    stop.set()


async def _run_until_signal(service_run: Any, on_stop: Any = None, on_reload: Any = None) -> None:
    """Run until SIGTERM or SIGINT, then `on_stop` (a graceful drain or handover); a second signal
    during it stops at once (Ctrl-C twice in a terminal). SIGHUP calls `on_reload` (certificates)."""
    stop = trio.Event()
    graceful = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        await nursery.start(service_run)
        parent = os.environ.get("CONNECTOR_PARENT_PID")
        if parent and parent.isdigit():
            nursery.start_soon(_watch_parent, int(parent), stop)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

            async def _signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP, reading the certificates again")
                        if on_reload is not None:
                            on_reload()
                    elif not stop.is_set():
                        log.info("received %s, stopping (again: at once)", signal.Signals(signum).name)
                        stop.set()
                    else:
                        log.warning("received %s again, stopping at once", signal.Signals(signum).name)
                        graceful.cancel()
                        return

            nursery.start_soon(_signals)
            await stop.wait()
            if on_stop is not None:
                with graceful:
                    await on_stop()
            nursery.cancel_scope.cancel()


def cmd_cloud(args: argparse.Namespace) -> int:
    from connector.cloud.server import CloudServer
    from connector.config import check_cloud_files, load_cloud_config

    config = load_cloud_config(args.config)
    check_cloud_files(config)
    if args.check:
        print(f"{args.config}: configuration is valid")
        return 0
    server = CloudServer(config)
    # SIGTERM: drain (connector.cloud.drain); SIGHUP: certificates read again
    trio.run(_run_until_signal, server.run, server.shutdown, server.reload_certificates)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from connector.agent.runtime import build_node
    from connector.config import check_node_certificate, check_node_files, load_node_config

    config = load_node_config(args.config)
    check_node_files(config)
    if args.check:
        for warning in check_node_certificate(config):
            print(f"connector: warning: {warning}", file=sys.stderr)
        print(f"{args.config}: configuration is valid; {config.egress.describe()}")
        return 0
    node = build_node(config)
    trio.run(_run_until_signal, node.run, node.shutdown, node.reload_certificates)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from connector.demo import run_demo

    return run_demo(state_file=Path(args.state_file) if args.state_file else None, workdir=Path(args.dir) if args.dir else None,
                    http_port=args.http_port, socks5_port=args.socks5_port, etcd=args.etcd,
                    cloud_replicas=args.cloud_replicas)


def cmd_status(args: argparse.Namespace) -> int:
    from connector.clusterctl import status

    if args.cloud is not None:
        return cloud_replicas_status(args.cloud, as_json=args.json)
    return status(config=args.config, as_json=args.json)


def cmd_switch(args: argparse.Namespace) -> int:
    from connector.clusterctl import switch

    return switch(config=args.config)


def cmd_acl(args: argparse.Namespace) -> int:
    from connector.clusterctl import acl

    return acl(args)


def cmd_secret(args: argparse.Namespace) -> int:
    from connector.clusterctl import secret

    return secret(args)


# --- backup and restore ---------------------------------------------------------------------------

def _backup_target(args: argparse.Namespace) -> tuple[str, str, Any]:
    """(kind, name, store) of `backup` / `restore`: the cloud's etcd with --cloud, else the
    cluster of --config (or of the running demo)."""
    if args.cloud is not None:
        config, store = _cloud_store(args.cloud)
        return "cloud", config.shared.prefix, store
    from connector.clusterctl import _cluster_store, find_config

    config = find_config(args.config)
    store = _cluster_store(config)  # UsageError when the node is standalone
    assert config.cluster is not None
    return "cluster", config.cluster.name, store


def _backup_secret(args: argparse.Namespace, *, new: bool) -> Any:
    from connector.backup import read_key_file, read_passphrase_file

    if args.key_file is not None:
        return read_key_file(Path(args.key_file))
    return read_passphrase_file(Path(args.passphrase_file), new=new)


def cmd_backup_key(args: argparse.Namespace) -> int:
    """`connector backup-key FILE`: a new random key for `backup --key-file` (mode 0600)."""
    from connector.backup import BackupError, write_key_file

    try:
        write_key_file(Path(args.file))
    except BackupError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.file} (mode 0600): keep a copy apart from the backups, they cannot be read without it")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """`connector backup`: the shared state in etcd, into one encrypted archive (`connector.backup`)."""
    from connector import backup
    from connector.clusterctl import UsageError

    try:
        secret = _backup_secret(args, new=True)
        kind, name, store = _backup_target(args)
    except (backup.BackupError, UsageError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        try:
            payload = await backup.collect(store, kind=kind, name=name)
        finally:
            await store.aclose()
        backup.write_archive(Path(args.out), backup.seal(payload, secret))
        print(json.dumps({"archive": args.out, "kind": kind, "name": name, "keys": len(payload["keys"]),
                          "revision": payload["revision"]}))
        return 0

    return _run_backup_command(run)


def _run_backup_command(run: Callable[[], Awaitable[int]]) -> int:
    """Run a backup or restore; its errors are one line: 2 for the archive or the request, 1 for
    the store (etcd unreachable, refused)."""
    from connector import backup
    from ha.store import StoreError

    try:
        return trio.run(run)
    except backup.BackupError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 1


def cmd_restore(args: argparse.Namespace) -> int:
    """`connector restore`: an archive back into an (empty) etcd, its revision moved past the
    backup's so the next epoch is above every earlier one."""
    from connector import backup
    from connector.agent.sharedconfig import record_history
    from connector.clusterctl import UsageError

    try:
        secret = _backup_secret(args, new=False)
        payload = backup.read_archive(Path(args.archive), secret)
        kind, name, store = _backup_target(args)
    except (backup.BackupError, UsageError) as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        try:
            restored = await backup.restore(store, payload, kind=kind, name=name, force=args.force,
                                            min_revision=args.min_revision)
            if kind == "cluster":
                await record_history(store, "restore", args.archive, restored.revision_after,
                                     {"keys": restored.keys, "backup_revision": payload["revision"],
                                      "backup_created": payload["created"]})
        finally:
            await store.aclose()
        print(json.dumps({"archive": args.archive, "kind": kind, "name": name, "keys": restored.keys,
                          "backup_revision": payload["revision"], "revision_before": restored.revision_before,
                          "revision": restored.revision_after}))
        return 0

    return _run_backup_command(run)


# --- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Open cloud connector: tunnel, connectivity proxy, destination service, HA cluster.",
    )
    parser.add_argument("--version", action="version", version=f"connector {connector.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certs = sub.add_parser("certs", help="create CAs and certificates (keys are written 0600)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="WHAT")
    for name, help_text in (
        ("init", "cloud CA, tunnel server certificate, subaccount CA and node client certificates"),
        ("ca", "a CA: the cloud CA, or with --subaccount a subaccount's CA"),
        ("server", "the tunnel endpoint's server certificate, signed by the cloud CA"),
        ("client", "a node's client certificate, signed by its subaccount's CA"),
    ):
        p = certs_sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", required=True, help="directory holding the CA files and receiving the new ones")
        p.add_argument("--force", action="store_true", help="overwrite existing keys")
        if name in ("init", "ca", "client"):
            p.add_argument("--subaccount", required=name != "ca", help="subaccount id (goes into O=)")
        if name in ("init", "server"):
            p.add_argument("--host", action="append", default=None,
                           help="name or IP address the nodes dial, as in their tunnel.url (repeatable); the "
                                f"certificate is valid for these only. Default: {' '.join(DEFAULT_HOSTS)}, "
                                "which suits a demo on one machine only")
        if name == "init":
            p.add_argument("--node", action="append", default=None,
                           help=f"node id to issue a client cert for (repeatable; default: {' '.join(DEFAULT_NODES)})")
        if name == "client":
            p.add_argument("--node", required=True, help="node id (goes into CN=)")
        if name in ("init", "client"):
            p.add_argument("--cluster", help="the nodes' [cluster] name (goes into OU=): the cloud then accepts "
                           "these nodes only for that cluster")
    certs.set_defaults(func=cmd_certs)
    # renewal by an operator where the subaccount CA is kept offline (docs/operations.md)
    csr = certs_sub.add_parser("csr", help="on a node: a new key and a CSR to renew its certificate",
                               description="Writes <out>/<name>.new.key (0600) and <out>/<name>.csr, naming what "
                                           "--cert names. Take the CSR to the CA's host for `certs sign`.")
    csr.add_argument("--cert", required=True, help="the node's certificate (tunnel.cert)")
    csr.add_argument("--out", help="directory for the key and CSR (default: the certificate's)")
    csr.add_argument("--force", action="store_true", help="overwrite an earlier new key")
    sign = certs_sub.add_parser("sign", help="on the CA's host: sign a node's CSR with its subaccount's CA",
                                description="The certificate names --subaccount, --node and --cluster as "
                                            "`certs client` does, whatever the CSR says; valid --days.")
    sign.add_argument("--dir", required=True, help="directory holding <subaccount>-ca.pem/.key")
    sign.add_argument("--subaccount", required=True)
    sign.add_argument("--node", required=True, help="node id (CN=)")
    sign.add_argument("--cluster", help="the node's cluster (OU=), as its current certificate names it")
    sign.add_argument("--csr", required=True, help="the CSR from `certs csr`")
    sign.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    sign.add_argument("--out", required=True, help="where to write the certificate (PEM)")
    install = certs_sub.add_parser("install", help="on a node: put a renewed certificate and its key in place",
                                   description="Checks they are a pair, then replaces --to-key and --to-cert "
                                               "atomically; the running node reads them within seconds.")
    install.add_argument("--cert", required=True, help="the signed certificate")
    install.add_argument("--key", required=True, help="the key `certs csr` made")
    install.add_argument("--to-cert", required=True, help="the node's tunnel.cert")
    install.add_argument("--to-key", required=True, help="the node's tunnel.key")
    for p in (csr, sign, install):
        p.set_defaults(func=cmd_certs_renewal)

    token = sub.add_parser("token", help="create a proxy bearer token and print it with its SHA-256 for cloud.toml",
                           description='Prints {"token": ..., "token_sha256": ...}; `TOKEN=$(connector token '
                                       '--bare)` keeps just the token, `connector token --value "$TOKEN" --sha256` '
                                       "then prints its digest for cloud.toml.")
    token.add_argument("--value", help=f"use this token instead of a random one (refused below {MIN_TOKEN_BITS} "
                                       "bits of entropy, e.g. 22 random letters and digits, unless --force)")
    token.add_argument("--force", action="store_true", help="accept a --value below the entropy minimum")
    output = token.add_mutually_exclusive_group()
    output.add_argument("--bare", action="store_true", help="print the token alone (for TOKEN=$(...))")
    output.add_argument("--sha256", action="store_true", help="print its SHA-256 alone (for cloud.toml)")
    token.set_defaults(func=cmd_token)

    binding = sub.add_parser("binding", help="application credentials for the token service (VCAP_SERVICES)")
    binding_sub = binding.add_subparsers(dest="binding_command", required=True, metavar="ACTION")
    binding_create = binding_sub.add_parser(
        "create", help="issue a client id and secret; print VCAP_SERVICES (connectivity, destination, xsuaa)")
    binding_create.add_argument("--subaccount", required=True, help="a subaccount of cloud.toml")
    binding_create.add_argument("--location", help="the Cloud Connector location id the application uses")
    binding_create.add_argument("--compact", action="store_true", help="one line (for export VCAP_SERVICES=...)")
    binding_sub.add_parser("list", help="every binding, one JSON object per line (secrets never shown)")
    binding_revoke = binding_sub.add_parser("revoke", help="revoke a binding: no new tokens, its tokens refused")
    binding_revoke.add_argument("client_id")
    for p in binding_sub.choices.values():
        p.add_argument("--config", required=True, help="cloud.toml (its [oauth] section names the files; with "
                       "[shared] the bindings are in the cloud's etcd)")
    binding.set_defaults(func=cmd_binding)

    cloud = sub.add_parser("cloud", help="run the cloud side: tunnel endpoint, HTTP and SOCKS5 proxies, destinations")
    cloud.add_argument("--config", required=True, help="cloud.toml")
    cloud.add_argument("--check", action="store_true", help="validate the configuration and exit (0 valid, 2 not)")
    cloud.set_defaults(func=cmd_cloud)

    cloud_token = sub.add_parser(
        "cloud-token", help="add, revoke or list application tokens in the cloud's etcd (live, no restart)",
        description="Tokens kept in the cloud's etcd ([shared]) work on every replica within moments of `add` and "
                    "are refused within moments of `revoke`; those of cloud.toml keep working beside them.")
    cloud_token.add_argument("action", choices=("add", "revoke", "list"))
    cloud_token.add_argument("--config", required=True, help="cloud.toml (with [shared])")
    cloud_token.add_argument("--subaccount", help="the subaccount the token acts for (required for add and revoke)")
    cloud_token.add_argument("--kind", choices=("proxy", "destination-admin"), default="proxy",
                             help="proxy: the proxies and finding destinations; destination-admin: managing them")
    cloud_token.add_argument("--label", help="a note kept with the digest (who the token is for)")
    cloud_token.add_argument("--sha256", help="revoke: the token's SHA-256 (at least its first 8 characters)")
    cloud_token.set_defaults(func=cmd_cloud_token)

    cloud_sub = sub.add_parser(
        "cloud-subaccount", help="show or change a subaccount's live settings in the cloud's etcd (no restart)",
        description="Settings kept in the cloud's etcd ([shared]) apply on every replica at once and override "
                    "cloud.toml's (locations are added to cloud.toml's).")
    cloud_sub.add_argument("action", choices=("show", "set"))
    cloud_sub.add_argument("--config", required=True, help="cloud.toml (with [shared])")
    cloud_sub.add_argument("--subaccount", required=True)
    cloud_sub.add_argument("--location", action="append", help="set: hold requests for this location too (repeatable)")
    cloud_sub.add_argument("--pin", action="append", metavar="LOCATION=CLUSTER",
                           help="set: only CLUSTER may serve LOCATION; LOCATION= removes the pin (repeatable)")
    cloud_sub.add_argument("--max-streams-per-token", type=int,
                           help="set: streams one token of the subaccount may hold at once (0: no limit; -1: "
                                "back to cloud.toml's)")
    cloud_sub.set_defaults(func=cmd_cloud_subaccount)

    cloud_fence = sub.add_parser(
        "cloud-fence", help="show the fences in the cloud's etcd, or reset one location's (audited)",
        description="A fence only rises by itself. After an on-premise etcd was lost and restored below the fence "
                    "(see docs/operations.md, Backup and restore), `reset` lowers one location's fence on every "
                    "replica; it is refused while a replica has a master there, and recorded with who, when, the "
                    "old and new epoch and --reason.")
    cloud_fence.add_argument("action", choices=("show", "reset"))
    cloud_fence.add_argument("--config", required=True, help="cloud.toml (with [shared])")
    cloud_fence.add_argument("--subaccount", help="the location's subaccount (required for reset)")
    cloud_fence.add_argument("--location", help="the location id ('' for the default location)")
    cloud_fence.add_argument("--epoch", type=int, help="reset: the new fence; masters need an epoch at least this "
                             "high (the restored backup's revision; -1: any)")
    cloud_fence.add_argument("--reason", help="reset: why, kept in the record (required)")
    cloud_fence.set_defaults(func=cmd_cloud_fence)

    cloud_revoke = sub.add_parser(
        "cloud-revoke", help="revoke node certificates by serial in the cloud's etcd (live, every replica)",
        description="A revoked serial is refused at the tunnel handshake and its live tunnels are closed within "
                    "moments, on every replica. `openssl x509 -noout -serial -in node.pem` prints a serial in hex: "
                    "give it as 0x<hex>, or give the certificate itself with --cert.")
    cloud_revoke.add_argument("action", nargs="?", choices=("add", "remove", "list"), default="add",
                              help="add (default): revoke; remove: take a serial off the list; list")
    cloud_revoke.add_argument("--config", required=True, help="cloud.toml (with [shared])")
    cloud_revoke.add_argument("--serial", action="append",
                              help="a certificate serial: decimal, 0x<hex> or colon-separated hex (repeatable)")
    cloud_revoke.add_argument("--cert", action="append", help="revoke the serial of this PEM certificate (repeatable)")
    cloud_revoke.add_argument("--reason", help="a note kept with the serial (why)")
    cloud_revoke.set_defaults(func=cmd_cloud_revoke)
    cloud_keys = sub.add_parser(
        "cloud-keys", help="list or rotate the token service's signing keys (in the cloud's etcd with [shared]: "
        "every replica; else in [oauth] signing_keys, read again by the running cloud)",
        description="The [oauth] token service's RS256 key ring, shared by the replicas ([shared]), or of a single "
                    "cloud in its [oauth] signing_keys file, which the running cloud reads again at its next use. "
                    "A rotation makes a new key sign on every replica within moments; the old one stays in /token_keys and valid "
                    "for --overlap seconds (default [oauth] key_overlap; 0 after a key leak: its tokens are refused "
                    "at once).")
    cloud_keys.add_argument("action", nargs="?", choices=("list", "rotate"), default="list",
                            help="list (default): the keys (never the private halves); rotate: a new key now")
    cloud_keys.add_argument("--config", required=True, help="cloud.toml (with [oauth])")
    cloud_keys.add_argument("--overlap", type=float, help="seconds the replaced key stays valid (rotate)")
    cloud_keys.set_defaults(func=cmd_cloud_keys)

    node = sub.add_parser("node", help="run an on-premise connector node")
    node.add_argument("--config", required=True, help="node.toml")
    node.add_argument("--check", action="store_true", help="validate the configuration and exit (0 valid, 2 not)")
    node.set_defaults(func=cmd_node)

    demo = sub.add_parser("demo", help="run a local demo cluster on 127.0.0.1 until Ctrl-C")
    demo.add_argument("--state-file", help="write JSON with every component's ports, pids and URLs here")
    demo.add_argument("--dir", help="working directory for certs, configs and logs (default: a temporary one)")
    demo.add_argument("--http-port", type=int, default=20003, help="HTTP proxy port (0 = any free port)")
    demo.add_argument("--socks5-port", type=int, default=20004, help="SOCKS5 proxy port (0 = any free port)")
    demo.add_argument("--etcd", metavar="PATH", help="the etcd binary to run (default: $ETCD_BINARY, else etcd on PATH)")
    demo.add_argument("--cloud-replicas", type=int, default=1, metavar="N",
                      help="run N cloud replicas and a cloud etcd behind HAProxy, the front door whose ports "
                           "--http-port and --socks5-port then name (default 1: one cloud process)")
    demo.set_defaults(func=cmd_demo)

    status = sub.add_parser("status", help="the cluster at a glance; exit 1 when there is no master")
    status.add_argument("--config", help="a node.toml of the cluster (default: the running demo's)")
    status.add_argument("--json", action="store_true", help="one JSON object per node")
    status.add_argument("--cloud", metavar="CLOUD_TOML", help="show the cloud's replicas (from its etcd) instead")
    status.set_defaults(func=cmd_status)

    switch = sub.add_parser("switch", help="graceful handover: the master resigns, a shadow takes over")
    switch.add_argument("--config", help="a node.toml of the cluster (default: the running demo's)")
    switch.set_defaults(func=cmd_switch)

    acl = sub.add_parser("acl", help="edit the shared allow-list in etcd (validated, audited, versioned)")
    acl.add_argument("--config", help="a node.toml of the cluster (default: the running demo's)")
    acl_sub = acl.add_subparsers(dest="acl_command", required=True, metavar="ACTION",
                                 parser_class=_ActionParser)
    acl_list = acl_sub.add_parser("list", help="list mappings with their revisions")
    acl_list.add_argument("--json", action="store_true")
    acl_add = acl_sub.add_parser("add", help="add or replace a mapping (from flags)")
    acl_add.add_argument("--virtual", required=True, help="virtual host:port, or host:first-last (a range of "
                         "ports, TCP and TCP-TLS only)")
    acl_add.add_argument("--internal", required=True, help="internal host:port (a range's first port, or "
                         "host:first-last of the same size)")
    acl_add.add_argument("--protocol", default="HTTP", choices=["HTTP", "HTTPS", "TCP", "TCP-TLS"])
    acl_add.add_argument("--host-in-header", default="virtual", choices=["virtual", "internal"])
    acl_add.add_argument("--path", action="append", default=[], help="allowed path prefix (repeatable); "
                         "suffix with '=' for an exact path, '+ws' to allow websocket upgrade")
    acl_add.add_argument("--trust-store", help="CA bundle for HTTPS/TCP-TLS backends: an absolute path that "
                         "exists on every node (checked here on this machine)")
    acl_add.add_argument("--principal-propagation", default="none", choices=["none", "certificate", "header"],
                         help="what the internal host gets of the user the cloud validated: nothing, a short-lived "
                         "client certificate (HTTPS; needs the nodes' [principal_propagation] CA) or a header")
    acl_add.add_argument("--client-cert", help="HTTPS/TCP-TLS: the certificate (chain) the node presents to the "
                         "internal host, an absolute path that exists on every node (with --client-key)")
    acl_add.add_argument("--client-key", help="its private key, mode 0600, an absolute path (checked here)")
    acl_add.add_argument("--client-identity", metavar="secret:NAME", help="HTTPS/TCP-TLS: present the certificate "
                         "and key of the cluster secret NAME (connector secret set NAME < bundle.pem)")
    acl_add.add_argument("--check", action="store_true", help="first connect to the internal host (and verify "
                         "its TLS) from here, within [forward] connect_timeout; store nothing if it does not answer")
    acl_add.add_argument("--expect-revision", type=int, help="fail unless the mapping is at this revision (CAS)")
    acl_remove = acl_sub.add_parser("remove", help="remove a mapping")
    acl_remove.add_argument("--virtual", required=True, help="virtual host:port")
    acl_history = acl_sub.add_parser("history", help="configuration changes, newest last (times in UTC)")
    acl_history.add_argument("--json", action="store_true", help="the raw records, one JSON object per line")
    acl.set_defaults(func=cmd_acl)

    secret = sub.add_parser("secret", help="store secrets in etcd, encrypted with the cluster key")
    secret.add_argument("--config", help="a node.toml of the cluster (default: the running demo's)")
    secret_sub = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION",
                                       parser_class=_ActionParser)
    secret_set = secret_sub.add_parser("set", help="store a secret (value read from stdin)")
    secret_set.add_argument("name")
    secret_get = secret_sub.add_parser("get", help="print a secret")
    secret_get.add_argument("name")
    secret_sub.add_parser("list", help="list secret names")
    secret.set_defaults(func=cmd_secret)

    for name, func, text in (
        ("backup", cmd_backup, "write the shared state in etcd (mappings, history, secrets; or the cloud's) into one "
                               "encrypted archive"),
        ("restore", cmd_restore, "put an archive back into an empty etcd, moving its revision past the backup's"),
    ):
        command = sub.add_parser(name, help=text, description=text + " (see docs/operations.md, Backup and restore)")
        where = command.add_mutually_exclusive_group()
        where.add_argument("--config", help="a node.toml of the cluster (default: the running demo's)")
        where.add_argument("--cloud", metavar="CLOUD_TOML", help="the cloud's shared state ([shared] of cloud.toml)")
        key = command.add_mutually_exclusive_group(required=True)
        key.add_argument("--key-file", help="a 32-byte key, mode 0600 (`connector backup-key` makes one)")
        key.add_argument("--passphrase-file", help="the passphrase is this file's first line ('-': standard input)")
        if name == "backup":
            command.add_argument("--out", required=True, help="the archive to write (mode 0600, replaced atomically)")
        else:
            command.add_argument("archive", help="the archive `connector backup` wrote")
            command.add_argument("--force", action="store_true",
                                 help="restore although etcd holds keys (the backup's keys are overwritten)")
            command.add_argument("--min-revision", type=int, default=0, metavar="N",
                                 help="move the revision to at least N (the fence's epoch the cloud reports, when "
                                      "elections happened after the backup)")
        command.set_defaults(func=func)

    backup_key = sub.add_parser("backup-key", help="create a random key file for `backup --key-file` (mode 0600)")
    backup_key.add_argument("file")
    backup_key.set_defaults(func=cmd_backup_key)
    return parser


class _ActionParser(argparse.ArgumentParser):
    """An action of `acl` / `secret`: also takes `--config` after the action name
    (`connector acl list --config node.toml` as well as `connector acl --config node.toml list`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: absent here, the value given before the action (or its default) stands
        self.add_argument("--config", default=argparse.SUPPRESS, help="a node.toml of the cluster")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from connector.config import ConfigError
    from connector.listen import ListenError
    from connector.pki import CertificateError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"connector: configuration error: {exc}", file=sys.stderr)
        return 2
    except (ListenError, BaseExceptionGroup) as exc:  # a listener that could not bind: one line each
        listen_errors = exc.split(ListenError)[0] if isinstance(exc, BaseExceptionGroup) else exc
        if listen_errors is None:
            raise
        for error in _leaves(listen_errors):
            print(f"connector: {error}", file=sys.stderr)
        return 2
    except CertificateError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
