"""A real Prometheus server for tests, scraping a running demo cluster and loading our alert rules.

Theory of operation: `scrape_targets(state)` walks a demo state dict for every key ending in
``metrics_url`` (one per component); `Prometheus` writes a prometheus.yml with one scrape job per
kind of component (``node``, ``cloud``, ...; `job` label) and one target per URL (`instance` is
host:port as Prometheus sets it, `component` names the process), scraping and evaluating rules
every second, starts Debian's ``prometheus`` binary on 127.0.0.1 with a free port and a storage
directory under the test's tmp dir, and waits until it is ready and every target has been
scraped successfully. Queries go through the HTTP API (`/api/v1/query`, `/api/v1/label/...`).
`stop()` SIGKILLs it: the storage is thrown away, so a clean shutdown buys nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import trio
import yaml

from connector.admin import http_request

SCRAPE_INTERVAL = 1.0  # seconds; also the rule evaluation interval
READY_TIMEOUT = 20.0
REQUEST_TIMEOUT = 5.0
BINARY = "/usr/bin/prometheus"  # Debian's `prometheus` package; .ci installs it


@attrs.frozen
class ScrapeTarget:
    """One metrics endpoint: `component` is the process (node-a, cloud), `job` its kind."""

    component: str
    job: str
    url: str
    labels: dict[str, str] = attrs.field(factory=dict)  # more target labels (a cloud replica's `replica`)

    @property
    def address(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.url).scheme

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.url).path or "/metrics"


def metrics_urls(state: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path of keys, url) of every key ending in ``metrics_url`` in a (nested) demo state dict."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from metrics_urls(value, (*prefix, key))
        elif key.endswith("metrics_url") and isinstance(value, str):
            yield (*prefix, key), value


def scrape_targets(state: dict[str, Any]) -> list[ScrapeTarget]:
    """Targets of a demo state: ``nodes.<name>.metrics_url`` is job ``node``, ``<x>.metrics_url`` job ``x``.

    A demo with several cloud replicas (``cloud_replicas``) gives each its own target of job
    ``cloud`` with the target label ``replica`` (docs/metrics.md); ``cloud`` names the first of them
    then, and is not scraped twice."""
    targets = [ScrapeTarget(component=r["id"], job="cloud", url=r["metrics_url"], labels={"replica": r["id"]})
               for r in state.get("cloud_replicas", [])]
    replicated = {target.url for target in targets}
    for keys, url in metrics_urls(state):
        if url in replicated:
            continue
        if len(keys) >= 3 and keys[0] == "nodes":
            targets.append(ScrapeTarget(component=keys[1], job="node", url=url))
        elif len(keys) >= 2:
            targets.append(ScrapeTarget(component=keys[0], job=keys[0], url=url))
        else:
            targets.append(ScrapeTarget(component=keys[0].removesuffix("metrics_url").strip("_") or "main",
                                        job="main", url=url))
    return targets


def find_prometheus() -> str | None:
    if os.path.exists(BINARY):
        return BINARY
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(targets: Iterable[ScrapeTarget], rule_files: Iterable[Path], interval: float = SCRAPE_INTERVAL,
           alertmanagers: Iterable[str] = ()) -> dict[str, Any]:
    """prometheus.yml as a dict: one scrape job per (job, scheme, path), one static config per target;
    firing alerts go to `alertmanagers` (host:port), if any."""
    jobs: dict[tuple[str, str, str], list[ScrapeTarget]] = {}
    for target in targets:
        jobs.setdefault((target.job, target.scheme, target.path), []).append(target)
    names = [job for job, _, _ in jobs]
    scrape_configs = []
    for (job, scheme, path), members in jobs.items():
        job_name = job if names.count(job) == 1 else f"{job}{path.replace('/', '_')}"
        scrape_configs.append({
            "job_name": job_name, "scheme": scheme, "metrics_path": path,
            "static_configs": [{"targets": [t.address], "labels": {"component": t.component, **t.labels}}
                               for t in members],
        })
    seconds = f"{interval:g}s"
    result: dict[str, Any] = {
        "global": {"scrape_interval": seconds, "scrape_timeout": seconds, "evaluation_interval": seconds},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": scrape_configs,
    }
    if alertmanagers:
        result["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]}
    return result


class PrometheusError(RuntimeError):
    """The Prometheus API answered with an error (status "error"), or not at all."""


def _timestamp(value: str) -> float:
    """Prometheus' RFC 3339 times (nanoseconds, "Z") as Unix seconds; the zero time as 0."""
    if value.startswith("0001-01-01"):
        return 0.0
    return datetime.fromisoformat(value).timestamp()


