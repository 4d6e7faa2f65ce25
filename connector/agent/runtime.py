"""Assemble a `Node` from its configuration: standalone, or clustered over etcd."""

from __future__ import annotations

import logging

from connector.agent.identity import ClusterSecrets
from connector.agent.node import Node
from connector.agent.sharedconfig import SharedConfig
from connector.config import NodeConfig
from ha.election import Elector
from ha.store import Store

log = logging.getLogger(__name__)


def open_store(config: NodeConfig):  # type: ignore[no-untyped-def]
    """The etcd store of the node's cluster (None when standalone)."""
    if config.cluster is None:
        return None
    from ha.etcd import EtcdSettings, EtcdStore

    etcd = config.cluster.etcd
    return EtcdStore(
        config.cluster.name,
        EtcdSettings(
            endpoints=tuple(etcd.endpoints),
            ca_file=str(etcd.ca) if etcd.ca else None,
            cert_file=str(etcd.cert) if etcd.cert else None,
            key_file=str(etcd.key) if etcd.key else None,
            user=etcd.user,
            password=etcd.password,
            timeout=etcd.timeout,
        ),
    )


def cluster_secrets(config: NodeConfig, store: Store) -> ClusterSecrets | None:
    """The cluster's secrets (client identities of mappings naming "secret:<name>"), if this node
    has the cluster key (`[cluster] secrets_key`, a file present at start, mode 0600)."""
    from connector.clusterctl import UsageError, cluster_fernet  # clusterctl imports this module

    if config.cluster is None or config.cluster.secrets_key is None:
        return None
    try:
        return ClusterSecrets(store, cluster_fernet(config, create=False))
    except (UsageError, ValueError, OSError) as exc:  # ValueError: not a Fernet key
        log.warning("cluster secrets unavailable, mappings naming a secret will fail: %s", exc)
        return None


def build_node(config: NodeConfig) -> Node:
    store = open_store(config)
    if store is None:
        return Node(config)
    assert config.cluster is not None
    elector = Elector(
        store,
        config.node_id,
        timing=config.cluster.timing,
        priority=config.priority,
        member_data={"address": config.admin_listen.host, "location_id": config.location_id},
        location=config.location_id,
    )
    node = Node(config, elector=elector)
    node.origins.secrets = cluster_secrets(config, store)
    node.config_source = SharedConfig(store, config.mappings, on_error=lambda e: node.audit.config_change(action="invalid", error=e))
    return node
