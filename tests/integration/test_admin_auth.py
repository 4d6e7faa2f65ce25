"""Who may act through a node's admin API: a real two-node cluster on real etcd, real sockets.

Before the fix anyone who reached the admin port could hand the master over (`POST /switch`,
also as a browser page's cross-origin form post) and read the audit records.
"""

from __future__ import annotations

import json

import trio

from connector.admin import http_request
from connector.clusterctl import collect_status
from connector.config import load_node_config
from tests.integration.test_cluster_admin import cli, start_cluster
from tests.support.stack import SUBACCOUNT, node_toml, start_node, start_stack


async def test_switch_and_audit_need_the_token_and_probes_stay_open(nursery, tmp_path, etcd):
    stack, nodes, paths = await start_cluster(nursery, tmp_path, etcd)
    token = stack.certs["admin_token"].read_text().strip()
    master = next(n for n in nodes if n.role == "master")
    shadow = next(n for n in nodes if n is not master)
    epoch = master.registered_epoch
    port = master.admin_port

    bearer = [("authorization", f"Bearer {token}")]
    refused = [
        ([], 401),  # no token
        ([("authorization", "Bearer not-the-token")], 401),
        ([("authorization", f"Basic {token}")], 401),
        # a page elsewhere posting to us (the token would not be sent by a browser; even so)
        ([*bearer, ("origin", "http://evil.example")], 403),
        ([("origin", "http://evil.example"), ("content-type", "application/x-www-form-urlencoded")], 403),
        ([*bearer, ("content-type", "text/plain")], 415),
    ]
    for headers, expected in refused:
        code, body = await http_request("127.0.0.1", port, "/switch", method="POST", headers=headers)
        assert code == expected, (headers, body)
    # a DNS-rebinding page: its own name resolving to our address
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"POST /switch HTTP/1.1\r\nhost: rebind.evil.example:{port}\r\n"
                          f"authorization: Bearer {token}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := await stream.receive_some(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 421 ")
    # nothing was switched
    assert master.role == "master" and master.registered_epoch == epoch
    assert stack.cloud.registry.master_of(SUBACCOUNT, "").node == master.config.node_id

    # the audit trail and the status are for the token holder only
    for path in ("/audit", "/status"):
        code, _ = await http_request("127.0.0.1", port, path)
        assert code == 401, path
        code, body = await http_request("127.0.0.1", port, path, token=token)
        assert code == 200, path
    # probes, load balancers and Prometheus need nothing
    for node in nodes:
        for path in ("/healthz", "/metrics", "/readyz?want=any"):
            code, _ = await http_request("127.0.0.1", node.admin_port, path)
            assert code == 200, path

    # the CLI reads the token file named in the node configuration
    rows, leader = await collect_status(load_node_config(paths[0]))
    assert leader is not None and {r["tunnel"] for r in rows} == {"registered", "standby"}
    switched = await trio.to_thread.run_sync(cli, "switch", "--config", str(paths[1]))
    assert switched.returncode == 0, switched.stderr
    with trio.fail_after(10):
        await shadow.wait_registered()
    assert stack.cloud.registry.master_of(SUBACCOUNT, "").node == shadow.config.node_id
    status = await trio.to_thread.run_sync(cli, "status", "--json", "--config", str(paths[0]))
    assert status.returncode == 0, status.stderr
    assert {json.loads(line)["tunnel"] for line in status.stdout.decode().splitlines()} == {"registered", "standby"}

    # another cluster's token: status says why it sees no tunnel
    other = tmp_path / "other.token"
    other.write_text("another-clusters-admin-token-0123\n")
    other.chmod(0o600)
    config = load_node_config(paths[0])
    wrong = paths[0].with_name("wrong-token.toml")
    wrong.write_text(paths[0].read_text().replace(str(config.admin_token_file), str(other)))
    status = await trio.to_thread.run_sync(cli, "status", "--config", str(wrong))
    assert status.returncode == 0
    assert status.stderr.count(b"refused our /status (401): is [admin] token_file") == 2


async def test_without_a_token_file_the_guarded_routes_refuse_everyone(nursery, tmp_path):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    token = stack.certs["admin_token"].read_text().strip()
    certs = {k: v for k, v in stack.certs.items() if k != "admin_token"}
    path = node_toml(tmp_path, certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp)
    assert load_node_config(path).admin_token is None
    node = await start_node(nursery, stack, path)
    code, body = await http_request("127.0.0.1", node.admin_port, "/switch", method="POST", token=token)
    assert code == 403 and json.loads(body)["error"] == "admin_token_not_configured"
    code, _ = await http_request("127.0.0.1", node.admin_port, "/healthz")
    assert code == 200
    switch = await trio.to_thread.run_sync(cli, "switch", "--config", str(path))
    assert switch.returncode == 2 and b"token_file is not set" in switch.stderr
