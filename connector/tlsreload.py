"""TLS material that follows its files: certificates, keys and trust stores reloaded live.

Theory of operation: a `TlsReloader` holds what a TLS user needs (an `ssl.SSLContext`, and
whatever else is read from the same files), made by a `build()` function from a list of files.
`check()` compares each file's (mtime, size, inode) with what they were at the last build and,
on a change, builds again: the new value replaces the old one, so the next handshake uses it,
while connections already up keep theirs (a context only matters at the handshake: a reload
drops no tunnel and no request).

A build that fails (a half-written file, a key that is not the certificate's, a CA that is not
PEM) is logged at ERROR with its cause, once per change of the files, and the old value stays in
use; the next change is tried again, so a certificate and a key written one after the other load
once both are there. `run` checks every `interval` seconds of trio time; `reload` (SIGHUP) builds
again whatever the files' times say. `wait_version` lets tests wait for a reload, not poll.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import trio

from connector import metrics, pki

log = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0  # seconds of trio time between looks at the files' times

T = TypeVar("T")
_Stamp = tuple[tuple[int, int, int] | None, ...]


class TlsReloader(Generic[T]):
    def __init__(self, what: str, paths: Sequence[Path], build: Callable[[], T], *,
                 interval: float = CHECK_INTERVAL) -> None:
        self.what = what  # "tunnel endpoint", "tunnel client": names it in the log
        self.paths = list(paths)
        self.interval = interval
        self._build = build
        self._stamp = self._stamps()
        self.current: T = build()  # at start an unusable file is an error (the caller's to report)
        self.version = 0  # how many reloads succeeded
        self.failure: str | None = None  # why the last attempt failed, until one succeeds
        self.on_reload: Callable[[T], None] = lambda value: None
        self._reloaded = trio.lowlevel.ParkingLot()

    def _stamps(self) -> _Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def check(self) -> bool:
        """Build again if a file changed since the last look; whether the value was replaced."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return self.reload()

    def reload(self) -> bool:
        """Build again now (SIGHUP); whether the value was replaced (False: logged, old kept)."""
        self._stamp = self._stamps()
        try:
            value = self._build()
        except (pki.CertificateError, ssl.SSLError, OSError, ValueError) as exc:
            self.failure = str(exc) or type(exc).__name__
            metrics.CERT_RELOAD_FAILURES.labels(self.what).inc()
            log.error("%s: not reloading the certificates, the files are unusable (%s); the ones loaded "
                      "before stay in use", self.what, self.failure)
            return False
        self.current = value
        self.version += 1
        self.failure = None
        log.info("%s: certificates reloaded from %s (new handshakes use them; connections up keep theirs)",
                 self.what, ", ".join(str(p) for p in self.paths))
        self.on_reload(value)
        self._reloaded.unpark_all()
        return True

    async def run(self) -> None:
        """Look at the files every `interval` seconds until cancelled."""
        while True:
            await trio.sleep(self.interval)
            self.check()

    async def wait_version(self, version: int) -> None:
        """Return once `version` reloads succeeded."""
        while self.version < version:
            await self._reloaded.park()
