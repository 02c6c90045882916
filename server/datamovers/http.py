"""HTTP/WebDAV storage elements: third-party ``COPY`` where the destination offers it, else the
bytes stream through the server (GET from the source, PUT to the destination, checksummed as they
pass).

Third-party copy follows the grid's HTTP-TPC convention in pull mode: ``COPY`` on the destination
with a ``Source:`` header; the destination fetches the file itself (``TransferHeaderAuthorization``
is the credential it presents to the source) and answers ``202`` with a body of progress markers
that ends in a ``success: ...`` or ``failure: ...`` line. A destination that answers 405/501, or
refuses the source (403), is remembered as not offering it and gets streamed copies. COPY carries
``Overwrite: F`` (WebDAV's default is T) and the streamed PUT meets ``panda se``'s own refusal:
a file already at the destination is never replaced (``base.DestinationExists``).

Either way the destination's own checksum (``Want-Digest: adler32``) must agree with the
catalogue before the copy counts. Every socket is under the transfer's :class:`Deadline`.
"""
from __future__ import annotations

import http.client
import logging
import ssl
from urllib.parse import urlsplit

from copytools.checksum import StreamChecksum

from .base import (DataMover, Deadline, DestinationExists, FileRef, SourceError, TransferFailed,
                   mismatch)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_HTTP_SCHEMES = {"http": "http", "dav": "http", "https": "https", "davs": "https"}


