"""What operators deploy and rehearse with: deploy/ (systemd, compose, kubernetes, chaos).

The example and bundled configurations must load with connector.config's own loaders (with
placeholder certificate files in a temporary directory), the YAML must have the structure its
consumers need, and the chaos drill's pure helpers compute what the report claims.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector import pki
from connector.cloud.auth import hash_token
from connector.config import load_cloud_config, load_node_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
KUBE = DEPLOY / "kubernetes"
DRILL = DEPLOY / "chaos" / "drill.py"
REPLICAS = ("cloud-1", "cloud-2")
GOAWAY_SECONDS = 5.0  # a replica's stop beyond notice + drain: GOAWAY to the nodes (ping_timeout 3 s)
HANDOVER_HANDSHAKES = 6.0  # node shutdown beyond drain_seconds: drain 2 s, resign 2 s, close 1 s, leave 1 s


def _placeholders(text: str, root: Path) -> str:
    """Rewrite absolute deploy paths into `root`, create their directories (as systemd's
    StateDirectory/LogsDirectory do) and every referenced certificate and key file: one CA
    certificate for every .pem and its key for every .key, so `--check` can load each pair."""
    ca = pki.create_ca(root / "generated", "ca", "placeholder CA", force=True)
    for prefix in ("/etc/connector/certs/", "/certs/", "/run/connector/", "/var/lib/connector/", "/var/log/connector/"):
        text = text.replace(f'"{prefix}', f'"{root}{prefix}')
        (root / prefix.strip("/")).mkdir(parents=True, exist_ok=True)
    for match in re.findall(r'"([^"]+\.(?:pem|key))"', text):
        path = Path(match) if Path(match).is_absolute() else root / match
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((ca.cert_path if path.suffix == ".pem" else ca.key_path).read_bytes())
    for match in re.findall(r'"([^"]+\.token)"', text):  # admin tokens: private, long enough
        path = Path(match) if Path(match).is_absolute() else root / match
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder-admin-token-0123456789\n")
        path.chmod(0o600)
    return text


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(_placeholders(text, tmp_path))
    return path


# --- example and bundled configurations --------------------------------------------------------

def test_example_cloud_config_loads(tmp_path: Path) -> None:
    config = load_cloud_config(_write(tmp_path, "cloud.toml", (DEPLOY / "examples" / "cloud.toml").read_text()))
    assert (config.http_listen.port, config.socks5_listen.port, config.tunnel_listen.port) == (20003, 20004, 8443)
    assert config.subaccounts[0].locations == ("", "plant-2")
    assert config.state_file is not None


def test_example_node_config_loads_with_cluster_timings(tmp_path: Path) -> None:
    config = load_node_config(_write(tmp_path, "node.toml", (DEPLOY / "examples" / "node.toml").read_text()))
    assert config.node_id == "node-a"
    assert config.cluster is not None and len(config.cluster.etcd.endpoints) == 3
    assert config.cluster.timing.ttl == 3
    assert [m.name for m in config.mappings] == ["erp.virtual:8000", "hr.virtual:443", "db.virtual:5432"]
    assert config.admin_listen.host not in ("0.0.0.0", "127.0.0.1")  # shadows on other hosts probe it


def test_example_cloud_token_hash_is_a_placeholder_not_a_known_token() -> None:
    text = (DEPLOY / "examples" / "cloud.toml").read_text()
    for guess in ("", "test", "token", "changeme", "demo", "secret"):
        assert hash_token(guess) not in text


def test_compose_configs_load_and_token_matches(tmp_path: Path) -> None:
    compose_text = (COMPOSE / "docker-compose.yml").read_text()
    token = re.search(r"Bearer (compose-demo-token[\w-]*)", compose_text)
    assert token is not None
    for replica in REPLICAS:
        cloud = load_cloud_config(_write(tmp_path, f"{replica}.toml", (COMPOSE / "config" / f"{replica}.toml").read_text()))
        assert cloud.subaccounts[0].token_sha256 == (hash_token(token.group(1)),)
        assert cloud.replica is not None and cloud.shared is not None
        assert (cloud.replica.id, cloud.replica.tunnel_url) == (replica, f"wss://{replica}:8443/tunnel")
        assert cloud.shared.etcd.endpoints == ("http://cloud-etcd:2379",)
    for node in ("node-a", "node-b"):
        config = load_node_config(_write(tmp_path, f"{node}.toml", (COMPOSE / "config" / f"{node}.toml").read_text()))
        assert config.node_id == node
        assert config.admin_listen.host == node  # resolvable by the other containers
        assert config.tunnel_url == "wss://cloud-tunnel:8443/tunnel"  # both replicas' network alias


def _kube_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d is not None]


def _configmap(name: str) -> dict[str, str]:
    for file in ("cloud.yaml", "nodes.yaml"):
        for doc in _kube_docs(file):
            if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
                return dict(doc["data"])
    raise AssertionError(f"no ConfigMap {name}")


def _cloud_toml_of_a_pod() -> str:
    """The cloud ConfigMap's template as the init container renders it for one pod."""
    template = _configmap("connector-cloud-config")["cloud.toml.template"]
    return template.replace("__POD_NAME__", "connector-cloud-5d8f-x2k").replace("__POD_IP__", "10.1.2.9")


