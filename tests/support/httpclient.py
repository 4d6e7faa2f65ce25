"""A minimal HTTP/1.1 client over a trio stream (h11), as cloud applications use the proxy."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import h11
import trio


@attrs.define
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    length: int = 0
    sha256: str = ""

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class HttpClient:
    """One keep-alive connection; `request()` may be called repeatedly."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> HttpClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        keep_body: bool = True,
    ) -> Response:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = list(headers or [])
        names = {k.lower() for k, _ in headers}
        if "host" not in names:
            headers.append(("host", target.split("/")[2] if target.startswith("http://") else "localhost"))
        if isinstance(body, bytes) and "content-length" not in names:
            headers.append(("content-length", str(len(body))))
        elif body is not None and not isinstance(body, bytes) and "content-length" not in names:
            headers.append(("transfer-encoding", "chunked"))
        elif body is None and method in ("POST", "PUT"):
            headers.append(("content-length", "0"))
        await self.stream.send_all(self.conn.send(h11.Request(method=method, target=target, headers=headers)))

        response: Response | None = None

        async def send_body() -> None:
            if isinstance(body, bytes):
                if body:
                    await self.stream.send_all(self.conn.send(h11.Data(data=body)))
            elif body is not None:
                async for chunk in body:
                    if self.conn.their_state is h11.DONE:  # the server answered early (error)
                        return
                    await self.stream.send_all(self.conn.send(h11.Data(data=chunk)))
            if self.conn.our_state is h11.SEND_BODY:
                await self.stream.send_all(self.conn.send(h11.EndOfMessage()))

        async def receive() -> None:
            nonlocal response
            event = await self._next()
            while isinstance(event, h11.InformationalResponse):
                event = await self._next()
            assert isinstance(event, h11.Response), event
            digest = hashlib.sha256()
            data = bytearray()
            length = 0
            while True:
                item = await self._next()
                if isinstance(item, h11.Data):
                    length += len(item.data)
                    digest.update(item.data)
                    if keep_body:
                        data += item.data
                elif isinstance(item, h11.EndOfMessage):
                    break
            response = Response(
                event.status_code,
                {k.decode().lower(): v.decode() for k, v in event.headers},
                bytes(data),
                length,
                digest.hexdigest(),
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            nursery.start_soon(receive)
        assert response is not None
        return response


async def chunks(total: int, size: int = 65536, byte: int = 0x61) -> AsyncIterator[bytes]:
    block = bytes([byte]) * size
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block[:n]
        sent += n


def expected_sha256(total: int, size: int = 65536, byte: int = 0x61) -> str:
    digest = hashlib.sha256()
    block = bytes([byte]) * size
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        digest.update(block[:n])
        sent += n
    return digest.hexdigest()
