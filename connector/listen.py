"""Every TCP service of the connector listens the same way: bind, report the port, serve.

A listener that cannot bind (the port is taken, the address is not local, a port below 1024
without the right) fails with `ListenError`, one line naming the service, the address and the
configuration key that chose it, so the operator knows what to change without reading a
traceback. `connector.cli` prints it as the process's last word.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

# The configuration key behind each service's listen address (see connector.config), by the
# service name its `serve_tcp` call gives: one table, so every listener's error names its key.
LISTEN_SETTINGS = {
    "tunnel endpoint": "[tunnel] listen",
    "HTTP connectivity proxy": "[proxy] http_listen",
    "SOCKS5 connectivity proxy": "[proxy] socks5_listen",
    "destination service": "[destinations] listen",
    "admin API": "[admin] listen",
    "token service": "[oauth] listen",
}


class ListenError(OSError):
    """A service could not listen on its configured address."""

    def __init__(self, name: str, host: str, port: int, cause: OSError) -> None:
        self.name, self.host, self.port = name, host, port
        setting = LISTEN_SETTINGS.get(name)
        where = f" (set by {setting})" if setting else ""
        reason = cause.strerror or str(cause)
        hint = ""
        if cause.errno == errno.EADDRINUSE:
            hint = ": another process listens there; stop it or choose another port"
        super().__init__(cause.errno, f"{name} cannot listen on {host}:{port}{where}: {reason}{hint}")

    def __str__(self) -> str:
        return str(self.strerror)


async def serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    host: str,
    port: int,
    *,
    name: str,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (0 = any free port), `task_status.started(bound_port)`, then run
    `handler` in its own task for every connection until cancelled. A failure to bind raises
    `ListenError`. With `handler_nursery`, connections run there and outlive the listener (a
    draining replica stops accepting and lets them finish)."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(name, host, port, exc) from exc
    bound_port: int = listeners[0].socket.getsockname()[1]
    log.info("%s listening on %s:%d", name, host, bound_port)
    task_status.started(bound_port)
    await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery)
