"""The fences of a cloud replica on disk (`[tunnel] state_file`), so a restarted cloud keeps fencing.

One JSON document, written whole on every change (temporary file, fsync, rename). A failed write
(directory gone, disk full, read-only) must not take the cloud down: fencing goes on from memory
and only a restart would forget it, so the failure is logged once, shown by
`connector_cloud_state_persisted` (alert ConnectorStatePersistFailing), and the registry retries
every second until a write succeeds (`failing`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import trio

from connector import metrics
from connector.cloud.fence import Fence, LocationKey

log = logging.getLogger(__name__)

__all__ = ["FenceFile"]


class FenceFile:
    """`path` (None: nothing is kept) holding each location's highest epoch and cluster."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.failing = False
        self._written = trio.Event()  # set while the file holds the current fences
        self._written.set()
        # A labelled gauge has no sample until set: a node (or a cloud without a state file) shows
        # no "0, not persisted" that the alert would fire on.
        self._gauge = metrics.CLOUD_STATE_PERSISTED.labels(str(path)) if path is not None else None
        if self._gauge is not None:
            self._gauge.set(1)  # nothing failed yet (and nothing to write)

    def load(self) -> dict[LocationKey, Fence]:
        if self.path is None or not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        return {
            (entry["subaccount"], entry["location_id"]): Fence(int(entry["epoch"]), entry.get("cluster"))
            for entry in data["epochs"]
        }

    def save(self, fences: Iterable[tuple[LocationKey, Fence]]) -> None:
        """Write `fences` (sorted by key; unbound locations without an epoch left out)."""
        if self.path is None:
            return
        data = {"epochs": [
            {"subaccount": sub, "location_id": loc, "epoch": fence.epoch, "cluster": fence.cluster}
            for (sub, loc), fence in sorted(fences) if fence.epoch >= 0 or fence.cluster is not None
        ]}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            if self._gauge is not None:
                self._gauge.set(0)
            if not self.failing:
                self._written = trio.Event()
                log.error("cannot write the fencing state to %s: %s; fencing goes on from memory, "
                          "but a restart now would forget the epochs (retrying every second)", self.path, exc)
            self.failing = True
            return
        if self.failing:
            log.warning("fencing state written to %s again", self.path)
        self.failing = False
        self._written.set()
        if self._gauge is not None:
            self._gauge.set(1)

    async def wait_written(self) -> None:
        """Wait until the file holds the current fences again (at once if it does)."""
        await self._written.wait()
