"""Hostile clients against the destination service, on real sockets: bounds hold, the service keeps serving.

Each test names the defect it guards against; the slow-client deadlines run on a memory stream
under trio's autojump clock, so they assert exact virtual times.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from cryptography.fernet import Fernet

from connector.cloud.destinations import DestinationLimits
from tests.support.destinations import BASE, COLLECTION, USER_1, call, new_service, running
from tests.support.httpclient import HttpClient

OPEN = {"Name": "open", "Type": "HTTP", "URL": "http://open.virtual"}
TEST_TIMEOUT = 20.0


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == [], [r.getMessage() for r in bad]


async def test_100000_nested_brackets_get_400_and_the_service_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: json.loads recursed into a RecursionError, the connection died without an answer.
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path) as port:
        with trio.fail_after(TEST_TIMEOUT):
            for body in (b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 30_000 + b"1" + b"}" * 30_000):
                status, answer, _ = await call(port, "POST", COLLECTION, raw=body)
                assert (status, answer["error"]) == (400, "json_too_deep")
            assert (await call(port, "POST", COLLECTION, OPEN))[0] == 201
            status, answer, _ = await call(port, "PUT", COLLECTION, raw=b"[" * 100_000)
            assert (status, answer["error"]) == (400, "json_too_deep")
    no_tracebacks(caplog)


async def test_an_oversize_body_is_refused_from_its_length_before_it_is_sent(tmp_path: Path) -> None:
    # Before: the service read the body until it passed the limit, so a client announcing a
    # large body and sending nothing held the connection (and got no answer).
    async with running(tmp_path, max_body_bytes=4096, max_destination_bytes=4096) as port:
        with trio.fail_after(TEST_TIMEOUT):
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
            await sock.send_all(conn.send(h11.Request(method="POST", target=COLLECTION, headers=[
                ("host", "d"), ("content-length", str(100 << 20)), ("authorization", "Bearer x")])))
            event = None
            while not isinstance(event, h11.Response):
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await sock.receive_some(65536))
            assert event.status_code == 413 and (b"connection", b"close") in list(event.headers)
            await sock.aclose()
            # chunked bodies, which announce no length, are cut when they pass it
            client = await HttpClient.connect(port)
            response = await client.request("POST", COLLECTION, body=_chunked(8192))
            assert response.status == 413 and response.json()["error"] == "body_too_large"
            await client.aclose()


async def _chunked(total: int) -> AsyncIterator[bytes]:
    yield b"x" * total


async def test_an_oversize_head_gets_431_and_the_service_keeps_serving(tmp_path: Path) -> None:
    async with running(tmp_path, max_header_bytes=4096) as port:
        with trio.fail_after(TEST_TIMEOUT):
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            await sock.send_all(b"GET / HTTP/1.1\r\nhost: d\r\nx-filler: " + b"x" * 8192)  # and never ends
            answer = b""
            while chunk := await sock.receive_some(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 431 ") and b"request_header_too_large" in answer
            await sock.aclose()
            assert (await call(port, "GET", COLLECTION))[0] == 200


async def test_connections_beyond_the_bound_get_503_and_the_others_are_served(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        service = new_service(tmp_path, max_connections=2)
        port = await nursery.start(service.run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            held = [await HttpClient.connect(port) for _ in range(2)]  # keep-alive, idle: each holds a slot
            await service.wait_connections(2)
            refused = await trio.open_tcp_stream("127.0.0.1", port)
            answer = b""
            while chunk := await refused.receive_some(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
            await refused.aclose()
            auth = [("authorization", "Bearer dest-admin-sub1")]
            assert (await held[0].request("GET", COLLECTION, auth)).status == 200  # the held ones still work
            await held[1].aclose()
            await service.wait_connections(1)  # a slot is free again
            assert (await call(port, "GET", COLLECTION))[0] == 200
            await held[0].aclose()
        nursery.cancel_scope.cancel()


async def test_one_address_cannot_hold_every_connection(tmp_path: Path) -> None:
    """Before: the bound was global only, so one address holding every slot idle locked all
    other applications out (503) for as long as it liked."""
    async with trio.open_nursery() as nursery:
        service = new_service(tmp_path, max_connections=4, max_connections_per_client_address=2)
        port = await nursery.start(service.run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            held = [await HttpClient.connect(port) for _ in range(2)]
            await service.wait_connections(2)
            refused = await trio.open_tcp_stream("127.0.0.1", port)
            answer = b""
            while chunk := await refused.receive_some(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections_from_address" in answer
            other = HttpClient(await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2"))
            auth = [("authorization", "Bearer dest-admin-sub1")]
            assert (await other.request("GET", COLLECTION, auth)).status == 200  # another address is served
            for client in (*held, other):
                await client.aclose()
        nursery.cancel_scope.cancel()


async def test_count_per_subaccount_is_bounded(tmp_path: Path) -> None:
    async with running(tmp_path, max_destinations=3) as port:
        with trio.fail_after(TEST_TIMEOUT):
            batch = [{**OPEN, "Name": f"d{i}"} for i in range(2)]
            assert (await call(port, "POST", COLLECTION, batch))[0] == 201
            status, answer, _ = await call(port, "POST", COLLECTION, [{**OPEN, "Name": "d8"}, {**OPEN, "Name": "d9"}])
            assert (status, answer["error"]) == (409, "too_many_destinations")
            assert [d["Name"] for d in (await call(port, "GET", COLLECTION))[1]] == ["d0", "d1"]  # none of the two
            assert (await call(port, "POST", COLLECTION, {**OPEN, "Name": "d2"}))[0] == 201
            assert (await call(port, "POST", COLLECTION, {**OPEN, "Name": "d3"}))[0] == 409
            # the bound is per subaccount, and a delete makes room
            assert (await call(port, "POST", COLLECTION, OPEN, token="dest-admin-sub2"))[0] == 201
            assert (await call(port, "DELETE", f"{COLLECTION}/d0"))[0] == 200
            assert (await call(port, "POST", COLLECTION, {**OPEN, "Name": "d3"}))[0] == 201


async def test_a_destination_over_its_size_is_413(tmp_path: Path) -> None:
    async with running(tmp_path, max_destination_bytes=1024) as port:
        with trio.fail_after(TEST_TIMEOUT):
            big = {**OPEN, "Description": "x" * 1024}
            status, answer, _ = await call(port, "POST", COLLECTION, big)
            assert (status, answer["error"]) == (413, "destination_too_large")
            assert (await call(port, "POST", COLLECTION, OPEN))[0] == 201
            status, answer, _ = await call(port, "PUT", COLLECTION, big)
            assert (status, answer["error"]) == (413, "destination_too_large")
            assert (await call(port, "GET", f"{COLLECTION}/open"))[1] == {**OPEN, "ProxyType": "Internet",
                                                                         "Authentication": "NoAuthentication"}


async def test_head_is_answered_without_a_body_or_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Before: the JSON body was sent after a HEAD's head, h11 refused it, a traceback was logged
    # and the client got a head announcing bytes that never came.
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path) as port:
        with trio.fail_after(TEST_TIMEOUT):
            await call(port, "POST", COLLECTION, OPEN)
            client = await HttpClient.connect(port)
            auth = [("authorization", "Bearer dest-admin-sub1")]
            get = await client.request("GET", COLLECTION, auth)
            head = await client.request("HEAD", COLLECTION, auth)  # same connection: it stays usable
            assert (head.status, head.body) == (200, b"")
            assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.body))
            found = await client.request("HEAD", f"{BASE}/destinations/open", [("authorization", f"Bearer {USER_1}")])
            assert (found.status, found.body) == (200, b"")
            missing = await client.request("HEAD", f"{COLLECTION}/nothing", auth)
            assert (missing.status, missing.body) == (404, b"")
            assert (await client.request("GET", COLLECTION, auth)).json() == get.json()
            await client.aclose()
    no_tracebacks(caplog)


def files_of(directory: Path) -> dict[Path, tuple[int, int, bytes]]:
    """Every destination file with its inode, modification time and bytes."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in directory.rglob("*.json")}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


