"""Certificate renewal on virtual time: when it is due, what the node writes, and retries.

Real certificates and files; the cloud is a function signing the CSR the way the endpoint does
(`pki.sign_client_csr`), answering through `Renewer.answer` as the node's control handler would.
"""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509

from connector import pki
from connector.agent.renew import RETRY, Renewer, renewal_delay, retry_delay
from connector.tlsreload import TlsReloader

MINUTES = 6  # the certificate's validity: 1 minute ahead, and the 5 minutes `pki` backdates
RENEW_AT = 0.9  # 5.4 of the 6 minutes: 24 s after issue


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.ca = pki.create_ca(tmp_path / "ca", "acme-ca", "acme CA")
        first = pki.issue(self.ca, tmp_path, "node", common_name="node-a", organization="acme", cluster="plant",
                          client=True)
        # the wall clock at virtual time 0 (whole seconds, as certificates hold them); the cloud signs
        # at the virtual wall time, so validity and the wait agree exactly
        self.wall0 = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        # valid 6 minutes in all, 1 of them ahead (pki backdates 5)
        key_pem, csr_pem = pki.new_key_and_csr(pki.load_certificate(first.cert_path))
        cert_pem = pki.sign_client_csr(self.ca, pki.load_csr(csr_pem), pki.load_certificate(first.cert_path).subject,
                                       lifetime=datetime.timedelta(minutes=MINUTES), now=self.wall0)
        pki.install_key_pair(first.cert_path, first.key_path, cert_pem, key_pem)
        self.cert_path, self.key_path = first.cert_path, first.key_path
        self.tls = TlsReloader("test client", [self.cert_path, self.key_path], self.read_serial)
        self.refuse: str | None = None
        self.sent: list[float] = []
        self.renewer = Renewer(self.cert_path, self.key_path, self.tls, renew_at=RENEW_AT,
                               send_control=self.cloud, clock=self.wall)

    def wall(self) -> datetime.datetime:
        return self.wall0 + datetime.timedelta(seconds=trio.current_time())

    def read_serial(self) -> int:
        pki.check_key_pair(self.cert_path, self.key_path)
        return pki.load_certificate(self.cert_path).serial_number

    async def cloud(self, op: str, body: dict[str, Any]) -> None:
        self.sent.append(trio.current_time())
        if self.refuse is not None:
            self.renewer.answer("renew_refused", {"reason": self.refuse, "message": "kept offline"})
            return
        old = pki.load_certificate(self.cert_path)
        cert = pki.sign_client_csr(self.ca, pki.load_csr(body["csr"].encode()), old.subject,
                                   lifetime=old.not_valid_after_utc - old.not_valid_before_utc, now=self.wall())
        self.renewer.answer("renewed", {"cert": cert.decode()})


def test_renewal_is_due_at_the_fraction_of_the_validity() -> None:
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    class Cert:
        not_valid_before_utc = start
        not_valid_after_utc = start + datetime.timedelta(days=300)

    cert: Any = Cert()
    assert renewal_delay(cert, 0.67, start) == 201 * 86400
    assert renewal_delay(cert, 0.67, start + datetime.timedelta(days=200)) == 86400
    assert renewal_delay(cert, 0.67, start + datetime.timedelta(days=250)) == 0  # overdue: at once
    assert retry_delay(cert, start) == RETRY
    assert retry_delay(cert, start + datetime.timedelta(days=300, seconds=-50)) == 5.0  # a tenth of what is left
    assert retry_delay(cert, start + datetime.timedelta(days=301)) == 1.0  # expired: still tried, each second


async def test_the_node_renews_at_the_due_time_writes_the_key_0600_and_reloads(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    setup = Setup(tmp_path)
    old = pki.load_certificate(setup.cert_path)
    due = renewal_delay(old, RENEW_AT, setup.wall0)
    assert 0 < due < 60
    async with trio.open_nursery() as nursery:
        nursery.start_soon(setup.renewer.run)
        await setup.tls.wait_version(1)
        assert trio.current_time() == due  # exactly when due, not a tick later
        assert setup.renewer.renewals == 1
        nursery.cancel_scope.cancel()
    new = pki.load_certificate(setup.cert_path)
    assert new.serial_number != old.serial_number and setup.tls.current == new.serial_number
    assert new.subject == old.subject  # the names the cloud vouches for, again
    assert new.not_valid_after_utc - new.not_valid_before_utc == pytest.approx(
        old.not_valid_after_utc - old.not_valid_before_utc, abs=datetime.timedelta(seconds=2))
    assert stat.S_IMODE(setup.key_path.stat().st_mode) == 0o600
    pki.check_key_pair(setup.cert_path, setup.key_path)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".new")]  # nothing left aside


async def test_a_refusal_keeps_the_certificate_and_is_tried_again_sooner_as_expiry_nears(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    setup = Setup(tmp_path)
    setup.refuse = "offline_ca"
    old = pki.load_certificate(setup.cert_path)
    before = setup.cert_path.read_bytes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(setup.renewer.run)
        while len(setup.sent) < 3:  # noqa: ASYNC110 - virtual time: each pass jumps to the next attempt
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    due = renewal_delay(old, RENEW_AT, setup.wall0)
    first_retry = retry_delay(old, setup.wall0 + datetime.timedelta(seconds=due))
    assert setup.sent[0] == due
    assert setup.sent[1] == pytest.approx(due + first_retry)
    assert setup.sent[2] - setup.sent[1] < first_retry  # less validity left: sooner
    assert setup.cert_path.read_bytes() == before and setup.tls.version == 0
    assert setup.renewer.last_failure == "the cloud refused: offline_ca: kept offline"


async def test_a_certificate_replaced_by_an_operator_restarts_the_wait(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    setup = Setup(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(setup.renewer.run)
        await trio.sleep(1)
        operator = pki.issue(setup.ca, tmp_path / "op", "node", common_name="node-a", organization="acme",
                             client=True)  # valid a year
        pki.install_key_pair(setup.cert_path, setup.key_path, operator.cert_path.read_bytes(),
                             operator.key_path.read_bytes())
        assert setup.tls.check()
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert setup.sent == []  # the year-long certificate is far from due
    assert isinstance(pki.load_certificate(setup.cert_path), x509.Certificate)
