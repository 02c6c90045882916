"""The ``http`` copytool: HTTP(S)/WebDAV storage elements (our ``panda se``, dCache, EOS, ...).

Bytes stream through the checksum as they are received or sent. Uploads create missing parent
collections with MKCOL when the server asks for them (409), and are checked afterwards against
the size the server reports (HEAD) and, when it offers one, its adler32 ``Digest``.
"""
from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit, urlunsplit

import requests

from panda_core.errorcodes import ErrorCode

from .base import CopyTool, Transfer, TransferError, TransferResult, partial_path, unlink_quietly
from .checksum import StreamChecksum

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_SCHEME = {"dav": "http", "davs": "https", "http": "http", "https": "https"}


def http_url(surl: str) -> str:
    """dav(s):// -> http(s)://; other schemes are not this tool's."""
    parts = urlsplit(surl)
    scheme = _SCHEME.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"the http copytool does not handle {surl!r}")
    return urlunsplit((scheme,) + tuple(parts)[1:])


class _Body:
    """Upload body: yields the file in 1 MiB chunks, checksumming each as it goes out."""

    def __init__(self, path: str, cs: StreamChecksum) -> None:
        self.path, self.cs = path, cs
        self.size = os.path.getsize(path)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        with open(self.path, "rb") as f:
            while True:
                data = f.read(CHUNK)
                if not data:
                    return
                self.cs.update(data)
                yield data


