"""The load generator, run as its own process (`python3 -m benchmarks.load MODE SPEC_JSON`).

Theory of operation: the orchestrator (run.py) starts one generator process per measurement so
the generator never shares an event loop with what it measures (on 2 cores it still shares the
CPU: see docs/benchmarks.md). A mode reads a JSON spec, runs one bounded load (every loop has a
count bound and a time bound) and prints one JSON line with its result on stdout:

* ``throughput``: one TCP stream to the echo service; a sender pushes `bytes` in 64 KiB writes
  while a receiver reads the echo back; MB/s = echoed bytes / elapsed (10^6 bytes per MB).
* ``rate``: `connections` keep-alive HTTP connections issue small GETs back to back for
  `seconds` (after `warmup` seconds not counted); requests/s = completed / measured seconds.
* ``latency``: sequential small GETs on one keep-alive connection per path, paths interleaved
  request by request so that machine noise hits every path alike; prints each path's latencies.
* ``hold``: opens `count` TCP streams to the echo service (one echoed byte each proves the stream
  is end-to-end), prints ``{"opened": n}``, holds them until a line arrives on stdin, closes them.

HTTP is spoken with a small dedicated client (fixed request bytes, a minimal response parser
for Content-Length and chunked bodies) because an h11 client would cost the generator about
three times more CPU, CPU that the measured path then lacks. Any status but 200 is an error and
fails the mode: a benchmark that counts error pages as requests is worse than none.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
from typing import Any

import trio

CHUNK = 65536
HTTP_PATH = "/sap/opu/odata/x"


class LoadError(Exception):
    """The path misbehaved (bad status, protocol error, refused SOCKS5): the figure is void."""


# --- connecting ------------------------------------------------------------------------------


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise LoadError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def _socks5_connect(stream: trio.SocketStream, socks5: dict[str, Any]) -> None:
    """RFC 1928 greeting, RFC 1929 username/password, CONNECT to a domain name."""
    await stream.send_all(b"\x05\x01\x02")
    if await _read_exactly(stream, 2) != b"\x05\x02":
        raise LoadError("SOCKS5 proxy did not accept username/password")
    user, password = socks5["username"].encode(), socks5["password"].encode()
    await stream.send_all(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    if await _read_exactly(stream, 2) != b"\x01\x00":
        raise LoadError("SOCKS5 authentication failed")
    host = socks5["target_host"].encode()
    await stream.send_all(
        b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack("!H", socks5["target_port"])
    )
    reply = await _read_exactly(stream, 4)
    if reply[1] != 0:
        raise LoadError(f"SOCKS5 CONNECT refused with reply code {reply[1]:#04x}")
    address_length = {1: 4, 4: 16}.get(reply[3])
    if address_length is None:
        address_length = (await _read_exactly(stream, 1))[0]
    await _read_exactly(stream, address_length + 2)


async def open_tcp(spec: dict[str, Any]) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(spec["host"], spec["port"])
    if spec.get("socks5"):
        await _socks5_connect(stream, spec["socks5"])
    return stream


def http_request_bytes(spec: dict[str, Any]) -> bytes:
    """The one small GET every HTTP mode sends: origin-form direct, absolute-form via a proxy."""
    if spec.get("proxy_token"):
        return (
            f"GET http://{spec['virtual_host']}{HTTP_PATH} HTTP/1.1\r\nHost: {spec['virtual_host']}\r\n"
            f"Proxy-Authorization: Bearer {spec['proxy_token']}\r\n\r\n"
        ).encode()
    return f"GET {HTTP_PATH} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n\r\n".encode()


class HttpClient:
    """One keep-alive connection; `get()` sends the fixed request and reads one whole response."""

    def __init__(self, stream: trio.SocketStream, request: bytes) -> None:
        self.stream = stream
        self.request = request
        self.buffer = b""

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(CHUNK)
        if not chunk:
            raise LoadError("server closed the keep-alive connection")
        self.buffer += chunk

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            await self._fill()
        line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
        return line

    async def _take(self, n: int) -> None:
        while len(self.buffer) < n:
            await self._fill()
        self.buffer = self.buffer[n:]

    async def get(self) -> None:
        await self.stream.send_all(self.request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        status_line, _, header_block = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[1] != b"200":
            raise LoadError(f"HTTP status line {status_line[:80]!r} (expected 200)")
        length: int | None = None
        chunked = False
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                raise LoadError("server asked to close the keep-alive connection")
        if chunked:
            while True:
                size = int((await self._line()).split(b";")[0], 16)
                if size == 0:
                    while await self._line():  # trailers, then the empty line
                        pass
                    return
                await self._take(size + 2)
        elif length is not None:
            await self._take(length)
        else:
            raise LoadError("response has neither Content-Length nor chunked encoding")


async def open_http(spec: dict[str, Any]) -> HttpClient:
    return HttpClient(
        await trio.open_tcp_stream(spec["host"], spec["port"]), http_request_bytes(spec)
    )


# --- modes -----------------------------------------------------------------------------------


async def throughput(spec: dict[str, Any]) -> dict[str, Any]:
    total = int(spec["bytes"])
    stream = await open_tcp(spec["tcp"])
    payload = b"\xa5" * CHUNK
    received = 0
    start = trio.current_time()
    with trio.move_on_after(float(spec["max_seconds"])) as scope:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                sent = 0
                while sent < total:
                    n = min(CHUNK, total - sent)
                    await stream.send_all(payload[:n])
                    sent += n

            nursery.start_soon(send)
            while received < total:
                chunk = await stream.receive_some(CHUNK * 4)
                if not chunk:
                    raise LoadError(f"echo stream closed after {received} bytes")
                received += len(chunk)
            nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - start
    await trio.aclose_forcefully(stream)
    return {
        "bytes": received,
        "seconds": elapsed,
        "mb_s": received / elapsed / 1e6,
        "timed_out": scope.cancelled_caught,
    }


async def rate(spec: dict[str, Any]) -> dict[str, Any]:
    connections, warmup, seconds = (
        int(spec["connections"]),
        float(spec["warmup"]),
        float(spec["seconds"]),
    )
    max_requests = int(spec.get("max_requests", 10_000_000))
    clients = [await open_http(spec["http"]) for _ in range(connections)]
    counted = 0
    begin = trio.current_time()
    measure_from, measure_until = begin + warmup, begin + warmup + seconds

    async def worker(client: HttpClient) -> None:
        nonlocal counted
        while counted < max_requests:
            await client.get()
            now = trio.current_time()
            if now >= measure_until:
                return
            if now >= measure_from:
                counted += 1

    with trio.fail_after(warmup + seconds + 30.0):
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(worker, client)
    measured = min(trio.current_time(), measure_until) - measure_from
    for client in clients:
        await trio.aclose_forcefully(client.stream)
    return {"requests": counted, "seconds": measured, "requests_per_s": counted / measured}


async def latency(spec: dict[str, Any]) -> dict[str, Any]:
    names = [path["name"] for path in spec["paths"]]
    clients = [await open_http(path["http"]) for path in spec["paths"]]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for client in clients:  # one unmeasured request each: connections set up end to end
        await client.get()
    with trio.move_on_after(float(spec["max_seconds"])):
        for i in range(int(spec["requests"])):
            for k in range(len(clients)):
                j = (i + k) % len(clients)  # rotate the order: no path always runs first
                start = trio.current_time()
                await clients[j].get()
                samples[names[j]].append((trio.current_time() - start) * 1000.0)
    for client in clients:
        await trio.aclose_forcefully(client.stream)
    return {"latencies_ms": samples}


async def hold(spec: dict[str, Any]) -> dict[str, Any]:
    count, parallel = int(spec["count"]), int(spec.get("parallel", 32))
    streams: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(parallel)

    async def open_one() -> None:
        async with limiter:
            stream = await open_tcp(spec["tcp"])
            streams.append(stream)
            await stream.send_all(b"x")
            await _read_exactly(stream, 1)

    with trio.fail_after(float(spec["max_seconds"])):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(open_one)
    print(json.dumps({"opened": len(streams)}), flush=True)
    with trio.move_on_after(float(spec.get("hold_seconds", 120.0))):
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    for stream in streams:
        await trio.aclose_forcefully(stream)
    return {"closed": len(streams)}


MODES = {"throughput": throughput, "rate": rate, "latency": latency, "hold": hold}


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _describe(exc: BaseException) -> str:
    """The first leaf of an exception group (trio nurseries wrap), as `Type: message`."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MODES:
        print(f"usage: python3 -m benchmarks.load {{{','.join(MODES)}}} SPEC_JSON", file=sys.stderr)
        return 2
    raise_fd_limit()
    spec = json.loads(argv[1])
    try:
        result = trio.run(MODES[argv[0]], spec)
    except Exception as exc:  # noqa: BLE001 - any failure voids the figure; report it, do not hide it
        print(json.dumps({"error": _describe(exc)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
