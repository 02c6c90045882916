"""The data-mover contract: one verified copy of one replica, under a real deadline.

``copy`` either leaves a complete copy at the destination whose size and checksum agree with
the catalogue, or raises: :class:`SourceError` when this copy of the file cannot be used (missing,
corrupt: another source may be tried, retrying this one will not help) or
:class:`TransferFailed` when the transfer failed for a reason that may pass (the destination full
or unreachable, a timeout): the data service retries it with backoff. A mover never leaves a
partial file under the final name.

A file already at the destination is never replaced: when its size and checksum agree with the
catalogue the copy is done (a retried copy, or another server's), otherwise the copy fails with
:class:`DestinationExists`, which says what differs; an operator removes that file if it must go.

The deadline is real: a transfer blocked in a socket read or in a child ``xrdcp`` is stopped when
its time is up (:class:`Deadline` shuts the sockets down from a timer thread; child processes are
killed with their process group), not only checked between chunks.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass

from panda_core.drivers import load_driver

log = logging.getLogger(__name__)


class SourceError(Exception):
    """This copy of the file cannot be used (missing, not a file, wrong size or checksum)."""


class TransferFailed(Exception):
    """The copy failed for a reason that may pass (destination full, unwritable, too slow)."""


class DestinationExists(TransferFailed):
    """The destination already holds other bytes under the replica's name (or bytes that could
    not be checked): it is not replaced. Retried like any TransferFailed, since the file may be
    removed meanwhile; the message says what differs."""

    def __init__(self, dst_url: str, why: str) -> None:
        super().__init__(f"{dst_url} already exists and does not match the catalogue ({why}); "
                         "a replica is never replaced: remove it there if it must go")


@dataclass
class FileRef:
    scope: str
    lfn: str
    fsize: int | None
    checksum: str | None          # "ad:xxxxxxxx" or "md5:..." as registered


def mismatch(expected: FileRef, size: int | None, adler: str | None,
             md5: str | None = None) -> str | None:
    """None if what was seen agrees with the catalogue, else what differs. A value that was not
    seen (None) is not compared; a catalogue checksum that nothing could be compared with is."""
    if expected.fsize is not None and size is not None and size != expected.fsize:
        return f"size {size} bytes, catalogue says {expected.fsize}"
    ck = (expected.checksum or "").lower()
    if ck.startswith("ad:"):
        if adler is None:
            return "no adler32 to compare with the catalogue's"
        if ck[3:].zfill(8) != adler.lower().zfill(8):
            return f"adler32 {adler}, catalogue says {ck[3:]}"
    if ck.startswith("md5:") and md5 is not None and ck[4:] != md5.lower():
        return f"md5 {md5}, catalogue says {ck[4:]}"
    return None


class Deadline:
    """A wall-clock limit for one transfer that can interrupt blocking socket calls.

    Sockets registered with :meth:`watch` are shut down (both directions) when the time is up, so
    a ``recv`` that would wait forever returns at once and the transfer fails; :attr:`expired`
    tells the caller why it failed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self.expired:
                _shutdown(sock)
            self._socks.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def __enter__(self) -> "Deadline":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class DataMover(ABC):
    """A data-management backend: copies one replica from one storage element to another."""

    name = "base"
    schemes: tuple[str, ...] = ()

    def handles(self, url: str) -> bool:
        return urllib.parse.urlparse(url).scheme in self.schemes

    def can_copy(self, src_url: str, dst_url: str) -> bool:
        """Whether this mover can copy between these two URLs (both ends in its family)."""
        return self.handles(src_url) and self.handles(dst_url)

    @abstractmethod
    def copy(self, src_url: str, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        """Put a verified copy at ``dst_url`` within ``timeout_s`` seconds; raise SourceError or
        TransferFailed."""


def load_mover(name: str = "local", **options) -> DataMover:
    """A mover by its entry-point name in ``panda.datamovers``."""
    return load_driver("panda.datamovers", name, invoke_kwds=options, error=ValueError,
                       kind="data mover")


def load_movers(spec: str, options: dict[str, dict] | None = None) -> list[DataMover]:
    """Movers from a comma-separated list of names (``local,http,xrootd``), in order of
    preference; ``options`` maps a mover's name to its keyword options."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("no data mover named")
    return [load_mover(n, **((options or {}).get(n) or {})) for n in names]