class Prometheus:
    """One Prometheus process; `await start()`, query, `await stop()` (SIGKILL)."""

    def __init__(self, workdir: Path, targets: list[ScrapeTarget], rule_files: list[Path],
                 binary: str = BINARY, alertmanagers: list[str] | None = None) -> None:
        self.workdir = workdir
        self.targets = targets
        self.rule_files = rule_files
        self.binary = binary
        self.alertmanagers = alertmanagers or []
        self.port = 0
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start, then wait for /-/ready and for one successful scrape of every target."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(
            config(self.targets, self.rule_files, alertmanagers=self.alertmanagers), sort_keys=False))
        self.port = free_port()
        log = self._open_log()
        try:
            self.process = await trio.lowlevel.open_process(
                [self.binary, f"--config.file={config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
        finally:
            log.close()
        with trio.fail_after(READY_TIMEOUT):
            while True:
                self._check_alive()
                try:
                    status, _ = await http_request("127.0.0.1", self.port, "/-/ready", timeout=1.0)
                    if status == 200:
                        break
                except (OSError, trio.TooSlowError):
                    pass
                await trio.sleep(0.1)  # another process: its /-/ready is all there is to poll
        with trio.fail_after(READY_TIMEOUT):
            await self.wait_scraped_since(0.0)

    def _open_log(self) -> BinaryIO:
        return open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = (self.workdir / "prometheus.log").read_text(errors="replace")[-2000:]
            raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{tail}")

    async def api(self, path: str, params: list[tuple[str, str]] | None = None) -> Any:
        """GET an API path; return its `data`, or raise PrometheusError with Prometheus' own error."""
        self._check_alive()
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        status, body = await http_request("127.0.0.1", self.port, target, timeout=REQUEST_TIMEOUT)
        try:
            reply = json.loads(body)
        except ValueError:
            raise PrometheusError(f"{target}: HTTP {status}, not JSON: {body[:200]!r}") from None
        if reply.get("status") != "success":
            raise PrometheusError(f"{reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (now, unless `at`); the result as a list of samples (a scalar is one sample)."""
        params = [("query", expr)]
        if at is not None:
            params.append(("time", f"{at:.3f}"))
        data = await self.api("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def label_values(self, label: str, match: str) -> list[str]:
        return list(await self.api(f"/api/v1/label/{urllib.parse.quote(label)}/values", [("match[]", match)]))

    async def active_targets(self) -> list[dict[str, Any]]:
        return list((await self.api("/api/v1/targets", [("state", "active")]))["activeTargets"])

    async def rule_groups(self) -> list[dict[str, Any]]:
        return list((await self.api("/api/v1/rules"))["groups"])

    async def wait_scraped_since(self, since: float) -> None:
        """Wait until every target is up and its last successful scrape started at or after `since`
        (Unix time, as Prometheus stamps scrapes). Scrapes are periodic, so `since = t + interval`
        means two scrapes after t. Unbounded: callers wrap it in `trio.fail_after`."""
        while True:
            targets = await self.active_targets()
            if len(targets) == len(self.targets) and all(
                t["health"] == "up" and _timestamp(t["lastScrape"]) >= since for t in targets
            ):
                return
            await trio.sleep(0.2)  # another process: its targets API is all there is to poll

    async def wait_two_scrapes(self) -> None:
        """Wait until every target has been scraped twice after now (bounded by READY_TIMEOUT)."""
        with trio.fail_after(READY_TIMEOUT):
            await self.wait_scraped_since(time.time() + SCRAPE_INTERVAL)

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
