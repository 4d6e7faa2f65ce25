"""Revoked node certificates: a deny-list of serial numbers the tunnel endpoint refuses.

Theory of operation: the list lives in the cloud's etcd (``revoked/<serial in hex>``, written by
``connector cloud-revoke``) and every replica follows it (`connector.cloud.shared.RevocationSync`)
into its `RevokedSerials`. The tunnel endpoint looks a client certificate's serial up right after
the TLS handshake and refuses a revoked one once the tunnel's HELLO is through (so the node is
told why: GOAWAY(DENIED, "certificate_revoked: ...")). Each admitted tunnel also waits on
`wait_revoked(serial)`, so a serial revoked while its tunnel is up closes that tunnel on every
replica within the watch's delay.

Serials are unique per issuing CA; the subaccount CAs draw them at random over 159 bits (what
`connector certs` and `cryptography` do), so one list for all subaccounts is enough.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio


def parse_serial(text: str) -> int:
    """A serial as an operator writes it: decimal (``1234``), hex with ``0x`` (``0x4d2``), or
    hex bytes with colons as ``openssl x509 -serial``/``-text`` print them (``04:d2``).
    ValueError naming the forms otherwise."""
    text = text.strip()
    try:
        if text.lower().startswith("0x"):
            serial = int(text[2:], 16)
        elif ":" in text:
            serial = int(text.replace(":", ""), 16)
        else:
            serial = int(text, 10)
    except ValueError:
        raise ValueError(f"{text!r} is not a certificate serial: give it in decimal, as 0x<hex>, or as "
                         "colon-separated hex bytes") from None
    if serial <= 0:
        raise ValueError(f"{text!r}: a certificate serial is a positive number")
    return serial


def format_serial(serial: int) -> str:
    """The serial as the etcd key and the logs name it: lowercase hex with ``0x``."""
    return f"0x{serial:x}"


class RevokedSerials:
    """The serials refused now; `replace` installs a new list and wakes the tunnels it revokes."""

    def __init__(self, serials: Iterable[int] = ()) -> None:
        self._serials = frozenset(serials)
        self._changed = trio.lowlevel.ParkingLot()

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials

    def __len__(self) -> int:
        return len(self._serials)

    def replace(self, serials: Iterable[int]) -> frozenset[int]:
        """Install `serials`; the ones newly revoked."""
        new = frozenset(serials)
        added, self._serials = new - self._serials, new
        if added:
            self._changed.unpark_all()
        return added

    async def wait_revoked(self, serial: int) -> None:
        """Return once `serial` is on the list (at once if it is)."""
        while serial not in self._serials:
            await self._changed.park()
