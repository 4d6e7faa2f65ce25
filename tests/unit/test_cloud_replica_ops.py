"""Pure parts of running cloud replicas: the drain state, readiness, [drain] settings, the HAProxy
configuration and the demo's scrape targets. The processes themselves: tests/integration/
test_cloud_drain.py, test_demo_replicas.py and tests/failover/test_cloud_rolling.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from connector import haproxy
from connector.cloud.drain import Drain
from connector.config import ConfigError, load_cloud_config
from connector.readiness import CloudState, cloud_readiness
from tests.support.prometheus import config as prometheus_config
from tests.support.prometheus import scrape_targets

SHA = "a" * 64
CLOUD = f"""
[tunnel]
cert = "server.pem"
key = "server.key"
[[subaccounts]]
id = "acme"
ca = "ca.pem"
token_sha256 = ["{SHA}"]
"""


# --- Drain -----------------------------------------------------------------------------------

async def test_stop_accepting_cancels_idle_waits_and_listeners_but_not_requests() -> None:
    drain = Drain()
    outcomes: list[str] = []

    async def idle_connection() -> None:
        with drain.connection(), drain.while_idle() as idle:
            await trio.sleep_forever()
        outcomes.append("idle closed" if idle.cancelled_caught else "idle ended")

    async def listener() -> None:
        with drain.accepting_scope() as scope:
            await trio.sleep_forever()
        outcomes.append("listener closed" if scope.cancelled_caught else "listener ended")

    async def request(done: trio.Event) -> None:
        with drain.connection():
            await done.wait()
        outcomes.append("request finished")

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_connection)
        nursery.start_soon(listener)
        nursery.start_soon(request, done)
        await drain.wait_connections(2)
        drain.begin()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == [] and drain.statistics().draining and drain.accepting  # phase 1 closes nothing
        drain.stop_accepting()
        await drain.wait_stopped_accepting()
        await drain.wait_connections(1)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(outcomes) == ["idle closed", "listener closed"]
        done.set()
        await drain.wait_connections(0)
    assert outcomes[-1] == "request finished"
    assert drain.statistics().connections == 0


async def test_a_wait_that_starts_after_stop_accepting_is_cancelled_at_once() -> None:
    drain = Drain()
    drain.stop_accepting()
    with drain.while_idle() as idle:
        await trio.sleep_forever()
    with drain.accepting_scope() as accepting:
        await trio.sleep_forever()
    assert idle.cancelled_caught and accepting.cancelled_caught


# --- readiness -------------------------------------------------------------------------------

@pytest.mark.parametrize(("state", "ready", "reason"), [
    (CloudState(), True, "serving"),
    (CloudState(draining=True), False, "draining: shutting down, finishing the requests under way"),
])
def test_cloud_readiness(state: CloudState, ready: bool, reason: str) -> None:
    result = cloud_readiness(state)
    assert (result.ready, result.reason) == (ready, reason)


# --- configuration ---------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_text("placeholder")
    return tmp_path


def _write(files: Path, text: str) -> Path:
    path = files / "cloud.toml"
    path.write_text(text)
    return path


def test_drain_replica_and_shared_defaults(files: Path) -> None:
    config = load_cloud_config(_write(files, CLOUD))
    assert (config.drain.notice_seconds, config.drain.drain_seconds) == (2.0, 20.0)
    assert config.replica is not None
    assert config.replica.id == socket.gethostname() and config.replica.tunnel_url is None
    assert config.shared is None


def test_drain_replica_and_shared_are_read(files: Path) -> None:
    config = load_cloud_config(_write(files, CLOUD + """
