"""The benchmark's own internal host, used when the demo cannot start (`python3 -m benchmarks.backend`).

It serves the demo backend's own handlers (`connector.demo_backend.serve_http` and `serve_echo`),
so direct and `ssh -R` figures are measured against the same code as the connector path; only the
launcher is ours. When the demo starts, run.py uses the demo's backend process for every path.
Prints ``{"http_port": ..., "tcp_port": ...}`` once both listen.
"""

from __future__ import annotations

import functools
import json
import sys

import trio

from connector.demo_backend import serve_echo, serve_http


async def _main() -> None:
    async with trio.open_nursery() as nursery:
        http = await nursery.start(
            functools.partial(trio.serve_tcp, serve_http, 0, host="127.0.0.1")
        )
        tcp = await nursery.start(
            functools.partial(trio.serve_tcp, serve_echo, 0, host="127.0.0.1")
        )
        ports = {
            "http_port": http[0].socket.getsockname()[1],
            "tcp_port": tcp[0].socket.getsockname()[1],
        }
        print(json.dumps(ports), flush=True)


if __name__ == "__main__":
    sys.exit(trio.run(_main))
