"""deploy/chaos/drill.py's cloud drills: the state file of a cloud cluster, the replica to act on,
and the disruption line of the report (pure helpers; the drills themselves act on real processes)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

DRILL = Path(__file__).resolve().parents[2] / "deploy" / "chaos" / "drill.py"


def _drill() -> Any:
    spec = importlib.util.spec_from_file_location("connector_chaos_drill_cloud", DRILL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


drill = _drill()

STATE = {
    "workdir": "/tmp/x", "pid": 1, "subaccount": "demo", "location_id": "", "token": "tok",
    "etcd": {"pid": 11, "client_url": "http://127.0.0.1:2379"},
    "cloud": {"pid": 12, "admin_port": 20006, "http_proxy_port": 20003},
    "nodes": {"node-a": {"pid": 13, "admin_port": 8081, "config": "/tmp/x/node-a.toml"}},
    "front": {"pid": 20, "http_proxy_port": 20003, "socks5_port": 20004, "destinations_port": 20005},
    "cloud_replicas": [{"id": "cloud-1", "pid": 21, "admin_port": 9001, "tunnel_port": 9101},
                       {"id": "cloud-2", "pid": 22, "admin_port": 9002, "tunnel_port": 9102}],
    "cloud_etcd": {"pid": 23, "client_url": "http://127.0.0.1:2479"},
}


def test_parse_state_reads_the_replicas_and_the_cloud_etcd() -> None:
    target = drill.parse_state(json.dumps(STATE))
    assert target.replicas == {"cloud-1": drill.ReplicaInfo("cloud-1", 21, 9001),
                               "cloud-2": drill.ReplicaInfo("cloud-2", 22, 9002)}
    assert (target.cloud_etcd_pid, target.workdir) == (23, "/tmp/x")


def test_a_single_cloud_state_file_has_no_replicas() -> None:
    single = {k: v for k, v in STATE.items() if k not in ("front", "cloud_replicas", "cloud_etcd")}
    target = drill.parse_state(json.dumps(single))
    assert (target.replicas, target.cloud_etcd_pid) == ({}, None)
    with pytest.raises(drill.DrillError, match="no cloud replicas"):
        drill.pick_replica(target, None)


@pytest.mark.parametrize(("changes", "message"), [
    ({"cloud_replicas": {"id": "x"}}, "'cloud_replicas' must be a list"),
    ({"cloud_replicas": [{"pid": 1, "admin_port": 2}]}, "missing 'cloud_replicas.0.id'"),
    ({"cloud_replicas": [{"id": "c", "pid": "1", "admin_port": 2}]}, "'cloud_replicas.0.pid' must be int"),
    ({"cloud_etcd": {"client_url": "u"}}, "missing 'cloud_etcd.pid'"),
])
def test_bad_replica_entries_are_refused_with_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(drill.DrillError, match=re.escape(message)):
        drill.parse_state(json.dumps(dict(STATE, **changes)), source="s.json")


def test_pick_replica_defaults_to_the_last_and_names_the_known_ones() -> None:
    target = drill.parse_state(json.dumps(STATE))
    assert drill.pick_replica(target, None).name == "cloud-2"
    assert drill.pick_replica(target, "cloud-1").pid == 21
    with pytest.raises(drill.DrillError, match=re.escape("['cloud-1', 'cloud-2']")):
        drill.pick_replica(target, "cloud-9")


def test_report_carries_the_disruption_around_the_fault_window() -> None:
    results = [drill.RequestResult(9.9, 9.95, True, "200"), drill.RequestResult(10.0, 10.1, False, "502"),
               drill.RequestResult(10.1, 10.6, True, "200"), drill.RequestResult(12.0, 12.01, True, "200"),
               drill.RequestResult(12.5, 12.6, True, "200")]
    # the fault window [10.0, 12.0]: the gaps beginning in it are 9.95 -> 10.6 and 10.6 -> 12.01
    report = drill.analyse("kill-replica", fault_at=10.0, fault_seconds=2.0, old_master="a", old_epoch=1,
                           samples=[], results=results)
    assert report.disruption == pytest.approx(1.41)
    assert "disruption" in drill.format_report(report) and "1.410 s" in drill.format_report(report)
    gone = drill.analyse("kill-replica", fault_at=10.0, fault_seconds=3.0, old_master="a", old_epoch=1,
                         samples=[], results=results)
    assert gone.disruption is None
    assert "none succeeded after it" in drill.format_report(gone)


@pytest.mark.parametrize("argv", [["kill-replica"], ["rolling-restart"], ["cloud-etcd-outage"]])
def test_cloud_drills_have_help(argv: list[str]) -> None:
    import subprocess

    result = subprocess.run([sys.executable, str(DRILL), *argv, "--help"], capture_output=True, text=True,
                            timeout=60, cwd=DRILL.parents[2])
    assert result.returncode == 0, result.stderr
    assert ("SECONDS" in result.stdout) == (argv != ["rolling-restart"])