async def test_a_write_changes_only_its_own_file(tmp_path: Path) -> None:
    # Before: every change rewrote the whole store, every subaccount's destinations in one file.
    async with running(tmp_path) as port:
        with trio.fail_after(TEST_TIMEOUT):
            await call(port, "POST", COLLECTION, [{**OPEN, "Name": "a"}, {**OPEN, "Name": "b"}])
            await call(port, "POST", COLLECTION, {**OPEN, "Name": "a"}, token="dest-admin-sub2")
            directory = tmp_path / "destinations.d"
            before = files_of(directory)
            assert len(before) == 3
            a1 = directory / "sub1" / "a.json"
            assert (await call(port, "PUT", COLLECTION, {**OPEN, "Name": "a", "URL": "http://new.virtual"}))[0] == 200
            assert (await call(port, "POST", COLLECTION, {**OPEN, "Name": "c"}))[0] == 201
            after = files_of(directory)
            assert set(after) == set(before) | {directory / "sub1" / "c.json"}
            assert after[a1] != before[a1] and b"new.virtual" in after[a1][2]
            assert {p: v for p, v in after.items() if p.name != "c.json" and p != a1} == {
                p: v for p, v in before.items() if p != a1}
            assert (await call(port, "DELETE", f"{COLLECTION}/c"))[0] == 200
            assert not (directory / "sub1" / "c.json").exists()
            assert temporaries(tmp_path) == []
            assert not (tmp_path / "destinations.json").exists()  # nothing writes the whole store


