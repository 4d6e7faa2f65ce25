"""The keys of a trusted identity provider fetched from its jwks_uri (connector.cloud.idp_keys):
when they are fetched again (period, max-age within bounds, an unknown kid at most once a minute)
and that a failed fetch keeps the last good keys. Pure timing logic: the fetch is a function of
the test's, times are trio's under autojump_clock."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from connector import metrics
from connector.cloud.idp_keys import MIN_FETCH_INTERVAL, RemoteJwks, max_age
from connector.cloud.jwtauth import rsa_keys
from connector.cloud.token_client import TokenClientSettings, TokenError
from connector.config import ConfigError, load_cloud_config


class Provider:
    """A JWKS endpoint as the test wants it: its key ids (fetch answers them), max-age, or down."""

    def __init__(self, *kids: str) -> None:
        self.kids = list(kids)
        self.max_age: float | None = None
        self.down = False
        self.calls: list[float] = []

    async def __call__(self) -> tuple[Any, float | None]:
        self.calls.append(trio.current_time())
        await trio.sleep(0.5)  # a fetch takes time: callers meanwhile wait for it
        if self.down:
            raise TokenError("the JWKS endpoint at idp:443 could not be reached: refused")
        return {"keys": [{"kid": kid} for kid in self.kids]}, self.max_age


def parse(document: Any) -> dict[str, Any]:
    return {key["kid"]: f"key-{key['kid']}" for key in document["keys"]}


def source(provider: Provider, refresh: float = 600.0) -> RemoteJwks:
    return RemoteJwks("https://idp.example/keys", TokenClientSettings(), parse, refresh_seconds=refresh,
                      fetch=provider)


async def test_keys_are_fetched_at_start_and_every_refresh_interval(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    provider = Provider("k1")
    keys = source(provider, refresh=300.0)
    start = trio.current_time()
    nursery.start_soon(keys.run)
    await keys.wait_fetched(1)
    assert await keys.key("k1") == "key-k1"
    await keys.wait_fetched(4)
    assert [round(t - start) for t in provider.calls] == [0, 300, 600, 900]


@pytest.mark.parametrize(("age", "interval"), [(None, 600), (5, MIN_FETCH_INTERVAL), (120, 120), (86400, 600)])
async def test_max_age_sets_the_interval_within_a_minute_and_refresh_seconds(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, age: float | None, interval: float) -> None:
    provider = Provider("k1")
    provider.max_age = age
    keys = source(provider)
    nursery.start_soon(keys.run)
    await keys.wait_fetched(2)
    assert provider.calls[1] - provider.calls[0] == interval


async def test_an_unknown_kid_fetches_once_and_finds_a_key_added_since(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    provider = Provider("k1")
    keys = source(provider)
    nursery.start_soon(keys.run)
    await keys.wait_fetched(1)
    await trio.sleep(MIN_FETCH_INTERVAL)
    provider.kids.append("k2")  # the provider rotates
    assert await keys.key("k2") == "key-k2"
    assert len(provider.calls) == 2


async def test_a_flood_of_unknown_kids_fetches_at_most_once_a_minute(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    provider = Provider("k1")
    keys = source(provider)
    nursery.start_soon(keys.run)
    await keys.wait_fetched(1)
    start = trio.current_time()
    found: list[Any] = []

    async def forge(i: int) -> None:
        found.append(await keys.key(f"forged-{i}"))

    for second in range(300):  # 5 minutes, 20 forged kids a second, some at once
        async with trio.open_nursery() as burst:
            for i in range(20):
                burst.start_soon(forge, second * 20 + i)
        await trio.sleep(1)
        assert await keys.key("k1") == "key-k1"  # a known kid never waits or fetches
    assert found == [None] * 6000
    fetched = [t - start for t in provider.calls[1:]]
    assert 4 <= len(fetched) <= 5  # the flood did make fetches: once a minute, no more
    assert all(b - a >= MIN_FETCH_INTERVAL for a, b in itertools.pairwise(provider.calls))


async def test_a_failed_fetch_keeps_the_last_keys_is_counted_and_retried_after_a_minute(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    provider = Provider("k1")
    keys = source(provider)
    failed = metrics.TRUSTED_ISSUER_KEY_FETCHES.labels(keys.uri, "failed")
    before = failed._value.get()
    nursery.start_soon(keys.run)
    await keys.wait_fetched(1)
    provider.down = True
    await keys.wait_fetched(2)  # the periodic one, 600 s on
    assert await keys.key("k1") == "key-k1" and keys.failures == 1
    assert failed._value.get() == before + 1
    await keys.wait_fetched(3)
    assert provider.calls[2] - provider.calls[1] == MIN_FETCH_INTERVAL  # retried soon, not in 10 minutes
    provider.down = False
    provider.kids = ["k2"]
    await keys.wait_fetched(4)
    assert await keys.key("k2") == "key-k2"


async def test_an_answer_without_keys_keeps_the_last_ones(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    provider = Provider("k1")
    keys = RemoteJwks("https://idp.example/keys", TokenClientSettings(), rsa_keys, fetch=provider)
    nursery.start_soon(keys.run)
    await keys.wait_fetched(1)
    assert keys.keys == {} and keys.failures == 1  # {"kid": "k1"} is no RSA key: refused, nothing trusted


def test_max_age_is_read_from_cache_control() -> None:
    assert max_age([(b"cache-control", b"public, max-age=300")]) == 300
    assert max_age([(b"cache-control", b"no-cache")]) is None
    assert max_age([(b"cache-control", b"max-age=-1")]) is None
    assert max_age([]) is None


@pytest.mark.parametrize(("entry", "key", "message"), [
    ('jwks_uri = "http://idp.example/keys"', "trusted_issuers[0].jwks_uri", "https"),
    ('jwks_uri = "https://idp.example/keys"\nrefresh_seconds = 30', "trusted_issuers[0].refresh_seconds",
     "at least 60"),
    ('jwks_uri = "https://idp.example/keys"\ntimeout = 0', "trusted_issuers[0].timeout", "positive"),
    ('jwks_uri = "https://idp.example/keys"\nca = "cloud.toml"', "trusted_issuers[0].ca", "no usable CA"),
    ('jwks_uri = "https://idp.example/keys"\njwks = "keys.json"', "trusted_issuers[0]", "exactly one"),
    ('', "trusted_issuers[0]", "exactly one"),
    ('jwks = "keys.json"\nrefresh_seconds = 120', "trusted_issuers[0].refresh_seconds", "jwks_uri only"),
])
def test_a_bad_jwks_uri_entry_is_refused_at_load(tmp_path: Path, entry: str, key: str, message: str) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "keys.json").write_text('{"keys": []}')
    (tmp_path / "cloud.toml").write_text(f"""
[tunnel]
cert = "ca.pem"
key = "ca.pem"
[[subaccounts]]
id = "acme"
ca = "ca.pem"
token_sha256 = []
[[subaccounts.trusted_issuers]]
issuer = "https://idp.example"
audience = "app"
{entry}
""")
    with pytest.raises(ConfigError, match=message) as caught:
        load_cloud_config(tmp_path / "cloud.toml")
    assert caught.value.key.endswith(key)
