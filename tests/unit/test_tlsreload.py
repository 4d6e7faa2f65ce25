"""`TlsReloader` on virtual time: files looked at every interval, unusable files logged and the old
value kept, and the deny-list of revoked serials (`connector.cloud.revocation`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio

from connector import pki
from connector.cloud.revocation import RevokedSerials, format_serial, parse_serial
from connector.tlsreload import TlsReloader

INTERVAL = 5.0


def make_pair(directory: Path, ca: pki.Issued, name: str) -> pki.Issued:
    return pki.issue(ca, directory, name, common_name=name, server_names=["127.0.0.1"], force=True)


def serial_reader(cert: Path, key: Path) -> TlsReloader[int]:
    def build() -> int:
        pki.check_key_pair(cert, key)
        return pki.load_certificate(cert).serial_number

    return TlsReloader("test endpoint", [cert, key], build, interval=INTERVAL)


def replace(target: Path, source: Path) -> None:
    """Atomically, as a deployment tool does (a new inode: the change is seen whatever the mtime)."""
    tmp = target.with_suffix(".new")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


async def test_a_changed_file_is_read_at_the_next_interval(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    ca = pki.create_ca(tmp_path, "ca", "test CA")
    live = make_pair(tmp_path, ca, "live")
    reloader = serial_reader(live.cert_path, live.key_path)
    first = reloader.current
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloader.run)
        await trio.sleep(INTERVAL * 1.5)
        assert (reloader.version, reloader.current) == (0, first)  # nothing changed: nothing built
        new = make_pair(tmp_path / "new", ca, "new")
        replace(live.key_path, new.key_path)
        replace(live.cert_path, new.cert_path)
        changed_at = trio.current_time()
        await reloader.wait_version(1)
        assert trio.current_time() == 2 * INTERVAL  # the next look after the change, no later
        assert trio.current_time() - changed_at <= INTERVAL
        assert reloader.current == pki.load_certificate(new.cert_path).serial_number != first
        nursery.cancel_scope.cancel()


async def test_an_unusable_file_is_logged_once_and_the_old_value_kept_until_a_usable_one(
        tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    ca = pki.create_ca(tmp_path, "ca", "test CA")
    live = make_pair(tmp_path, ca, "live")
    other = make_pair(tmp_path / "other", ca, "other")
    reloader = serial_reader(live.cert_path, live.key_path)
    first = reloader.current
    replace(live.key_path, other.key_path)  # the key of another certificate
    caplog.set_level(logging.ERROR, "connector.tlsreload")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloader.run)
        await trio.sleep(INTERVAL * 3.5)  # three looks, one change
        errors = [r.getMessage() for r in caplog.records]
        assert len(errors) == 1, errors
        assert "test endpoint: not reloading the certificates" in errors[0]
        assert f"{live.key_path} is not the private key of {live.cert_path}" in errors[0]
        assert "the ones loaded before stay in use" in errors[0]
        assert (reloader.current, reloader.version) == (first, 0)
        assert reloader.failure is not None

        replace(live.cert_path, other.cert_path)  # the certificate follows: now a pair
        await reloader.wait_version(1)
        assert reloader.current == pki.load_certificate(other.cert_path).serial_number
        assert reloader.failure is None
        nursery.cancel_scope.cancel()


def test_reload_builds_again_whatever_the_times_say_and_keeps_the_old_value_on_a_missing_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = pki.create_ca(tmp_path, "ca", "test CA")
    live = make_pair(tmp_path, ca, "live")
    reloader = serial_reader(live.cert_path, live.key_path)
    assert reloader.reload() and reloader.version == 1  # SIGHUP with nothing changed: read again anyway
    first = reloader.current
    live.cert_path.unlink()
    assert not reloader.check()
    assert reloader.current == first
    assert f"{live.cert_path}: no such certificate file" in caplog.text


@pytest.mark.parametrize(("text", "serial"), [
    ("1234", 1234), ("0x4d2", 1234), ("0X4D2", 1234), ("04:d2", 1234), ("04:D2", 1234), (" 1234\n", 1234),
])
def test_a_serial_is_read_in_the_forms_operators_copy_it(text: str, serial: int) -> None:
    assert parse_serial(text) == serial
    assert format_serial(serial) == "0x4d2"


@pytest.mark.parametrize("text", ["", "4d2", "0xzz", "0", "-5", "12:zz"])
def test_a_serial_that_is_not_one_is_refused_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="serial"):
        parse_serial(text)


async def test_a_tunnel_waiting_on_its_serial_wakes_when_it_is_revoked_and_not_before(
        autojump_clock: trio.abc.Clock) -> None:
    revoked = RevokedSerials([1])
    woke: list[float] = []

    async def tunnel(serial: int) -> None:
        await revoked.wait_revoked(serial)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel, 2)
        await trio.sleep(1)
        assert revoked.replace([1, 3]) == {3}  # another serial: 2 sleeps on
        await trio.sleep(1)
        assert woke == []
        assert revoked.replace([1, 2, 3]) == {2}
    assert woke == [2.0]
    assert 2 in revoked and len(revoked) == 3
    await revoked.wait_revoked(1)  # already on the list: at once