class HttpMover(DataMover):
    """Options: ``token`` / ``token_file`` (bearer token for the storage elements),
    ``ca_bundle`` (PEM file verifying https; default: the system's), ``third_party`` (try COPY
    first, default true), ``connect_timeout`` and ``read_timeout`` (s: a source silent that long
    fails the attempt even before the deadline)."""

    name = "http"
    schemes = tuple(_HTTP_SCHEMES)

    def __init__(self, token: str | None = None, token_file: str | None = None,
                 ca_bundle: str | None = None, third_party: bool | str = True,
                 connect_timeout: float = 30.0, read_timeout: float = 120.0) -> None:
        if token_file:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        self.token = token or None
        self.ca_bundle = ca_bundle
        self.third_party = str(third_party).lower() not in ("0", "false", "no", "off")
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self._no_tpc: set[str] = set()          # destinations that do not offer COPY
        self._ctx: ssl.SSLContext | None = None

    # -- plumbing ------------------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = ssl.create_default_context(cafile=self.ca_bundle)
        return self._ctx

    def _connect(self, url: str, deadline: Deadline) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        scheme = _HTTP_SCHEMES.get(parts.scheme)
        if scheme is None or not parts.hostname:
            raise SourceError(f"{url}: not an HTTP URL")
        timeout = max(0.1, min(self.connect_timeout, deadline.remaining()))
        if scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                               context=self._context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise TransferFailed(f"cannot connect to {parts.netloc}: {exc}") from None
        conn.sock.settimeout(self.read_timeout)
        deadline.watch(conn.sock)
        return conn, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"User-Agent": "panda-datamover"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra)
        return headers

    def _digest(self, url: str, deadline: Deadline) -> tuple[int, str | None] | None:
        """(size, adler32 or None) of ``url`` by HEAD, or None if it is not there."""
        conn, path = self._connect(url, deadline)
        try:
            conn.request("HEAD", path, headers=self._headers(**{"Want-Digest": "adler32"}))
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        if resp.status == 404:
            return None
        if resp.status >= 300:
            raise TransferFailed(f"HEAD {url}: HTTP {resp.status} {resp.reason}")
        adler = None
        for part in (resp.getheader("Digest") or "").split(","):
            kind, _, value = part.strip().partition("=")
            if kind.lower() == "adler32" and value:
                adler = value.strip().lower().zfill(8)
        size = resp.getheader("Content-Length")
        return (int(size) if size and size.isdigit() else -1), adler

    def _delete(self, url: str, deadline: Deadline) -> None:
        try:
            conn, path = self._connect(url, deadline)
            try:
                conn.request("DELETE", path, headers=self._headers())
                conn.getresponse().read()
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, TransferFailed, SourceError) as exc:
            log.warning("could not remove the bad copy %s: %s", url, exc)

    # -- the copy ------------------------------------------------------------------------------
    def copy(self, src_url: str, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        with Deadline(timeout_s) as deadline:
            try:
                self._copy(src_url, dst_url, expected, deadline)
            except (OSError, http.client.HTTPException) as exc:
                if deadline.expired:
                    raise TransferFailed(f"copy {src_url} -> {dst_url} stopped after the "
                                         f"{timeout_s:g} s deadline") from None
                raise TransferFailed(f"copy {src_url} -> {dst_url}: {exc}") from None
            if deadline.expired:
                raise TransferFailed(f"copy {src_url} -> {dst_url} stopped after the "
                                     f"{timeout_s:g} s deadline")

    def _copy(self, src_url: str, dst_url: str, expected: FileRef, deadline: Deadline) -> None:
        if self._check_existing(dst_url, expected, deadline):
            return                                   # already there and good: nothing to do
        dst_host = urlsplit(dst_url).netloc
        done = False
        if self.third_party and dst_host not in self._no_tpc:
            done = self._third_party(src_url, dst_url, deadline)
            if done is None:     # the destination holds a file now: someone else's copy
                return self._appeared(dst_url, expected, deadline)
            if not done:
                self._no_tpc.add(dst_host)
                log.info("%s offers no third-party copy from this source: streaming", dst_host)
        if not done and not self._stream(src_url, dst_url, expected, deadline):
            return self._appeared(dst_url, expected, deadline)   # there now: someone else's
        have = self._digest(dst_url, deadline)
        bad = "it is not there after the copy" if have is None else \
            mismatch(expected, have[0], have[1])
        if bad:
            self._delete(dst_url, deadline)
            src = self._digest(src_url, deadline)
            if src is None:
                raise SourceError(f"{src_url}: no such file")
            src_bad = mismatch(expected, src[0], src[1]) if src[1] else None
            if src_bad:
                raise SourceError(f"{src_url}: {src_bad}")
            raise TransferFailed(f"copy at {dst_url} does not match the catalogue: {bad}")

    def _check_existing(self, dst_url: str, expected: FileRef, deadline: Deadline) -> bool:
        """True if the destination holds the catalogue's file, False if it holds none;
        DestinationExists if it holds another (it is never replaced, docs/watcher.md)."""
        have = self._digest(dst_url, deadline)
        if have is None:
            return False
        bad = mismatch(expected, have[0], have[1])
        if bad:
            raise DestinationExists(dst_url, bad)
        return True

    def _appeared(self, dst_url: str, expected: FileRef, deadline: Deadline) -> None:
        """The destination refused to write because a file is there: done if it is the
        catalogue's, DestinationExists if not."""
        if not self._check_existing(dst_url, expected, deadline):
            raise TransferFailed(f"{dst_url}: the destination said a file is there, then "
                                 "showed none")

    def _third_party(self, src_url: str, dst_url: str, deadline: Deadline) -> bool | None:
        """Ask the destination to pull; True if it did, False if it does not offer COPY, None
        if it refused because a file is there (``Overwrite: F``: a replica is never replaced)."""
        conn, path = self._connect(dst_url, deadline)
        source = urlsplit(src_url)._replace(scheme=_HTTP_SCHEMES[urlsplit(src_url).scheme])
        headers = self._headers(Source=source.geturl(), Overwrite="F")
        if self.token:
            headers["TransferHeaderAuthorization"] = f"Bearer {self.token}"
        try:
            conn.request("COPY", path, headers=headers)
            resp = conn.getresponse()
            if resp.status in (403, 405, 501):
                log.debug("COPY %s: HTTP %s %s", dst_url, resp.status, resp.read(2000))
                return False
            if resp.status == 401:
                raise TransferFailed(f"COPY {dst_url}: the destination refused the credentials")
            if resp.status == 412:
                resp.read(2000)
                return None
            if resp.status >= 300:
                raise TransferFailed(f"COPY {dst_url}: HTTP {resp.status} "
                                     f"{resp.read(2000).decode(errors='replace').strip()}")
            last = ""
            while line := resp.readline():
                text = line.decode(errors="replace").strip()
                if text.startswith(("success", "failure")):
                    last = text
        finally:
            conn.close()
        if last.startswith("success"):
            return True
        reason = last.partition(":")[2].strip() or "the destination's reply ended without a result"
        if "source" in reason and " 404" in reason:
            raise SourceError(f"{src_url}: {reason}")
        raise TransferFailed(f"third-party copy {src_url} -> {dst_url}: {reason}")

    def _stream(self, src_url: str, dst_url: str, expected: FileRef, deadline: Deadline) -> bool:
        """GET from the source, PUT to the destination; True if the PUT created the file,
        False if one was there already (412 other bytes, 204 the same: never replaced)."""
        src, src_path = self._connect(src_url, deadline)
        try:
            src.request("GET", src_path, headers=self._headers())
            resp = src.getresponse()
            if resp.status == 404:
                raise SourceError(f"{src_url}: no such file")
            if resp.status != 200:
                raise TransferFailed(f"GET {src_url}: HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            dst, dst_path = self._connect(dst_url, deadline)
            try:
                dst.putrequest("PUT", dst_path, skip_accept_encoding=True)
                for key, value in self._headers().items():
                    dst.putheader(key, value)
                if length and length.isdigit():
                    dst.putheader("Content-Length", length)
                    chunked = False
                else:
                    dst.putheader("Transfer-Encoding", "chunked")
                    chunked = True
                dst.endheaders()
                cs = StreamChecksum()
                while chunk := resp.read(CHUNK):
                    cs.update(chunk)
                    dst.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    dst.send(b"0\r\n\r\n")
                put = dst.getresponse()
                body = put.read(2000)
            finally:
                dst.close()
        finally:
            src.close()
        if put.status == 412:
            return False
        bad = mismatch(expected, cs.size, cs.adler32)
        if bad:
            if put.status in (200, 201):             # our copy of bad bytes: remove it
                self._delete(dst_url, deadline)
            raise SourceError(f"{src_url}: {bad}")
        if put.status == 507:
            raise TransferFailed(f"PUT {dst_url}: destination full")
        if put.status not in (200, 201, 204):
            raise TransferFailed(f"PUT {dst_url}: HTTP {put.status} "
                                 f"{body.decode(errors='replace').strip()}")
        return put.status != 204