class HttpTool(CopyTool):
    """Options: ``token`` or ``token_file`` (bearer token), ``ca`` (CA bundle or folder),
    ``verify`` (false to skip TLS checks), ``connect_timeout`` (s), ``md5`` (also compute md5)."""

    name = "http"
    schemes = ("http", "https", "dav", "davs")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.session = requests.Session()
        token = options.get("token")
        if options.get("token_file"):
            with open(options["token_file"], encoding="utf-8") as f:
                token = f.read().strip()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        # passed on every call: a Session's own verify loses to $REQUESTS_CA_BUNDLE
        self.verify = options.get("ca") or options.get("verify", True)
        self.connect_timeout = float(options.get("connect_timeout", 30))

    def _kw(self, timeout: float) -> dict:
        return {"timeout": (min(self.connect_timeout, timeout), timeout), "verify": self.verify}

    def _url(self, t: Transfer, code: ErrorCode) -> str:
        try:
            return http_url(t.surl)
        except ValueError as exc:
            raise TransferError(code, str(exc)) from None

    def _request_error(self, exc: requests.RequestException, t: Transfer, direction: str):
        if isinstance(exc, requests.exceptions.SSLError):  # a wrong CA does not fix itself
            code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
            return TransferError(code, f"{t.lfn}: TLS failure talking to {t.surl} (check the "
                                 f"'ca' option): {exc}")
        if isinstance(exc, requests.Timeout):
            code = ErrorCode.STAGEIN_TIMEOUT if direction == "in" else ErrorCode.STAGEOUT_TIMEOUT
        else:
            code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
        return TransferError(code, f"{t.lfn}: {type(exc).__name__} talking to {t.surl}: {exc}",
                             retryable=True)

    # -- stage-in ------------------------------------------------------------------------------
    def copy_in(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        url = self._url(t, ErrorCode.STAGEIN_FAILED)
        tmp = partial_path(t.local_path)
        cs = StreamChecksum(want_md5)
        try:
            with self.session.get(url, stream=True, **self._kw(timeout)) as r:
                if r.status_code == 404:
                    raise TransferError(ErrorCode.MISSING_INPUT, f"{t.lfn}: {url} not found (404)")
                if r.status_code in (401, 403):
                    raise TransferError(ErrorCode.STAGEIN_AUTH_FAILURE,
                                        f"{t.lfn}: GET {url} answered {r.status_code} {r.reason}")
                if r.status_code != 200:
                    raise TransferError(ErrorCode.STAGEIN_FAILED,
                                        f"{t.lfn}: GET {url} answered {r.status_code} "
                                        f"{r.reason}: {r.text[:200]}",
                                        retryable=r.status_code >= 500 or r.status_code == 429)
                expected = r.headers.get("Content-Length")
                with open(tmp, "wb") as out:
                    for data in r.iter_content(CHUNK):
                        out.write(data)
                        cs.update(data)
            if expected is not None and int(expected) != cs.size:
                raise TransferError(ErrorCode.LOCAL_FILE_SIZE_MISMATCH,
                                    f"{t.lfn}: got {cs.size} of {expected} bytes", retryable=True)
            os.replace(tmp, t.local_path)
        except requests.RequestException as exc:
            unlink_quietly(tmp)
            raise self._request_error(exc, t, "in") from None
        except OSError as exc:
            unlink_quietly(tmp)
            code = (ErrorCode.NO_LOCAL_SPACE if exc.errno in (28, 122) else
                    ErrorCode.STAGEIN_FAILED)
            raise TransferError(code, f"{t.lfn}: writing {t.local_path}: {exc}") from None
        except BaseException:
            unlink_quietly(tmp)
            raise
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)

    # -- stage-out -----------------------------------------------------------------------------
    def copy_out(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        url = self._url(t, ErrorCode.STAGEOUT_FAILED)
        try:
            cs = StreamChecksum(want_md5)
            r = self.session.put(url, data=_Body(t.local_path, cs), **self._kw(timeout))
            if r.status_code == 409:  # parent collection missing on a plain WebDAV server
                self._mkcol_parents(url, timeout)
                cs = StreamChecksum(want_md5)
                r = self.session.put(url, data=_Body(t.local_path, cs), **self._kw(timeout))
            if r.status_code == 412:   # other bytes there: a replica is never overwritten
                raise TransferError(ErrorCode.REPLICA_EXISTS, f"{t.lfn}: {url} already holds "
                                    f"a different file: {r.text[:200].strip()}")
            if r.status_code not in (200, 201, 204):
                code = {507: ErrorCode.NO_REMOTE_SPACE, 401: ErrorCode.STAGEOUT_AUTH_FAILURE,
                        403: ErrorCode.STAGEOUT_AUTH_FAILURE}.get(r.status_code,
                                                                  ErrorCode.STAGEOUT_FAILED)
                raise TransferError(code, f"{t.lfn}: PUT {url} answered {r.status_code} "
                                    f"{r.reason}: {r.text[:200]}",
                                    retryable=r.status_code >= 500 and r.status_code != 507)
            remote_adler = _digest(r.headers.get("Digest", ""), "adler32")
            head = self.session.head(url, headers={"Want-Digest": "adler32"}, **self._kw(timeout))
        except requests.RequestException as exc:
            raise self._request_error(exc, t, "out") from None
        except OSError as exc:
            raise TransferError(ErrorCode.STAGEOUT_FAILED, f"{t.lfn}: reading {t.local_path}: "
                                f"{exc}") from None
        if head.status_code == 200:
            remote_size = head.headers.get("Content-Length")
            if remote_size is not None and int(remote_size) != cs.size:
                self.remove_remote(t.surl)
                raise TransferError(ErrorCode.LOCAL_FILE_SIZE_MISMATCH,
                                    f"{t.lfn}: sent {cs.size} bytes, storage holds {remote_size}",
                                    retryable=True)
            remote_adler = _digest(head.headers.get("Digest", ""), "adler32") or remote_adler
        if remote_adler and remote_adler != cs.adler32:
            self.remove_remote(t.surl)
            raise TransferError(ErrorCode.ADLER32_MISMATCH_OUT,
                                f"{t.lfn}: sent adler32 {cs.adler32}, storage has {remote_adler}",
                                retryable=True)
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)

    def _mkcol_parents(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        segments = parts.path.strip("/").split("/")[:-1]
        path = ""
        for seg in segments:
            path += "/" + seg
            r = self.session.request("MKCOL", urlunsplit(parts._replace(path=path + "/")),
                                     **self._kw(timeout))
            if r.status_code not in (201, 405):  # 405: exists already
                log.warning("MKCOL %s answered %s", path, r.status_code)

    def remove_remote(self, surl: str) -> None:
        try:
            self.session.delete(http_url(surl), **self._kw(60))
        except (requests.RequestException, ValueError) as exc:
            log.warning("could not remove bad upload %s: %s", surl, exc)


def _digest(header: str, kind: str) -> str | None:
    """Value of ``kind`` in an RFC 3230 ``Digest`` header (adler32 as 8 hex digits)."""
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name.strip().lower() == kind and value:
            return value.strip().lower().rjust(8, "0")
    return None
