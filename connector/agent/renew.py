"""The node renews its tunnel certificate through the tunnel, before it expires.

Theory of operation: once `renew_at` of the certificate's validity has passed (``[tunnel]
renew_at``, 0.67 by default: a year's certificate is renewed with four months left), the node
makes a new key and a CSR for it and sends the CSR to the cloud over a tunnel (CONTROL
``renew`` {"csr"}). A cloud holding the subaccount CA's key (``[[subaccounts]] ca_key``) signs a
certificate naming what the tunnel's certificate names, valid as long, and answers ``renewed``
{"cert"}; one whose CA is kept offline answers ``renew_refused`` (reason ``offline_ca``) and an
operator renews instead (docs/operations.md). The node checks that the certificate is for its
new key, writes key (0600) and certificate atomically over the old ones and reloads its TLS
context (`connector.tlsreload`): tunnels up stay, the next dial presents the new certificate.

Time: validity is wall-clock time, read once per certificate to know how long until renewal is
due; the wait itself is trio time (`renewal_delay`), so it is tested under `autojump_clock`. A
failed attempt (no tunnel, refused, no answer within `ANSWER_TIMEOUT`) is tried again after
`RETRY` seconds, sooner when little validity is left; the certificate in use stays meanwhile.
A certificate replaced by other means (an operator) is noticed through the reloader and the
wait starts over from it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from connector import pki
from connector.tlsreload import TlsReloader

log = logging.getLogger(__name__)

RENEW_OP = "renew"  # node -> cloud {"csr": PEM}
RENEWED_OP = "renewed"  # cloud -> node {"cert": PEM}
RENEW_REFUSED_OP = "renew_refused"  # cloud -> node {"reason", "message"}
ANSWER_TIMEOUT = 30.0  # seconds for the cloud's answer to a CSR
RETRY = 300.0  # seconds between attempts after a failure, at most (see `retry_delay`)
MIN_RETRY = 1.0

WallClock = Callable[[], datetime.datetime]
SendControl = Callable[[str, dict[str, Any]], Awaitable[None]]


class RenewalError(Exception):
    """One attempt to renew failed; the message says why."""


def wall_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def renewal_delay(cert: x509.Certificate, renew_at: float, now: datetime.datetime) -> float:
    """Seconds from `now` until `renew_at` of the certificate's validity has passed (0: due)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    due = start + (end - start) * renew_at
    return max(0.0, (due - now).total_seconds())


def retry_delay(cert: x509.Certificate, now: datetime.datetime) -> float:
    """After a failed attempt: `RETRY`, or a tenth of the validity left when that is sooner."""
    left = (cert.not_valid_after_utc - now).total_seconds()
    return max(MIN_RETRY, min(RETRY, left / 10))


class Renewer:
    """Renews the certificate in `cert_path`/`key_path` through `send_control` (see the module
    docstring); the node hands the cloud's answers to `answer`."""

    def __init__(self, cert_path: Path, key_path: Path, tls: TlsReloader[Any], *, renew_at: float,
                 send_control: SendControl, clock: WallClock = wall_now) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.tls = tls
        self.renew_at = renew_at
        self.send_control = send_control  # to the cloud over any tunnel; RenewalError without one
        self.clock = clock
        self.renewals = 0
        self.last_failure: str | None = None
        self._answers: trio.MemorySendChannel[tuple[str, dict[str, Any]]] | None = None

    def answer(self, op: str, body: dict[str, Any]) -> None:
        """The cloud's ``renewed`` or ``renew_refused``; ignored (logged) when nothing was asked."""
        if self._answers is None:
            log.warning("ignoring an unrequested %r from the cloud", op)
            return
        try:
            self._answers.send_nowait((op, body))
        except trio.WouldBlock:
            log.warning("ignoring a second answer %r to one certificate renewal", op)

    async def run(self) -> None:
        while True:
            version = self.tls.version
            try:
                cert = pki.load_certificate(self.cert_path)
            except pki.CertificateError as exc:  # being replaced, or broken: the reloader says which
                log.warning("cannot read the tunnel certificate to plan its renewal: %s", exc)
                with trio.move_on_after(RETRY):
                    await self.tls.wait_version(version + 1)
                continue
            delay = renewal_delay(cert, self.renew_at, self.clock())
            if delay > 0:
                log.info("tunnel certificate valid until %s: renewing it in %.0f s", cert.not_valid_after_utc, delay)
                with trio.move_on_after(delay):
                    await self.tls.wait_version(version + 1)
                    continue  # replaced meanwhile: start over from the new one
            try:
                await self.renew_once(cert)
            except RenewalError as exc:
                self.last_failure = str(exc)
                retry = retry_delay(cert, self.clock())
                log.warning("tunnel certificate renewal failed: %s; trying again in %.0f s", exc, retry)
                with trio.move_on_after(retry):
                    await self.tls.wait_version(version + 1)

    async def renew_once(self, cert: x509.Certificate) -> x509.Certificate:
        """One attempt: CSR out, certificate in, written and loaded; RenewalError says why not."""
        key_pem, csr_pem = pki.new_key_and_csr(cert)
        send, receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](1)
        self._answers = send
        answer: tuple[str, dict[str, Any]] | None = None
        try:
            await self.send_control(RENEW_OP, {"csr": csr_pem.decode()})
            with trio.move_on_after(ANSWER_TIMEOUT):
                answer = await receive.receive()
        finally:
            self._answers = None
        if answer is None:
            raise RenewalError(f"the cloud did not answer within {ANSWER_TIMEOUT:g} s")
        op, body = answer
        if op != RENEWED_OP:
            raise RenewalError(f"the cloud refused: {body.get('reason')}: {body.get('message')}")
        new = self._check(body.get("cert"), key_pem)
        pki.install_key_pair(self.cert_path, self.key_path, new.public_bytes(serialization.Encoding.PEM), key_pem)
        if not self.tls.reload():
            raise RenewalError(f"the renewed certificate does not load: {self.tls.failure}")
        self.renewals += 1
        self.last_failure = None
        log.info("tunnel certificate renewed: serial %#x, valid until %s", new.serial_number, new.not_valid_after_utc)
        return new

    @staticmethod
    def _check(cert_pem: Any, key_pem: bytes) -> x509.Certificate:
        if not isinstance(cert_pem, str):
            raise RenewalError("the cloud's answer holds no certificate")
        try:
            new = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError as exc:
            raise RenewalError(f"the cloud's answer is not a PEM certificate ({exc})") from None
        key = serialization.load_pem_private_key(key_pem, password=None)
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if (new.public_key().public_bytes(serialization.Encoding.PEM, public)
                != key.public_key().public_bytes(serialization.Encoding.PEM, public)):
            raise RenewalError("the cloud's certificate is not for the key this node sent")
        return new
