"""The destination service's token cache, on trio's virtual clock (no sockets: pure logic)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from connector.cloud.token_client import TokenCache, TokenError, TokenRequest

ROUND_TRIP = 1.0  # the token service's answer time, virtual
LIFETIME = 100  # expires_in of the fake answers


def request(client_id: str = "c", secret: str = "s", **params: str) -> TokenRequest:
    return TokenRequest("https://uaa.example/oauth/token", client_id, secret, "client_credentials",
                        tuple(params.items()))


class Service:
    """A token endpoint that counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[TokenRequest] = []

    async def __call__(self, req: TokenRequest) -> dict[str, Any]:
        await trio.sleep(ROUND_TRIP)
        self.asked.append(req)
        return {"access_token": f"{req.client_id}-{len(self.asked)}", "expires_in": LIFETIME}


async def test_a_token_is_reused_until_90_percent_of_its_life_then_fetched_again(
        autojump_clock: trio.testing.MockClock) -> None:
    service = Service()
    cache = TokenCache(service)
    start = trio.current_time()
    first = await cache.get(request())
    assert (first.access_token, trio.current_time()) == ("c-1", start + ROUND_TRIP)
    assert first.refresh_at == start + ROUND_TRIP + 0.9 * LIFETIME
    await trio.sleep(0.9 * LIFETIME - 0.5)
    again = await cache.get(request())
    assert again is first and again.expires_in() == int(LIFETIME - (0.9 * LIFETIME - 0.5))
    await trio.sleep(0.5)  # now at the refresh time
    fresh = await cache.get(request())
    assert fresh.access_token == "c-2" and cache.fetches == 2
    assert trio.current_time() == start + ROUND_TRIP + 0.9 * LIFETIME + ROUND_TRIP


async def test_concurrent_callers_share_one_fetch_and_no_lock_is_left_behind(
        autojump_clock: trio.testing.MockClock) -> None:
    service = Service()
    cache = TokenCache(service)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(cache.get, request())
    assert len(service.asked) == 1 and cache._locks == {}


async def test_the_key_holds_the_secrets_so_a_wrong_secret_never_gets_the_cached_token(
        autojump_clock: trio.testing.MockClock) -> None:
    service = Service()
    cache = TokenCache(service)
    await cache.get(request(secret="right"))
    await cache.get(request(secret="guess"))
    await cache.get(request(username="alice", password="a"))
    await cache.get(request(username="bob", password="b"))
    assert len(service.asked) == 4 and len(cache) == 4


async def test_failures_are_not_cached_and_a_bad_answer_is_a_token_error(
        autojump_clock: trio.testing.MockClock) -> None:
    answers: list[dict[str, Any]] = [{"access_token": "t"}, {"access_token": "t", "expires_in": "60"}]

    async def fetch(req: TokenRequest) -> dict[str, Any]:
        return answers.pop(0)

    cache = TokenCache(fetch)
    with pytest.raises(TokenError, match="expires_in"):
        await cache.get(request())
    token = await cache.get(request())  # tried again; a numeric string is taken
    assert token.expires_at == trio.current_time() + 60


async def test_at_most_max_entries_the_first_to_expire_makes_room(autojump_clock: trio.testing.MockClock) -> None:
    lifetimes = iter([50, 10, 90])

    async def fetch(req: TokenRequest) -> dict[str, Any]:
        return {"access_token": req.client_id, "expires_in": next(lifetimes)}

    cache = TokenCache(fetch, max_entries=2)
    for client in ("a", "b", "c"):
        await cache.get(request(client))
    assert sorted(key[1] for key in cache._entries) == ["a", "c"]
