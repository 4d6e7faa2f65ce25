"""Audit log: JSON lines, 0600 append-only file, in-memory tail, write errors never raise."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from connector import metrics
from connector.agent.audit import REQUEST_FIELDS, AuditLog


def fixed_clock() -> str:
    return "2024-01-01T00:00:00.000+00:00"


def test_request_line_has_all_fields_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), clock=fixed_clock)
    audit.request(
        subaccount="sa", location="loc", virtual_target="http://erp:80", mapping="erp:80",
        method="GET", path="/x", decision="denied", reason="no_resource", status=403,
        bytes_in=0, bytes_out=57, duration_seconds=0.001,
    )
    audit.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == ["ts", "kind", *REQUEST_FIELDS]
    assert record["ts"] == fixed_clock()
    assert record["kind"] == "request"
    assert record["reason"] == "no_resource" and record["status"] == 403


def test_missing_request_fields_are_null_and_extras_kept() -> None:
    audit = AuditLog(None)
    record = audit.request(method="GET", stream_id=7)
    assert record["status"] is None and record["stream_id"] == 7


def test_file_created_0600_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditLog(str(path))
    first.request(method="GET")
    first.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = AuditLog(str(path))
    second.config_change(action="put", mapping="erp:80")
    second.close()
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds == ["request", "config"]


def test_existing_world_readable_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("")
    os.chmod(path, 0o644)
    AuditLog(str(path)).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_lines_are_visible_before_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path))
    audit.request(method="GET", path="/a")
    assert json.loads(path.read_text())["path"] == "/a"  # written unbuffered: no close or flush needed
    audit.close()


def test_stream_sink_and_recent_tail() -> None:
    out = io.StringIO()
    audit = AuditLog(None, out, keep=2)
    audit.request(path="/1")
    audit.config_change(action="delete")
    audit.request(path="/3")
    assert [json.loads(line).get("path") for line in out.getvalue().splitlines()] == ["/1", None, "/3"]
    assert [r["kind"] for r in audit.recent] == ["config", "request"]
    assert [r["path"] for r in audit.records("request")] == ["/3"]
    assert [r["action"] for r in audit.records("config")] == ["delete"]


def test_write_error_is_counted_and_never_raises(tmp_path: Path) -> None:
    out = io.StringIO()
    audit = AuditLog(None, out)
    out.close()  # writes now raise ValueError
    before = metrics.AUDIT_WRITE_ERRORS._value.get()
    audit.request(path="/x")
    assert metrics.AUDIT_WRITE_ERRORS._value.get() == before + 1
    assert audit.recent[-1]["path"] == "/x"


def test_disk_full_is_counted(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full not available")
    audit = AuditLog("/dev/full")
    before = metrics.AUDIT_WRITE_ERRORS._value.get()
    audit.request(path="/x")
    assert metrics.AUDIT_WRITE_ERRORS._value.get() == before + 1


def test_unserialisable_field_written_as_string() -> None:
    out = io.StringIO()
    AuditLog(None, out).request(path=Path("/p"))
    assert json.loads(out.getvalue())["path"] == "/p"


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        AuditLog(str(tmp_path / "missing-dir" / "audit.log"))


async def test_wait_records_returns_at_the_nth_record_of_its_kind(nursery, autojump_clock) -> None:
    audit = AuditLog(None)
    returned: list[tuple[list[str], float]] = []

    async def wait(n: int, kind: str | None) -> None:
        records = await audit.wait_records(n, kind)
        returned.append(([r.get("path") or r["kind"] for r in records], trio.current_time()))

    nursery.start_soon(wait, 2, "request")
    audit.request(path="/one")
    audit.config_change(action="apply")  # another kind: does not count towards 2 requests
    await trio.sleep(1.0)
    assert returned == []
    nursery.start_soon(wait, 3, None)  # any kind: three are written by the next request
    audit.request(path="/two")
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(returned) == [(["/one", "/two"], 1.0), (["/one", "config", "/two"], 1.0)]
    with trio.fail_after(1.0):  # reached already: at once (virtual time: a hang fails fast)
        assert len(await audit.wait_records(1, "config")) == 1
    assert trio.current_time() == 1.0