[drain]
notice_seconds = 0
drain_seconds = 5.5
[replica]
id = "cloud-7"
tunnel_url = "wss://cloud-7.example:8443/tunnel"
[shared]
etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
prefix = "/c"
"""))
    assert (config.drain.notice_seconds, config.drain.drain_seconds) == (0.0, 5.5)
    assert config.replica is not None and config.shared is not None
    assert (config.replica.id, config.replica.tunnel_url) == ("cloud-7", "wss://cloud-7.example:8443/tunnel")
    assert (config.shared.etcd.endpoints, config.shared.prefix) == (("http://10.0.0.1:2379", "http://10.0.0.2:2379"), "/c")


@pytest.mark.parametrize(("extra", "key", "message"), [
    ('[destinations]\n[shared]\netcd = ["http://10.0.0.1:2379"]\n', "shared.secrets_key", "is required"),
    ("[drain]\nnotice_seconds = -1\n", "drain.notice_seconds", "must be zero or more"),
    ("[drain]\ndrain_seconds = \"long\"\n", "drain.drain_seconds", "must be"),
    ("[drain]\ngrace = 3\n", "drain.grace", "unknown key"),
])
def test_bad_drain_settings_are_refused_naming_the_key(files: Path, extra: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_cloud_config(_write(files, CLOUD + extra))
    assert key in str(info.value) and message in str(info.value)


def test_a_state_file_beside_shared_state_is_refused(files: Path) -> None:
    with pytest.raises(ConfigError, match="remove state_file"):
        load_cloud_config(_write(files, 'state_file = "epochs.json"\n' + CLOUD + '[shared]\netcd = ["http://10.0.0.1:2379"]\n'))


# --- HAProxy ---------------------------------------------------------------------------------

FRONT = haproxy.Front("127.0.0.1", 20003, 20004, 20005)
BACKENDS = [haproxy.Backend("cloud-1", "127.0.0.1", 31003, 31004, 31005, 31006),
            haproxy.Backend("cloud-2", "127.0.0.1", 32003, 32004, 32005, 32006)]


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            current = line
            sections[current] = []
        elif line.strip() and current:
            sections[current].append(line.strip())
    return sections


def test_each_service_is_a_tcp_frontend_checking_every_replicas_readyz() -> None:
    sections = _sections(haproxy.render_config(FRONT, BACKENDS, maxconn=1000))
    assert "mode tcp" in sections["defaults"]
    assert "option redispatch 1" in sections["defaults"] and "retries 3" in sections["defaults"]
    for name, port in (("http_proxy", 20003), ("socks5", 20004), ("destinations", 20005)):
        assert sections[f"frontend {name}"] == [f"bind 127.0.0.1:{port}", f"default_backend {name}_replicas"]
        backend = sections[f"backend {name}_replicas"]
        assert "option httpchk GET /readyz" in backend
        servers = [line for line in backend if line.startswith("server ")]
        assert servers == [f"server {b.name} 127.0.0.1:{b.port(name)} check port {b.admin_port}" for b in BACKENDS]
    default_server = next(line for line in sections["defaults"] if line.startswith("default-server"))
    assert f"inter {haproxy.CHECK_INTERVAL_MS}ms" in default_server and f"fall {haproxy.CHECK_FALL}" in default_server
    # a draining replica is out of rotation within a second
    assert haproxy.CHECK_INTERVAL_MS * haproxy.CHECK_FALL <= 1000


def test_sessions_of_a_replica_marked_down_are_never_shut() -> None:
    """Marked down = draining: its connections must run to their end (see connector.haproxy)."""
    assert "on-marked-down" not in haproxy.render_config(FRONT, BACKENDS)


def test_run_time_resolution_only_with_nameservers() -> None:
    assert "resolvers" not in haproxy.render_config(FRONT, BACKENDS)
    text = haproxy.render_config(FRONT, BACKENDS, nameservers=["127.0.0.11:53"])
    assert "nameserver ns1 127.0.0.11:53" in text and "resolvers dns" in text


def test_no_replica_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        haproxy.render_config(FRONT, [])


def test_maxconn_fits_the_file_limit() -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    maxconn = haproxy.fitting_maxconn()
    assert 64 <= maxconn <= 10000
    if hard != resource.RLIM_INFINITY:
        assert 2 * maxconn + 200 <= max(hard, 328)


@pytest.mark.skipif(shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
                    reason="haproxy not installed (apt-get install haproxy)")
def test_haproxy_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    binary = haproxy.find_haproxy()
    haproxy.check_config(binary, haproxy.write_config(tmp_path / "haproxy.cfg", FRONT, BACKENDS))
    broken = tmp_path / "broken.cfg"
    broken.write_text(haproxy.render_config(FRONT, BACKENDS).replace("mode tcp", "mode carrier-pigeon"))
    with pytest.raises(haproxy.HAProxyError, match="haproxy refuses"):
        haproxy.check_config(binary, broken)
    assert subprocess.run([binary, "-v"], capture_output=True, check=False).returncode == 0


def test_find_haproxy_names_the_package_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(haproxy.HAProxyError, match="apt-get install haproxy"):
        haproxy.find_haproxy(str(tmp_path / "no-haproxy"))


# --- the demo's scrape targets ---------------------------------------------------------------

def test_each_replica_is_scraped_once_with_its_replica_label() -> None:
    state = {
        "cloud": {"metrics_url": "http://127.0.0.1:1/metrics"},
        "cloud_replicas": [{"id": "cloud-1", "metrics_url": "http://127.0.0.1:1/metrics"},
                           {"id": "cloud-2", "metrics_url": "http://127.0.0.1:2/metrics"}],
        "nodes": {"node-a": {"metrics_url": "http://127.0.0.1:3/metrics"}},
    }
    jobs = {job["job_name"]: job["static_configs"] for job in prometheus_config(scrape_targets(state), [])["scrape_configs"]}
    assert jobs["cloud"] == [
        {"targets": ["127.0.0.1:1"], "labels": {"component": "cloud-1", "replica": "cloud-1"}},
        {"targets": ["127.0.0.1:2"], "labels": {"component": "cloud-2", "replica": "cloud-2"}},
    ]
    assert jobs["node"] == [{"targets": ["127.0.0.1:3"], "labels": {"component": "node-a"}}]
    single = {"cloud": {"metrics_url": "http://127.0.0.1:1/metrics"}}  # one cloud process: as before
    assert prometheus_config(scrape_targets(single), [])["scrape_configs"][0]["static_configs"] == [
        {"targets": ["127.0.0.1:1"], "labels": {"component": "cloud"}}]


def test_demo_refuses_zero_replicas_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connector.demo import run_demo

    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed: the demo checks it first")
    assert run_demo(state_file=None, workdir=tmp_path, cloud_replicas=0) == 2
    assert capsys.readouterr().err.strip() == "connector demo: --cloud-replicas 0: give 1 (one cloud process) or more"


def test_demo_writes_replica_tables_only_with_two_or_more(tmp_path: Path) -> None:
    from connector.cli import init_certs
    from connector.demo import DemoSpec, principal_certs, write_configs

    certs = init_certs(tmp_path / "certs", "demo", ["node-a"], ["127.0.0.1"])
    certs.update(principal_certs(tmp_path / "certs"))  # the demo's HTTPS internal host, as Demo.start does
    ports = {name: 1000 + i for i, name in enumerate([
        "tunnel", "http_proxy", "socks5_proxy", "cloud_admin", "destinations", "etcd_client", "backend_http", "backend_https",
        "backend_tcp", "node-a_admin", "cloud_etcd_client",
        *(f"cloud-{r}_{s}" for r in (1, 2) for s in ("tunnel", "admin", "http_proxy", "socks5", "destinations"))])}
    single = write_configs(tmp_path, certs, ports, SHA, DemoSpec(nodes=("node-a",)))
    assert set(single) == {"cloud", "node-a"}
    config = load_cloud_config(single["cloud"])
    assert config.shared is None and "[replica]" not in single["cloud"].read_text()
    (tmp_path / "state").mkdir(exist_ok=True)
    two = write_configs(tmp_path, certs, ports, SHA, DemoSpec(nodes=("node-a",), cloud_replicas=2))
    assert set(two) == {"cloud-1", "cloud-2", "node-a"}
    for replica in ("cloud-1", "cloud-2"):
        config = load_cloud_config(two[replica])
        assert config.replica is not None and config.shared is not None
        assert config.replica.id == replica
        assert config.replica.tunnel_url == f"wss://127.0.0.1:{ports[f'{replica}_tunnel']}/tunnel"
        assert config.shared.etcd.endpoints == (f"http://127.0.0.1:{ports['cloud_etcd_client']}",)
        assert config.http_listen.port == ports[f"{replica}_http_proxy"]
        assert config.state_file is None  # the fence is in the cloud's etcd
        assert config.shared.secrets_key == tmp_path / "state" / "cloud-secrets.key"  # one for all
    assert oct((tmp_path / "state" / "cloud-secrets.key").stat().st_mode & 0o777) == "0o600"
