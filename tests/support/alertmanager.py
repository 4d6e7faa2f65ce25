"""A real Alertmanager for tests, and the webhook receiver it notifies.

Theory of operation: `with_webhooks(config, base)` takes the shipped alertmanager.yml (a dict) and
points every webhook at `base` (keeping each URL's path, so a test sees which receiver was
chosen); nothing else changes, so the routing, grouping and inhibitions under test are what
operators get. `Alertmanager` starts Debian's ``prometheus-alertmanager`` on 127.0.0.1 with a free
port (picked, then bound by the child: if another process took it meanwhile, the child exits
with "address already in use" and is started again on another port, at most START_ATTEMPTS
times), gossip off (``--cluster.listen-address=``: no 0.0.0.0:9094 listener) and storage under the
test's tmp dir, and waits for ``/-/ready``. `stop()` SIGKILLs it.

`WebhookReceiver` is the receiving end: an `AdminServer` (h11) route per path taking Alertmanager's
JSON POST; `wait_alert(predicate)` waits for a notification carrying an alert that matches.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import trio
import yaml

from connector.admin import AdminRequest, AdminServer, Reply, http_request
from tests.support.prometheus import free_port

BINARY = "/usr/bin/prometheus-alertmanager"  # Debian's `prometheus-alertmanager` package
READY_TIMEOUT = 20.0
START_ATTEMPTS = 3


def find_alertmanager() -> str | None:
    if os.path.exists(BINARY):
        return BINARY
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def with_webhooks(config: dict[str, Any], base: str) -> dict[str, Any]:
    """A copy of `config` whose webhook URLs point at `base` (scheme://host:port), paths kept."""
    result = copy.deepcopy(config)
    for receiver in result.get("receivers", []):
        for webhook in receiver.get("webhook_configs", []):
            path = urllib.parse.urlsplit(webhook["url"]).path
            webhook["url"] = base.rstrip("/") + path
    return result


class AlertmanagerError(RuntimeError):
    """Alertmanager did not start (its log's tail says why)."""


class Alertmanager:
    """One Alertmanager process; `await start()`, `await stop()` (SIGKILL)."""

    def __init__(self, workdir: Path, config: dict[str, Any], binary: str = BINARY) -> None:
        self.workdir = workdir
        self.config = config
        self.binary = binary
        self.port = 0
        self.process: trio.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "alertmanager.log"

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            log = self._open_log()
            try:
                self.process = await trio.lowlevel.open_process(
                    [self.binary, f"--config.file={config_file}", f"--storage.path={self.workdir / 'data'}",
                     f"--web.listen-address={self.address}", "--cluster.listen-address=", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                )
            finally:
                log.close()
            if await self._wait_ready():
                return
            tail = self.log_file.read_text(errors="replace")[-2000:]
            if "address already in use" not in tail or attempt == START_ATTEMPTS - 1:
                raise AlertmanagerError(f"alertmanager exited with {self.process.returncode}:\n{tail}")

    def _open_log(self) -> BinaryIO:
        return open(self.log_file, "ab")  # noqa: SIM115 - handed to the child

    async def _wait_ready(self) -> bool:
        """True once /-/ready answers 200; False if the process exited first."""
        assert self.process is not None
        with trio.fail_after(READY_TIMEOUT):
            while self.process.poll() is None:
                try:
                    status, _ = await http_request("127.0.0.1", self.port, "/-/ready", timeout=1.0)
                    if status == 200:
                        return True
                except (OSError, trio.TooSlowError):
                    pass
                await trio.sleep(0.1)
        return False

    async def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds now (API v2), for failure messages."""
        status, body = await http_request("127.0.0.1", self.port, "/api/v2/alerts", timeout=5.0)
        return list(json.loads(body)) if status == 200 else [{"status": status, "body": body[:200].decode()}]

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


@attrs.frozen
class Notification:
    """One webhook POST: the path it came to and Alertmanager's JSON payload."""

    path: str
    payload: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return list(self.payload.get("alerts", []))


class WebhookReceiver:
    """Takes Alertmanager's webhook POSTs on `paths`; run it with `await nursery.start(receiver.run)`."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.notifications: list[Notification] = []
        self.port = 0
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        server = AdminServer({("POST", path): self._receive for path in self.paths})
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(server.run, "127.0.0.1", 0)
            task_status.started(self.port)

    async def _receive(self, request: AdminRequest) -> Reply:
        try:
            payload = json.loads(request.body)
        except ValueError as exc:
            return Reply.json(400, {"error": "not_json", "message": str(exc)})
        self.notifications.append(Notification(request.path, payload))
        self._changed.set()
        self._changed = trio.Event()
        return Reply.json(200, {"received": len(payload.get("alerts", []))})

    async def wait_alert(self, predicate: Callable[[Notification, dict[str, Any]], bool]) -> tuple[Notification, dict[str, Any]]:
        """Wait for a notification with an alert matching `predicate(notification, alert)`; unbounded:
        callers wrap it in `trio.fail_after`."""
        while True:
            for notification in self.notifications:
                for alert in notification.alerts:
                    if predicate(notification, alert):
                        return notification, alert
            await self._changed.wait()
