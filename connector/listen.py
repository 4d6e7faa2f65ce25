"""Every TCP service of the connector listens the same way: bind, report the port, serve."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)


async def serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    host: str,
    port: int,
    *,
    name: str,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (0 = any free port), `task_status.started(bound_port)`, then run
    `handler` in its own task for every connection until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port: int = listeners[0].socket.getsockname()[1]
    log.info("%s listening on %s:%d", name, host, bound_port)
    task_status.started(bound_port)
    await trio.serve_listeners(handler, listeners)