async def test_a_single_file_store_is_migrated_to_one_file_per_destination(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    fd = os.open(tmp_path / "destinations.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, key)
    os.close(fd)
    secret = {"fernet": Fernet(key).encrypt(b"pa55").decode()}
    legacy = {"format": 1, "subaccounts": {
        "sub1": {"ERP": {**OPEN, "Name": "ERP", "Authentication": "BasicAuthentication", "ProxyType": "Internet",
                         "User": "ALICE", "Password": secret}},
        "sub2": {"open": {**OPEN, "ProxyType": "Internet", "Authentication": "NoAuthentication"}},
    }}
    (tmp_path / "destinations.json").write_text(json.dumps(legacy))
    for _ in range(2):  # migrated once; the second start reads the directory
        async with running(tmp_path) as port:
            with trio.fail_after(TEST_TIMEOUT):
                found = (await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_1))[1]
                assert found["destinationConfiguration"]["Password"] == "pa55"
                assert (await call(port, "GET", COLLECTION, token="dest-admin-sub2"))[1][0]["Name"] == "open"
        assert not (tmp_path / "destinations.json").exists()
        assert (tmp_path / "destinations.json.migrated").exists()
        assert sorted(p.name for p in (tmp_path / "destinations.d").rglob("*.json")) == ["ERP.json", "open.json"]
        assert b"pa55" not in (tmp_path / "destinations.d" / "sub1" / "ERP.json").read_bytes()


# --- slow clients: deadlines on trio's clock ------------------------------------------------------

LIMITS = DestinationLimits()


async def _serve_on_memory(tmp_path: Path, nursery: trio.Nursery) -> trio.abc.HalfCloseableStream:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(new_service(tmp_path).serve_connection, server)
    return client


async def _read_to_close(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


@pytest.mark.parametrize(
    "sent",
    [
        b"GET " + COLLECTION.encode() + b" HTTP/1.1\r\nhost: d\r\n",  # a head that never ends
        b"POST " + COLLECTION.encode() + b" HTTP/1.1\r\nhost: d\r\ncontent-length: 100\r\n\r\n{\"Na",  # a body
    ],
)
async def test_a_request_that_stalls_gets_408_at_its_deadline(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                            sent: bytes) -> None:
    async with trio.open_nursery() as nursery:
        client = await _serve_on_memory(tmp_path, nursery)
        start = trio.current_time()
        await client.send_all(sent)
        answer = await _read_to_close(client)
        assert trio.current_time() == start + LIMITS.request_timeout
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer


async def test_an_idle_connection_is_closed_at_the_idle_timeout(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        client = await _serve_on_memory(tmp_path, nursery)
        start = trio.current_time()
        assert await _read_to_close(client) == b""
        assert trio.current_time() == start + LIMITS.idle_timeout


async def test_a_slow_but_steady_request_within_its_deadline_is_served(tmp_path: Path,
                                                                      autojump_clock: trio.abc.Clock) -> None:
    request = (b"GET " + COLLECTION.encode() + b" HTTP/1.1\r\nhost: d\r\nauthorization: Bearer dest-admin-sub1\r\n"
               b"connection: close\r\n\r\n")
    async with trio.open_nursery() as nursery:
        client = await _serve_on_memory(tmp_path, nursery)
        step = (LIMITS.request_timeout - 1) / len(request)
        for byte in request:
            await client.send_all(bytes([byte]))
            await trio.sleep(step)  # the scenario: a client sending slowly (virtual time)
        answer = await _read_to_close(client)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"[]")


async def test_guessing_tokens_is_slowed_per_address_and_others_are_served_at_once(tmp_path: Path) -> None:
    # Before: wrong tokens were answered 401 as fast as they came (the proxies' throttle did not
    # cover this service). Past the threshold (10) an address gets about one answer a second.
    window = 2.0
    answered = 0
    async with running(tmp_path) as port:
        with trio.move_on_after(window):
            while True:
                status, _, _ = await call(port, "GET", COLLECTION, token=f"guess-{answered}")
                assert status == 401
                answered += 1
        assert 10 <= answered <= 10 + window + 1, answered
        # another address is not slowed by the guesser's failures
        with trio.fail_after(1.0):
            sock = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            client = HttpClient(sock)
            response = await client.request("GET", COLLECTION, [("host", "d"), ("authorization", f"Bearer {USER_1}")])
            await client.aclose()
        assert response.status == 403  # a valid proxy token: known, but without the right to list
