"""The test etcd survives another process taking its port between picking and binding it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from tests.support.etcdserver import ADDRESS_IN_USE, EtcdServer

WAIT = 15.0


def _squat(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port may be in TIME_WAIT
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_first_start_moves_to_new_ports_when_one_was_taken(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path)
    taken = server.client_port
    squatter = _squat(taken)  # what another test on a shared machine does
    try:
        server.start()
        try:
            assert server.client_port != taken
            assert server.bind_retries == 1
            assert ADDRESS_IN_USE in server.log_path.read_bytes()  # it met the real failure
        finally:
            server.kill()
    finally:
        squatter.close()


def test_a_restart_keeps_its_ports_and_waits_for_a_taken_one(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path)
    server.start()
    try:
        port = server.client_port
        server.kill()
        squatter = _squat(port)
        failures_before = server.log_path.read_bytes().count(ADDRESS_IN_USE)

        def release_after_the_first_failure() -> None:
            deadline = time.monotonic() + WAIT
            while server.log_path.read_bytes().count(ADDRESS_IN_USE) == failures_before:
                assert time.monotonic() < deadline
                time.sleep(0.02)  # another process's log: nothing to await
            squatter.close()

        releaser = threading.Thread(target=release_after_the_first_failure)
        releaser.start()
        try:
            server.start()
        finally:
            releaser.join(WAIT)
            squatter.close()
        assert server.client_port == port  # its clients know this one
        assert server.bind_retries >= 1
    finally:
        server.kill()
