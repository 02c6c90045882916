"""Third-party copy into this storage element: WebDAV ``COPY`` in the grid's HTTP-TPC pull mode.

A client (the server's data service) sends ``COPY /path`` with ``Source: http(s)://other-se/path``;
this storage element fetches the file itself and stores it under ``/path`` as an upload would be
(a hidden temporary name, renamed once complete, adler32 recorded). ``TransferHeader<Name>``
headers are sent to the source as ``<Name>`` (``TransferHeaderAuthorization`` carries the token
the source wants). The reply is ``202`` and a body of progress markers, one every few seconds,
ending in ``success: Created`` or ``failure: <reason>``: the status line must go out before the
outcome is known.

Only sources on an allow list (``panda se --tpc-allow HOST:PORT``, ``*`` for any) are fetched:
without it any writer could make this host fetch any URL its network reaches. A client that goes
away cancels the fetch and the partial file is removed. Push mode (``Destination:``) is not
offered (501).

A file already at the path is not replaced unless the request says ``Overwrite: T`` (WebDAV's
header; unlike WebDAV, absent means F here, as a replica is never overwritten): it is refused
with 412 before the fetch, and a file that appears during the fetch makes it fail (the fetched
copy gets the name only if it is still free).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from copytools.checksum import StreamChecksum

log = logging.getLogger(__name__)

MARKER_EVERY_S = 5.0


@dataclass
class TpcConfig:
    allow: tuple[str, ...] = ()         # "host:port" entries, or "*"
    ca_bundle: str | None = None        # verifies https sources (default: the system's)
    timeout_s: float = 3600.0           # one pull, at most
    connect_timeout_s: float = 30.0
    _client: SimpleAsyncHTTPClient | None = field(default=None, repr=False)

    def allows(self, url: str) -> str | None:
        """None if ``url`` may be fetched, else why not."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"source {url!r} is not an http(s) URL"
        if not self.allow:
            return "third-party copy is not enabled on this storage element (panda se --tpc-allow)"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if "*" in self.allow or f"{parts.hostname}:{port}" in self.allow:
            return None
        return f"source host {parts.hostname}:{port} is not on this storage element's allow list"

    def client(self) -> SimpleAsyncHTTPClient:
        if self._client is None:
            self._client = SimpleAsyncHTTPClient(force_instance=True, max_body_size=1 << 50,
                                                 max_buffer_size=16 << 20)
        return self._client


class PullCancelled(Exception):
    """The client that asked for the copy went away."""


class Pull:
    """One fetch of ``source`` into ``target`` (a path below the root, checked by the caller)."""

    def __init__(self, cfg: TpcConfig, source: str, target: str, source_headers: dict[str, str],
                 progress, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.source = source
        self.target = target
        self.overwrite = overwrite          # replace a file at ``target`` (Overwrite: T)
        self.headers = source_headers
        self.progress = progress            # called with bytes so far, at most every few seconds
        self.cancelled = False
        self.cs = StreamChecksum()
        self._fd: int | None = None
        self._tmp: str | None = None
        self._last_marker = time.monotonic()

    def _chunk(self, data: bytes) -> None:
        if self.cancelled:
            raise PullCancelled("the client went away")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.cs.update(data)
        now = time.monotonic()
        if now - self._last_marker >= MARKER_EVERY_S:
            self._last_marker = now
            self.progress(self.cs.size)

    async def run(self, upload_prefix: str, xattr: str) -> str | None:
        """Fetch and store; None on success, else the reason it failed (nothing left behind)."""
        parent = os.path.dirname(self.target)
        try:
            os.makedirs(parent, exist_ok=True)
            self._tmp = os.path.join(parent, f"{upload_prefix}{uuid.uuid4().hex}")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            return f"cannot store: {exc.strerror or exc}"
        try:
            request = HTTPRequest(self.source, headers=self.headers,
                                  connect_timeout=self.cfg.connect_timeout_s,
                                  request_timeout=self.cfg.timeout_s,
                                  streaming_callback=self._chunk, follow_redirects=False,
                                  decompress_response=False, ca_certs=self.cfg.ca_bundle)
            try:
                await self.cfg.client().fetch(request)
            except HTTPClientError as exc:
                return f"source answered HTTP {exc.code}: {exc.message}"
            except PullCancelled as exc:
                return str(exc)
            except OSError as exc:
                return f"source unreachable: {exc.strerror or exc}"
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            if self.overwrite:
                os.replace(self._tmp, self.target)
                self._tmp = None
            else:
                try:        # create-if-absent; the temporary name goes in ``finally``
                    os.link(self._tmp, self.target)
                except FileExistsError:
                    return ("a file appeared at the destination during the copy: it is not "
                            "replaced (Overwrite: T replaces it)")
            st = os.stat(self.target)
            try:
                os.setxattr(self.target, xattr,
                            f"{self.cs.adler32}:{st.st_mtime_ns}:{st.st_size}".encode())
            except OSError:
                pass
            log.info("third-party copy %s -> %s (%d bytes, adler32 %s)", self.source,
                     self.target, self.cs.size, self.cs.adler32)
            return None
        except OSError as exc:
            return f"cannot store: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - tornado raises its own kinds for broken streams
            return f"fetch failed: {type(exc).__name__}: {exc}"
        finally:
            if self._fd is not None:
                os.close(self._fd)
            if self._tmp:
                try:
                    os.unlink(self._tmp)
                except OSError:
                    pass


def source_headers(request_headers) -> dict[str, str]:
    """``TransferHeader<Name>: value`` of the COPY request -> ``<Name>: value`` for the source."""
    out = {}
    for name, value in request_headers.get_all():
        if name.lower().startswith("transferheader") and len(name) > len("TransferHeader"):
            out[name[len("TransferHeader"):]] = value
    return out


def perf_marker(size: int) -> str:
    return (f"Perf Marker\n\tTimestamp: {int(time.time())}\n\tStripe Index: 0\n"
            f"\tStripe Bytes Transferred: {size}\n\tTotal Stripe Count: 1\nEnd\n")
