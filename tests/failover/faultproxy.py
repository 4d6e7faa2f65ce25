"""A fault-injecting TCP proxy for tests: put it between one node and etcd, then cut the link.

Modes: ``pass`` forwards bytes; ``blackhole`` keeps connections open but forwards nothing (a network
partition as the client sees it: calls time out rather than fail fast) and leaves new connections
hanging; ``reset`` closes every connection at once and refuses new ones.
"""

from __future__ import annotations

import trio

CHUNK = 65536


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self._mode_changed = trio.Event()
        self._connections: set[trio.CancelScope] = set()
        self.port: int | None = None

    def set_mode(self, mode: str) -> None:
        if mode not in ("pass", "blackhole", "reset"):
            raise ValueError(mode)
        self.mode = mode
        if mode == "reset":
            for scope in list(self._connections):
                scope.cancel()
        self._mode_changed.set()
        self._mode_changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _wait_pass(self) -> None:
        while self.mode != "pass":
            await self._mode_changed.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode == "reset":
            await trio.aclose_forcefully(client)
            return
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                await self._wait_pass()
                upstream = await trio.open_tcp_stream(*self.upstream)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream)
                    nursery.start_soon(self._pump, upstream, client)
            except OSError:
                pass
            finally:
                self._connections.discard(scope)
        await trio.aclose_forcefully(client)

    async def _pump(self, source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        try:
            while True:
                data = await source.receive_some(CHUNK)
                if not data:
                    break
                await self._wait_pass()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(sink)