def test_kubernetes_configmaps_load(tmp_path: Path) -> None:
    cloud = load_cloud_config(_write(tmp_path, "cloud.toml", _cloud_toml_of_a_pod()))
    assert cloud.shared is not None
    assert cloud.shared.etcd.endpoints and all(".cloud-etcd.connector.svc:2379" in url for url in cloud.shared.etcd.endpoints)
    template = _configmap("connector-node-config")["node.toml.template"]
    rendered = template.replace("__NODE_ID__", "connector-node-1").replace("__POD_IP__", "10.1.2.3")
    config = load_node_config(_write(tmp_path, "node.toml", rendered))
    assert config.node_id == "connector-node-1"
    assert (config.admin_listen.host, config.admin_listen.port) == ("10.1.2.3", 8081)
    assert config.tunnel_cert.name == "node-connector-node-1.pem"


# --- systemd -------------------------------------------------------------------------------------

def _unit(name: str) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order (systemd allows repeated keys)."""
    result: dict[str, list[str]] = {}
    section = ""
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not key=value: {line!r}"
        result.setdefault(f"{section}.{key}", []).append(value)
    return result


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.mark.parametrize("name", ["connector-cloud.service", "connector-cloud@.service", "connector-node@.service"])
def test_systemd_units_are_hardened(name: str) -> None:
    unit = _unit(name)
    expected = {
        "Service.NoNewPrivileges": ["yes"], "Service.ProtectSystem": ["strict"], "Service.PrivateTmp": ["yes"],
        "Service.CapabilityBoundingSet": [""], "Service.Restart": ["on-failure"], "Service.KillSignal": ["SIGTERM"],
        "Service.User": ["connector"], "Service.RestartPreventExitStatus": ["2"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert set(unit["Service.ReadWritePaths"][0].split()) == {"/var/lib/connector", "/var/log/connector"}
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_node_unit_instance_is_node_id_and_stop_timeout_covers_the_drain(tmp_path: Path) -> None:
    unit = _unit("connector-node@.service")
    assert unit["Service.ExecStart"] == ["/opt/connector/bin/connector node --config /etc/connector/%i.toml"]
    drain = load_node_config(_write(tmp_path, "node.toml", (DEPLOY / "examples" / "node.toml").read_text())).drain_seconds
    assert _seconds(unit["Service.TimeoutStopSec"][0]) >= drain + HANDOVER_HANDSHAKES
    assert _seconds(_unit("connector-cloud.service")["Service.TimeoutStopSec"][0]) >= 5.0 + 5  # hold_seconds + streams


@pytest.mark.parametrize("name", ["connector-cloud.service", "connector-cloud@.service"])
def test_cloud_units_stop_timeout_covers_the_drain(tmp_path: Path, name: str) -> None:
    drain = load_cloud_config(_write(tmp_path, "cloud.toml", (DEPLOY / "examples" / "cloud.toml").read_text())).drain
    assert _seconds(_unit(name)["Service.TimeoutStopSec"][0]) >= drain.notice_seconds + drain.drain_seconds + GOAWAY_SECONDS


def test_cloud_replica_unit_instance_is_the_replica() -> None:
    unit = _unit("connector-cloud@.service")
    assert unit["Service.ExecStart"] == ["/opt/connector/bin/connector cloud --config /etc/connector/%i.toml"]


@pytest.mark.parametrize(("unit_name", "example"), [("connector-cloud.service", "cloud.toml"),
                                                     ("connector-node@.service", "node.toml")])
def test_exec_start_pre_exits_2_on_a_bad_config_so_systemd_does_not_loop(
    tmp_path: Path, unit_name: str, example: str
) -> None:
    """ExecStartPre's config check must exit with RestartPreventExitStatus (2) on a broken file."""
    unit = _unit(unit_name)
    (pre,) = unit["Service.ExecStartPre"]
    argv = pre.split()
    assert argv[0] == "/opt/connector/bin/connector" and argv[-1] == "--check"
    good = _write(tmp_path, example, (DEPLOY / "examples" / example).read_text())
    if example == "node.toml":  # --check compares the node's certificate with its configuration
        config = load_node_config(good)
        ca = pki.create_ca(tmp_path / "ca", "acme-ca", "acme connector CA")
        issued = pki.issue(ca, tmp_path / "ca", "node", common_name=config.node_id, organization=config.subaccount,
                           cluster=config.cluster.name if config.cluster else None, client=True)
        shutil.copy(issued.cert_path, config.tunnel_cert)
        shutil.copy(issued.key_path, config.tunnel_key)  # --check also loads the pair
    bad = tmp_path / f"broken-{example}"
    bad.write_text(good.read_text().replace("[tunnel]", "[tunnel]\nunknown_key = 1", 1))
    config_at = argv.index("--config") + 1
    for path, status in ((good, 0), (bad, 2)):
        command = [sys.executable, "-m", "connector", *argv[1:config_at], str(path), *argv[config_at + 1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == status, (command, result.stderr)
    assert unit["Service.RestartPreventExitStatus"] == ["2"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_finds_only_the_missing_install(tmp_path: Path) -> None:
    node = tmp_path / "connector-node@node-a.service"
    shutil.copy(DEPLOY / "systemd" / "connector-node@.service", node)
    replica = tmp_path / "connector-cloud@cloud-1.service"
    shutil.copy(DEPLOY / "systemd" / "connector-cloud@.service", replica)
    units = [str(node), str(replica), str(DEPLOY / "systemd" / "connector-cloud.service"),
             str(DEPLOY / "systemd" / "connector-etcd.service")]
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "/opt/connector/bin/" not in line]  # not installed on a build machine
    assert complaints == []


# --- compose -------------------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_compose_services_images_ports_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"etcd-1", "etcd-2", "etcd-3", "certs", "cloud-1", "cloud-2", "cloud-etcd", "haproxy", "node-a", "node-b",
            "backend", "prometheus", "grafana"} <= set(services)
    named = set(compose["volumes"])
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (COMPOSE / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for port in service.get("ports", []):
            host, published, target = port.split(":")
            assert host == "127.0.0.1", f"{name}: publish on loopback only"
            assert published.isdigit() and target.isdigit()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    published = {p.split(":")[1] for p in services["haproxy"]["ports"]}
    assert {"20003", "20004", "20005"} <= published
    assert services["node-a"]["stop_grace_period"] == "30s"


def test_compose_two_replicas_behind_haproxy(tmp_path: Path) -> None:
    """The committed haproxy.cfg is what connector.haproxy renders for the two replicas, both
    replicas answer to the nodes' tunnel name, and their stop grace covers the drain."""
    from connector import haproxy

    services = _compose()["services"]
    backends = [haproxy.Backend(r, r, 20003, 20004, 20005, 20006) for r in REPLICAS]
    expected = haproxy.render_config(haproxy.Front("0.0.0.0", 20003, 20004, 20005), backends, maxconn=10000,
                                     nameservers=["127.0.0.11:53"])
    assert (COMPOSE / "haproxy.cfg").read_text() == expected
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]
    for replica in REPLICAS:
        service = services[replica]
        assert service["networks"]["default"]["aliases"] == ["cloud-tunnel"]
        drain = load_cloud_config(_write(tmp_path, f"{replica}.toml",
                                         (COMPOSE / "config" / f"{replica}.toml").read_text())).drain
        grace = _seconds(service["stop_grace_period"])
        assert grace >= drain.notice_seconds + drain.drain_seconds + GOAWAY_SECONDS
        assert drain.notice_seconds >= 2 * haproxy.CHECK_FALL * haproxy.CHECK_INTERVAL_MS / 1000


def test_compose_etcd_is_a_three_member_cluster() -> None:
    services = _compose()["services"]
    initial = services["etcd-1"]["environment"]["ETCD_INITIAL_CLUSTER"]
    for member in ("etcd-1", "etcd-2", "etcd-3"):
        assert f"{member}=http://{member}:2380" in initial
        assert f"--name={member}" in services[member]["command"]


def test_compose_prometheus_scrapes_every_component_and_loads_the_rules() -> None:
    services = _compose()["services"]
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"cloud-1:20006", "cloud-2:20006", "node-a:8081", "node-b:8081", "etcd-1:2381", "etcd-2:2381",
            "etcd-3:2381"} <= targets
    cloud = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "connector-cloud")
    assert [c["labels"]["replica"] for c in cloud["static_configs"]] == list(REPLICAS)  # docs/metrics.md
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    rule_mount = mounts["../../grafana/alerts/connector-rules.yml"]
    assert prometheus["rule_files"] == [rule_mount]
    assert (COMPOSE / "../../grafana/alerts/connector-rules.yml").is_file()
    grafana = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana["../../grafana/provisioning"] == "/etc/grafana/provisioning"
    env = services["grafana"]["environment"]
    assert env["CONNECTOR_DASHBOARDS_DIR"] == grafana["../../grafana/dashboards"]
    assert env["PROMETHEUS_URL"] == "http://prometheus:9090"


