"""`connector cloud` wires the destination service from cloud.toml: both token kinds and the limits."""

from __future__ import annotations

from pathlib import Path

import trio

from connector.cloud.auth import hash_token
from tests.support.destinations import BASE, COLLECTION, call
from tests.support.httpclient import HttpClient
from tests.support.stack import TOKEN, start_stack

ADMIN = "destination-admin-token-0123456789"
OPEN = {"Name": "open", "Type": "HTTP", "URL": "http://open.virtual"}


async def test_cloud_toml_gives_the_admin_token_manage_and_the_proxy_token_use(tmp_path: Path) -> None:
    extra = f"""destination_admin_sha256 = ["{hash_token(ADMIN)}"]
[destinations]
listen = "127.0.0.1:0"
store = "state/destinations.json"
max_destinations = 1
"""
    (tmp_path / "state").mkdir()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, tmp_path, with_node=False, extra=extra)
            port = stack.ports.destinations
            assert port is not None
            assert (await call(port, "POST", COLLECTION, OPEN, token=ADMIN))[0] == 201
            status, answer, _ = await call(port, "POST", COLLECTION, {**OPEN, "Name": "two"}, token=ADMIN)
            assert (status, answer["error"]) == (409, "too_many_destinations")  # max_destinations = 1
            assert (await call(port, "GET", COLLECTION, token=TOKEN))[0] == 403
            status, found, _ = await call(port, "GET", f"{BASE}/destinations/open", token=TOKEN)
            assert status == 200 and found["destinationConfiguration"]["URL"] == "http://open.virtual"
            assert (await call(port, "GET", f"{BASE}/destinations/open", token=ADMIN))[0] == 403
            proxy = await HttpClient.connect(stack.ports.http_proxy)  # an admin token is no proxy token
            response = await proxy.request("GET", "http://open.virtual/", [("Proxy-Authorization", f"Bearer {ADMIN}")])
            assert response.status == 407
            await proxy.aclose()
            nursery.cancel_scope.cancel()
    assert (tmp_path / "state" / "destinations.d").is_dir()
