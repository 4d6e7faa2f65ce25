"""`connector.admin.http_request`'s error contract on real sockets: a broken connection is an
OSError, like a refused one, so callers that catch (OSError, TooSlowError) see every failure.

Found by tests/failover/test_cloud_drills.py: a shadow's probe of the master's /healthz got a TCP
reset when the master was killed mid-request; trio's BrokenResourceError escaped the probe and
took the shadow down with the master, so nobody took over.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from connector.admin import http_request

TEST_TIMEOUT = 10.0


async def test_a_reset_while_waiting_for_the_answer_is_an_oserror() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def reset_after_the_request(stream: trio.SocketStream) -> None:
            await stream.receive_some(65536)  # the request, unanswered
            # close abortively (SO_LINGER 0): the client reads a TCP RST, as from a killed process
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, reset_after_the_request, listeners)
            with pytest.raises(OSError, match="connection broken"):
                await http_request("127.0.0.1", port, "/healthz", timeout=5.0)
            nursery.cancel_scope.cancel()
