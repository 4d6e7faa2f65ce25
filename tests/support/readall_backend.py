"""A well-behaved keep-alive HTTP/1.1 internal host in its own process: it reads each request's
whole body (Content-Length) before it answers `200 ok`, with `x-connection: N`, the ordinal of
the connection that carried the request. Prints its port on stdout. For tests only.

Run: python -m tests.support.readall_backend
"""

from __future__ import annotations

import itertools
import socket
import threading

_ordinals = itertools.count(1)


def _serve(conn: socket.socket, ordinal: int) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffered = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffered:
                data = conn.recv(65536)
                if not data:
                    return
                buffered += data
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffered) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buffered += data
            buffered = buffered[length:]
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-connection: %d\r\n\r\nok" % ordinal)


def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn, next(_ordinals)), daemon=True).start()


if __name__ == "__main__":
    main()
