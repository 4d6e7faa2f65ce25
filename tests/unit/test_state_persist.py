"""The cloud never stops because its fencing state cannot be written: the registry logs, flags it
(connector_cloud_state_persisted) and retries, keeps fencing from memory, and writes the file once
the disk takes it again."""

from __future__ import annotations

import json
import logging

import trio
from prometheus_client import REGISTRY

from connector.cloud.registry import Registry, TunnelHandle

RETRY = 1.0  # Registry.run retries a failed write on its one-second tick


def handle(node: str) -> TunnelHandle:
    return TunnelHandle(None, "acme", "", node)  # type: ignore[arg-type]  # no fencing here: no session used


def sample(name: str, state_file: object) -> float | None:
    return REGISTRY.get_sample_value(name, {"state_file": str(state_file)})


async def test_failed_state_write_keeps_serving_then_recovers(tmp_path, autojump_clock, caplog):
    state_file = tmp_path / "missing" / "epochs.json"
    registry = Registry(state_file=state_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        start = trio.current_time()
        with caplog.at_level(logging.ERROR, logger="connector.cloud.registry"):
            assert registry.register(handle("node-a"), 7).accepted  # raised FileNotFoundError before
        assert not registry.persisted
        assert sample("connector_cloud_state_persisted", state_file) == 0
        assert any(str(state_file) in r.getMessage() and "from memory" in r.getMessage() for r in caplog.records)
        assert not registry.register(handle("stale"), 3).accepted  # the fence holds, in memory

        state_file.parent.mkdir()
        await registry.wait_persisted()
        assert trio.current_time() - start == RETRY
        assert sample("connector_cloud_state_persisted", state_file) == 1
        nursery.cancel_scope.cancel()
    assert json.loads(state_file.read_text())["epochs"] == [
        {"subaccount": "acme", "location_id": "", "epoch": 7, "cluster": ""}]
    assert not Registry(state_file=state_file).register(handle("stale"), 3).accepted  # a restart keeps fencing