def test_compose_config_admin_ports_match_the_scrape_targets() -> None:
    for replica in REPLICAS:
        assert 'listen = "0.0.0.0:20006"' in (COMPOSE / "config" / f"{replica}.toml").read_text()
    for node in ("node-a", "node-b"):
        assert f'listen = "{node}:8081"' in (COMPOSE / "config" / f"{node}.toml").read_text()


def test_dockerfile_copies_what_exists_and_drops_root() -> None:
    lines = [line.strip() for line in (COMPOSE / "Dockerfile").read_text().splitlines()]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), source
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any(line.startswith("RUN pip install .") for line in lines)


def _compose_client() -> list[str] | None:
    """`docker compose` (v2 plugin) or Debian's `docker-compose`; both validate without an engine."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        try:
            if subprocess.run([*command, "version"], capture_output=True, timeout=20).returncode == 0:
                return command
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.mark.skipif(_compose_client() is None, reason="no `docker compose` or `docker-compose` client")
def test_docker_compose_config_is_valid() -> None:
    client = _compose_client()
    assert client is not None
    result = subprocess.run([*client, "-f", str(COMPOSE / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_docker_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no `docker compose` or `docker-compose` client")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  cloud:\n    image: x\n    ports: 20003\n")
    result = subprocess.run([*client, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


# --- kubernetes ----------------------------------------------------------------------------------

MANIFESTS = ["namespace.yaml", "etcd.yaml", "cloud-etcd.yaml", "cloud.yaml", "nodes.yaml"]


def _all_manifests() -> list[dict[str, Any]]:
    return [doc for name in MANIFESTS for doc in _kube_docs(name)]


def test_every_kubernetes_document_has_api_version_kind_and_name() -> None:
    docs = _all_manifests()
    assert len(docs) >= 10
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_kubernetes_probes_point_at_readyz_and_healthz() -> None:
    workloads = [d for d in _all_manifests() if d["kind"] in ("Deployment", "StatefulSet")
                 and d["metadata"]["name"] not in ("etcd", "cloud-etcd")]
    assert {d["metadata"]["name"] for d in workloads} == {"connector-cloud", "connector-node"}
    for doc in workloads:
        for container in _containers(doc):
            ports = {p["name"] for p in container["ports"]}
            assert container["readinessProbe"]["httpGet"]["path"].split("?")[0] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["port"] == "admin" in ports
            assert container["livenessProbe"]["httpGet"]["port"] == "admin"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _all_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_kubernetes_nodes_statefulset_anti_affinity_pdb_and_grace(tmp_path: Path) -> None:
    nodes = _one("StatefulSet", "connector-node")
    assert 2 <= nodes["spec"]["replicas"] <= 3
    pod = nodes["spec"]["template"]["spec"]
    required = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert required["labelSelector"]["matchLabels"] == nodes["spec"]["selector"]["matchLabels"]
    pdb = _one("PodDisruptionBudget", "connector-node")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == nodes["spec"]["selector"]
    template = _configmap("connector-node-config")["node.toml.template"].replace("__NODE_ID__", "n").replace("__POD_IP__", "10.0.0.1")
    drain = load_node_config(_write(tmp_path, "node.toml", template)).drain_seconds
    assert pod["terminationGracePeriodSeconds"] >= drain + HANDOVER_HANDSHAKES
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"connector-node-certs"}


def test_kubernetes_cloud_replicas_roll_without_going_below_two_ready(tmp_path: Path) -> None:
    cloud = _one("Deployment", "connector-cloud")
    spec, pod = cloud["spec"], cloud["spec"]["template"]["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["replicas"] - spec["strategy"]["rollingUpdate"]["maxUnavailable"] >= 2
    pdb = _one("PodDisruptionBudget", "connector-cloud")
    assert pdb["spec"]["minAvailable"] == 2 and pdb["spec"]["selector"] == spec["selector"]
    required = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert required["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    drain = load_cloud_config(_write(tmp_path, "cloud.toml", _cloud_toml_of_a_pod())).drain
    assert pod["terminationGracePeriodSeconds"] >= drain.notice_seconds + drain.drain_seconds + GOAWAY_SECONDS
    (container,) = _containers(cloud)
    probe = container["readinessProbe"]  # the Service drops a draining replica within the notice
    assert probe["periodSeconds"] * probe["failureThreshold"] <= drain.notice_seconds
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]  # 3 pods: no shared RWO volume
    headless = _one("Service", "connector-cloud-replicas")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert headless["spec"]["selector"] == spec["selector"]["matchLabels"]
    node_template = _configmap("connector-node-config")["node.toml.template"]
    assert 'url = "wss://connector-cloud-replicas.connector.svc:8443/tunnel"' in node_template


def test_kubernetes_cloud_etcd_is_its_own_three_member_cluster() -> None:
    etcd = _one("StatefulSet", "cloud-etcd")
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["serviceName"] == "cloud-etcd"
    command = " ".join(_containers(etcd)[0]["command"])
    assert "--initial-cluster=cloud-etcd-0=http://cloud-etcd-0.cloud-etcd.connector.svc:2380" in command
    assert "etcd.connector.svc" not in command.replace("cloud-etcd.connector.svc", "")  # never the nodes' etcd
    assert _one("PodDisruptionBudget", "cloud-etcd")["spec"]["minAvailable"] == 2


def test_kubernetes_cloud_services_and_secret() -> None:
    cloud = _one("Deployment", "connector-cloud")
    pod = cloud["spec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {"connector-cloud-tls"}
    assert pod["terminationGracePeriodSeconds"] >= 10
    selector = cloud["spec"]["selector"]["matchLabels"]
    ports = set()
    for doc in _all_manifests():
        if doc["kind"] == "Service" and doc["spec"].get("selector") == selector:
            ports |= {p["port"] for p in doc["spec"]["ports"]}
    assert {20003, 20004, 8443, 20006} <= ports


# --- chaos drill -----------------------------------------------------------------------------------

def _drill() -> Any:
    spec = importlib.util.spec_from_file_location("connector_chaos_drill", DRILL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


drill = _drill()


@pytest.mark.parametrize("argv", [[], ["kill-master"], ["freeze-master"], ["handover"], ["etcd-outage"]])
def test_drill_help_runs(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, str(DRILL), *argv, "--help"], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: drill.py" in result.stdout
    if argv in (["freeze-master"], ["etcd-outage"]):
        assert "SECONDS" in result.stdout


STATE = {
    "workdir": "/tmp/x", "pid": 1, "subaccount": "demo", "location_id": "", "token": "tok",
    "etcd": {"pid": 11, "client_url": "http://127.0.0.1:2379"},
    "cloud": {"pid": 12, "admin_port": 20006, "http_proxy_port": 20003},
    "nodes": {"node-a": {"pid": 13, "admin_port": 8081, "config": "/tmp/x/node-a.toml"},
              "node-b": {"pid": 14, "admin_port": 8082, "config": "/tmp/x/node-b.toml"}},
}


def test_parse_state_reads_the_demo_state_file() -> None:
    target = drill.parse_state(json.dumps(STATE))
    assert (target.cloud_admin_port, target.http_proxy_port, target.etcd_pid) == (20006, 20003, 11)
    assert target.nodes["node-b"] == drill.NodeInfo("node-b", 14, 8082, "/tmp/x/node-b.toml")
    assert (target.subaccount, target.location_id, target.token, target.host) == ("demo", "", "tok", "127.0.0.1")
    without_etcd = dict(STATE, etcd={})
    assert drill.parse_state(json.dumps(without_etcd)).etcd_pid is None


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({k: v for k, v in STATE.items() if k != "nodes"}), "missing 'nodes'"),
    (json.dumps(dict(STATE, nodes={})), "'nodes' is empty"),
    (json.dumps(dict(STATE, cloud={"admin_port": 1})), "missing 'cloud.http_proxy_port'"),
    (json.dumps(dict(STATE, cloud={"admin_port": "x", "http_proxy_port": 1})), "'cloud.admin_port' must be int"),
    (json.dumps(dict(STATE, nodes={"n": {"pid": True, "admin_port": 1}})), "'nodes.n.pid' must be int"),
    (json.dumps(dict(STATE, token=None)), "'token' must be str"),
])
def test_parse_state_rejects_bad_input_with_the_key(text: str, message: str) -> None:
    with pytest.raises(drill.DrillError, match=re.escape(message)):
        drill.parse_state(text, source="s.json")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert drill.require_loopback(host) == host


@pytest.mark.parametrize("host", ["10.0.0.1", "0.0.0.0", "example.com", "cloud"])
def test_other_hosts_are_refused(host: str) -> None:
    with pytest.raises(drill.DrillError, match="loopback only"):
        drill.parse_state(json.dumps(STATE), host=host)


def test_master_of_reads_the_cloud_status() -> None:
    status = {"locations": [
        {"subaccount": "demo", "location_id": "plant", "master": "node-x", "epoch": 9, "tunnels": []},
        {"subaccount": "demo", "location_id": "", "master": "node-a", "epoch": 7, "tunnels": []},
    ]}
    assert drill.master_of(status, "demo", "") == ("node-a", 7)
    assert drill.master_of(status, "other", "") == (None, None)
    with pytest.raises(drill.DrillError, match="locations"):
        drill.master_of({"error": "x"}, "demo", "")


def _samples(*rows: tuple[float, str | None, int | None]) -> list[Any]:
    return [drill.MasterSample(at, master, epoch) for at, master, epoch in rows]


def test_takeover_is_fault_to_first_success_after_another_master_is_named() -> None:
    samples = _samples((9.9, "a", 1), (10.05, "a", 1), (10.3, None, None), (10.45, "b", 2), (10.5, "b", 2))
    results = [
        drill.RequestResult(9.8, 9.81, True, "200"),
        drill.RequestResult(10.0, 10.2, False, "502"),      # in flight on the dead master
        drill.RequestResult(10.1, 10.40, True, "200"),      # completed before the change was seen
        drill.RequestResult(10.2, 10.47, True, "200"),      # held, served by b: the takeover
        drill.RequestResult(10.5, 10.51, True, "200"),
    ]
    report = drill.analyse("kill-master", fault_at=10.0, fault_seconds=0.0, old_master="a", old_epoch=1,
                           samples=samples, results=results)
    assert (report.new_master, report.new_epoch) == ("b", 2)
    assert report.master_changed_after == pytest.approx(0.45)
    assert report.takeover_seconds == pytest.approx(0.47)
    assert (report.requests, report.succeeded, report.failed, report.failures) == (5, 4, 1, {"502": 1})
    assert report.max_latency == pytest.approx(0.30)
    text = drill.format_report(report)
    assert "a (epoch 1) -> b (epoch 2)" in text and "1 x 502" in text and "0.470 s" in text
    assert json.loads(json.dumps(report.to_dict()))["takeover_seconds"] == pytest.approx(0.47)


def test_no_master_change_means_no_takeover() -> None:
    samples = _samples((0.0, "a", 1), (1.0, "a", 1), (2.0, None, None))
    results = [drill.RequestResult(0.5, 0.6, True, "200")]
    report = drill.analyse("etcd-outage", fault_at=0.2, fault_seconds=3.0, old_master="a", old_epoch=1,
                           samples=samples, results=results)
    assert (report.new_master, report.master_changed_after, report.takeover_seconds) == (None, None, None)
    assert "unchanged" in drill.format_report(report)
    assert drill.first_master_change(_samples((1.0, "b", 2)), 2.0, "a") is None  # before the fault
    assert drill.takeover_time(0.0, drill.MasterSample(1.0, "b", 2), [drill.RequestResult(0, 0.5, True, "200")]) is None


def test_percentile_is_nearest_rank() -> None:
    assert drill.percentile([], 0.99) is None
    assert drill.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert drill.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert drill.percentile([5.0], 0.99) == 5.0


def test_check_process_refuses_wrong_or_missing_pids() -> None:
    drill.check_process(os.getpid(), "python", "this test")  # our own command line names python
    with pytest.raises(drill.DrillError, match="not etcd"):
        drill.check_process(os.getpid(), "etcd-binary-that-is-not-us", "etcd")
    with pytest.raises(drill.DrillError, match="is not running"):
        drill.check_process(2**22 + 12345, "connector", "connector node x")  # above pid_max on Linux


def test_drill_main_reports_bad_input_without_acting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    state.write_text("{}")
    assert drill.main(["kill-master", "--state-file", str(state)]) == 2
    assert "missing 'nodes'" in capsys.readouterr().err
    assert drill.main(["kill-master", "--state-file", str(tmp_path / "nope.json")]) == 2
    assert "cannot read state file" in capsys.readouterr().err
    assert drill.main(["freeze-master", "0", "--state-file", str(state)]) == 2
    assert "SECONDS" in capsys.readouterr().err
    assert drill.main(["handover", "--concurrency", "0", "--state-file", str(state)]) == 2
    assert "--concurrency" in capsys.readouterr().err
    state.write_text(json.dumps(STATE))
    assert drill.main(["etcd-outage", "1", "--host", "192.0.2.1", "--state-file", str(state)]) == 2
    assert "loopback only" in capsys.readouterr().err


# --- docs ------------------------------------------------------------------------------------------

def test_configuration_doc_names_every_key_the_loaders_read() -> None:
    import attrs

    from connector.agent.acl import Mapping, Resource
    from ha.timing import HATiming

    source = (REPO / "connector" / "config.py").read_text()
    keys = set(re.findall(r'\.(?:str|int|float|bool|str_list|path|listen|sub|subs)\("(\w+)"', source))
    keys |= {f.name for cls in (HATiming, Mapping, Resource) for f in attrs.fields(cls)}
    keys -= {"port_count"}  # Mapping's, derived from a "first-last" virtual_port (documented there)
    assert {"state_file", "hold_max", "drain_seconds", "ttl", "websocket_upgrade"} <= keys
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in doc and f"`[{k}]`" not in doc and f"`[[{k}]]`" not in doc)
    assert missing == []
