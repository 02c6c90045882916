"""The storage element's Tornado application: a folder served over HTTP/1.1 with the WebDAV verbs
grid clients use.

GET (with Range), HEAD, PUT, DELETE, MKCOL, PROPFIND (Depth 0/1), OPTIONS and, when enabled, COPY
(third-party pull, ``tpc.py``). It is the peer of
the ``http`` and ``gfal`` copytools and of ARC CE's push mode, which needs a correct HTTP/1.1
server: absolute-form request targets, sizes on HEAD, ``Expect: 100-continue`` and
``If-None-Match: *`` on PUT. Uploads go to a hidden temporary name and are renamed when complete,
so a half upload is never visible; a body that stalls or trickles is ended with 408
(``body.py``) and its half upload removed. Writes may require a bearer token. Paths never leave
the root (no ``..``, no NUL, no symlink escapes).
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import hmac
import logging
import os
import shutil
import stat
import uuid
from urllib.parse import quote, unquote, urlsplit
from xml.sax.saxutils import escape

import tornado.web

from copytools.checksum import StreamChecksum, checksum_fd

from .body import BODY_TIMEOUT_S, MIN_PROGRESS, BodyWatch
from .tpc import Pull, TpcConfig, perf_marker, source_headers

log = logging.getLogger(__name__)

UPLOAD_PREFIX = ".panda-upload."
XATTR = "user.panda.adler32"
CHUNK = 1024 * 1024
#: the largest body of a request other than PUT (a PROPFIND's XML is a few hundred bytes)
MAX_OTHER_BODY = 64 * 1024


class PathError(Exception):
    """A request path that is not a safe path below the root."""


def resolve(root: str, url_path: str) -> str:
    """Map a URL path to a file system path below ``root``; raise PathError if it would escape."""
    path = unquote(url_path)
    if "\0" in path:
        raise PathError("NUL byte in path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathError("'..' in path")
    if any(p.startswith(UPLOAD_PREFIX) for p in parts):
        raise PathError("temporary upload names are not addressable")
    full = os.path.join(root, *parts) if parts else root
    # symlinks inside the tree must not lead outside it
    real = os.path.realpath(full)
    if real != root and not real.startswith(root + os.sep):
        raise PathError("path leaves the storage root")
    return full


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _stored_adler32(path: str, st: os.stat_result) -> str | None:
    """adler32 recorded at upload time, if the file has not changed since."""
    try:
        value = os.getxattr(path, XATTR).decode()
        digest, mtime, size = value.split(":")
        if int(mtime) == st.st_mtime_ns and int(size) == st.st_size:
            return digest
    except (OSError, ValueError):
        pass
    return None


def _same_file(path: str, size: int, adler32: str) -> bool:
    """Whether the file at ``path`` holds ``size`` bytes of that adler32 (a recorded digest is
    trusted while the file is unchanged, else the file is read)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        recorded = _stored_adler32(path, st)
        if recorded is None:
            with open(path, "rb") as f:
                recorded = checksum_fd(f.fileno()).adler32
        return recorded == adler32
    except OSError:
        return False


@tornado.web.stream_request_body
class SEHandler(tornado.web.RequestHandler):
    """Every verb on every path below the root. Bodies are streamed (``data_received``) and
    watched from ``prepare`` on; every verb method starts with ``_body_read()``, which ends the
    watch (the body is complete when Tornado calls the verb)."""

    SUPPORTED_METHODS = ("GET", "HEAD", "PUT", "DELETE", "MKCOL", "PROPFIND", "OPTIONS", "COPY")

    def initialize(self, root: str, token: str | None, create_parents: bool = True,
                   tpc: TpcConfig | None = None,
                   body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.root = root
        self.token = token
        self.create_parents = create_parents
        self.tpc = tpc or TpcConfig()
        self.body_timeout_s = body_timeout_s
        self._watch: BodyWatch | None = None
        self._pull: Pull | None = None
        self._tmp: str | None = None
        self._fd: int | None = None
        self._cs: StreamChecksum | None = None
        self._write_error: OSError | None = None
        self._target: str | None = None
        self._existed = False
        self._exclusive = False

    # -- helpers -------------------------------------------------------------------------------
    def _fail(self, code: int, reason: str) -> None:
        self.set_status(code)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(reason + "\n")

    def _path(self) -> str | None:
        try:
            return resolve(self.root, self.request.path)
        except PathError as exc:
            log.warning("refused %s %r: %s", self.request.method, self.request.path, exc)
            self._fail(400 if "NUL" in str(exc) else 403, f"refused path: {exc}")
            return None

    def _authorized(self) -> bool:
        if not self.token:
            return True
        auth = self.request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              self.token.encode()):
            return True
        self.set_header("WWW-Authenticate", 'Bearer realm="panda-se"')
        self._fail(401, "writing needs a valid bearer token")
        return False

    async def _digest_header(self, path: str, st: os.stat_result) -> None:
        want = self.request.headers.get("Want-Digest", "").lower()
        if not want:
            return
        kinds = [w.split(";")[0].strip() for w in want.split(",")]
        adler = _stored_adler32(path, st) if "adler32" in kinds else None
        need_read = ("adler32" in kinds and adler is None) or "md5" in kinds
        if need_read:  # reading a large file must not stall every other client
            def compute() -> StreamChecksum:
                with open(path, "rb") as f:
                    return checksum_fd(f.fileno(), md5="md5" in kinds)
            cs = await asyncio.get_running_loop().run_in_executor(None, compute)
            adler = adler or cs.adler32
        values = []
        if "adler32" in kinds:
            values.append(f"adler32={adler}")
        if "md5" in kinds:
            values.append("md5=" + base64.b64encode(bytes.fromhex(cs.md5)).decode())
        if values:
            self.set_header("Digest", ",".join(values))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")

    # -- reads ---------------------------------------------------------------------------------
    async def get(self) -> None:
        self._body_read()
        await self._get(send_body=True)

    async def head(self) -> None:
        self._body_read()
        await self._get(send_body=False)

    async def _get(self, send_body: bool) -> None:
        path = self._path()
        if path is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self._fail(404, "not found")
        if stat.S_ISDIR(st.st_mode):
            return self._listing(path, send_body)
        size = st.st_size
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("Last-Modified", _http_date(st.st_mtime))
        self.set_header("ETag", f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{size:x}"')
        self.set_header("Content-Type", "application/octet-stream")
        await self._digest_header(path, st)
        start, end = 0, size - 1
        rng = self.request.headers.get("Range")
        if rng and rng.startswith("bytes=") and "," not in rng:
            first, _, last = rng[6:].strip().partition("-")
            try:
                if first == "":
                    start, end = max(0, size - int(last)), size - 1
                else:
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
            except ValueError:
                start, end = 0, size - 1  # unreadable Range: ignore it, as RFC 9110 allows
            else:
                if start >= size or start > end or (first == "" and int(last) == 0):
                    self.set_header("Content-Range", f"bytes */{size}")
                    return self._fail(416, "range not satisfiable")
                self.set_status(206)
                self.set_header("Content-Range", f"bytes {start}-{end}/{size}")
        length = max(0, end - start + 1)
        self.set_header("Content-Length", str(length))
        if not send_body:
            return self.finish()
        with open(path, "rb") as f:
            offset, left = start, length
            while left > 0:
                data = os.pread(f.fileno(), min(CHUNK, left), offset)
                if not data:
                    break  # file shrank under us: the client sees a short body and fails
                self.write(data)
                await self.flush()
                offset += len(data)
                left -= len(data)
        self.finish()

    def _listing(self, path: str, send_body: bool) -> None:
        names = sorted(n for n in os.listdir(path) if not n.startswith(UPLOAD_PREFIX))
        body = "".join(n + ("/" if os.path.isdir(os.path.join(path, n)) else "") + "\n"
                       for n in names).encode()
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Content-Length", str(len(body)))
        self.finish(body if send_body else None)

    def options(self) -> None:
        self._body_read()
        methods = [m for m in self.SUPPORTED_METHODS if m != "COPY" or self.tpc.allow]
        self.set_header("Allow", ", ".join(methods))
        self.set_header("DAV", "1")
        self.set_header("Content-Length", "0")
        self.set_status(200)
        self.finish()

    # -- PROPFIND ------------------------------------------------------------------------------
    def propfind(self) -> None:
        self._body_read()
        path = self._path()
        if path is None:
            return
        depth = self.request.headers.get("Depth", "infinity").strip().lower()
        if depth not in ("0", "1"):  # clients (ARC) fall back to HEAD on 501
            return self._fail(501, "PROPFIND with Depth infinity is not implemented (use 0 or 1)")
        if not os.path.exists(path):
            return self._fail(404, "not found")
        href_base = self.request.path if self.request.path.startswith("/") else "/"
        entries = [(href_base, path)]
        if depth == "1" and os.path.isdir(path):
            base = href_base.rstrip("/")
            for name in sorted(os.listdir(path)):
                if not name.startswith(UPLOAD_PREFIX):
                    entries.append((f"{base}/{quote(name)}", os.path.join(path, name)))
        parts = ['<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">']
        for href, p in entries:
            try:
                st = os.stat(p)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and not href.endswith("/"):
                href += "/"
            props = [f"<D:displayname>{escape(os.path.basename(p.rstrip('/')))}</D:displayname>",
                     f"<D:getlastmodified>{_http_date(st.st_mtime)}</D:getlastmodified>",
                     "<D:resourcetype><D:collection/></D:resourcetype>" if is_dir
                     else "<D:resourcetype/>"]
            if not is_dir:
                props.append(f"<D:getcontentlength>{st.st_size}</D:getcontentlength>")
                props.append("<D:getcontenttype>application/octet-stream</D:getcontenttype>")
            parts.append(f"<D:response><D:href>{escape(href)}</D:href><D:propstat><D:prop>"
                         + "".join(props) + "</D:prop><D:status>HTTP/1.1 200 OK</D:status>"
                         "</D:propstat></D:response>")
        parts.append("</D:multistatus>\n")
        self.set_status(207)
        self.set_header("Content-Type", 'application/xml; charset="utf-8"')
        self.finish("".join(parts).encode())

    # -- writes --------------------------------------------------------------------------------
    def mkcol(self) -> None:
        self._body_read()
        if not self._authorized():
            return
        path = self._path()
        if path is None:
            return
        if os.path.exists(path):
            return self._fail(405, "already exists")
        if not os.path.isdir(os.path.dirname(path)):
            return self._fail(409, "parent collection does not exist")
        try:
            os.mkdir(path)
        except OSError as exc:
            return self._fail(507 if exc.errno == errno.ENOSPC else 500, str(exc))
        self.set_status(201)
        self.clear_header("Content-Type")
        self.finish()

    def delete(self) -> None:
        self._body_read()
        if not self._authorized():
            return
        path = self._path()
        if path is None:
            return
        if os.path.realpath(path) == self.root:
            return self._fail(403, "refusing to delete the storage root")
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return self._fail(404, "not found")
        except OSError as exc:
            return self._fail(500, str(exc))
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    # -- request bodies ------------------------------------------------------------------------
    def _has_body(self) -> bool:
        headers = self.request.headers
        return (headers.get("Content-Length", "0").strip() not in ("", "0")
                or "chunked" in headers.get("Transfer-Encoding", "").lower())

    def _body_read(self) -> None:
        """The body is complete (Tornado calls a verb only then): stop watching it."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _stalled(self, received: int) -> None:
        """The body brought too little for too long: answer 408, drop the half upload, and let
        Tornado close the connection (it does once a reply is sent before the body was read)."""
        self._watch = None
        if self._finished:
            return
        log.warning("%s %s from %s: the body brought less than %d bytes in %g s (%d bytes "
                    "received); ended with 408", self.request.method, self.request.path,
                    self.request.remote_ip, MIN_PROGRESS, self.body_timeout_s, received)
        self._discard()
        self._fail(408, f"request body timeout: less than {MIN_PROGRESS} bytes arrived in "
                        f"{self.body_timeout_s:g} s")
        # what Tornado does when a streamed body's client goes away: the verb is never called
        super().on_connection_close()

    def prepare(self) -> None:
        if self._has_body():
            self._watch = BodyWatch(self.body_timeout_s, self._stalled)
        if self.request.method != "PUT":
            self.request.connection.set_max_body_size(MAX_OTHER_BODY)
            return
        # Everything that can refuse an upload happens here, before the body is read: a client
        # that sent 'Expect: 100-continue' then gets the refusal instead of '100 Continue'.
        if not self._authorized():
            return
        path = self._path()
        if path is None:
            return
        if os.path.isdir(path):
            return self._fail(409, "a collection exists at this path")
        exists = os.path.exists(path)
        if self.request.headers.get("If-None-Match", "").strip() == "*" and exists:
            return self._fail(412, "file exists (If-None-Match: *)")
        parent = os.path.dirname(path)
        if not self.create_parents and not os.path.isdir(parent):
            return self._fail(409, "parent collection does not exist (MKCOL it first)")
        try:
            os.makedirs(parent, exist_ok=True)
            resolve(self.root, self.request.path)  # the new parents must not be escapes either
            self._tmp = os.path.join(parent, f"{UPLOAD_PREFIX}{uuid.uuid4().hex}")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except PathError as exc:
            return self._fail(403, f"refused path: {exc}")
        except (FileExistsError, NotADirectoryError) as exc:  # a file where a folder must be
            return self._fail(409, f"cannot store: {exc}")
        except OSError as exc:
            return self._fail(507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500,
                              f"cannot store: {exc}")
        self._target, self._existed = path, exists
        self._exclusive = self.request.headers.get("If-None-Match", "").strip() == "*"
        self._cs = StreamChecksum()
        self.request.connection.set_max_body_size(1 << 50)

    def data_received(self, chunk: bytes) -> None:
        if self._watch is not None:
            self._watch.received(len(chunk))
        if self._fd is None or self._write_error is not None:
            return
        try:
            view = memoryview(chunk)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self._cs.update(chunk)
        except OSError as exc:
            self._write_error = exc  # answered in put(); the rest of the body is dropped

    async def put(self) -> None:
        self._body_read()
        if self._fd is None:
            return self._fail(500, "upload was not prepared")
        fd, self._fd = self._fd, None
        try:
            if self._write_error is None:
                os.fsync(fd)
        except OSError as exc:
            self._write_error = exc
        finally:
            os.close(fd)
        if self._write_error is not None:
            exc = self._write_error
            self._discard()
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            log.error("upload of %s failed: %s", self.request.path, exc)
            return self._fail(507 if full else 500, f"cannot store: {exc}")
        try:
            # create-if-absent, even against a concurrent upload: a replica is never replaced.
            # The same bytes again (a retried stage-out) succeed; other bytes are refused.
            try:
                os.link(self._tmp, self._target)
            except FileExistsError:
                tmp, self._tmp = self._tmp, None
                if self._exclusive:
                    os.unlink(tmp)
                    return self._fail(412, "file exists (If-None-Match: *)")
                same = await asyncio.get_running_loop().run_in_executor(
                    None, _same_file, self._target, self._cs.size, self._cs.adler32)
                os.unlink(tmp)
                if not same:
                    log.warning("refused to overwrite %s with other bytes", self.request.path)
                    return self._fail(412, f"file exists with other content: a replica is "
                                           f"never overwritten (this upload: {self._cs.size} "
                                           f"bytes, adler32 {self._cs.adler32}); DELETE it "
                                           "first if it must go")
                self.set_status(204)
                self.set_header("Digest", f"adler32={self._cs.adler32}")
                self.clear_header("Content-Type")
                return self.finish()
            os.unlink(self._tmp)
            st = os.stat(self._target)
            try:
                os.setxattr(self._target, XATTR,
                            f"{self._cs.adler32}:{st.st_mtime_ns}:{st.st_size}".encode())
            except OSError:
                pass  # no user xattrs here: digests are computed on demand
        except OSError as exc:
            self._discard()
            return self._fail(500, f"cannot store: {exc}")
        self._tmp = None
        log.info("stored %s (%d bytes, adler32 %s)", self.request.path, self._cs.size,
                 self._cs.adler32)
        self.set_status(204 if self._existed else 201)
        self.set_header("Digest", f"adler32={self._cs.adler32}")
        self.clear_header("Content-Type")
        self.finish()

    # -- third-party copy (pull) -----------------------------------------------------------------
    async def copy(self) -> None:
        self._body_read()
        if not self._authorized():
            return
        path = self._path()
        if path is None:
            return
        source = self.request.headers.get("Source", "").strip()
        if not source:
            if self.request.headers.get("Destination"):
                return self._fail(501, "push-mode COPY (Destination:) is not offered: ask the "
                                       "destination to pull (Source:)")
            return self._fail(400, "COPY needs a Source: header (third-party pull)")
        why = self.tpc.allows(source)
        if why:
            return self._fail(403, why)
        if os.path.isdir(path):
            return self._fail(409, "a collection exists at this path")
        overwrite = self.request.headers.get("Overwrite", "F").strip().upper()
        if overwrite not in ("T", "F"):
            return self._fail(400, f"Overwrite must be T or F, not {overwrite[:20]!r}")
        if os.path.lexists(path) and overwrite != "T":
            return self._fail(412, "file exists: COPY does not replace a replica unless the "
                                   "request says 'Overwrite: T'")
        self.set_status(202)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.flush()          # the 202 goes out now; the outcome ends the body (tpc.py)
        self._pull = Pull(self.tpc, source, path, source_headers(self.request.headers),
                          self._marker, overwrite=overwrite == "T")
        why = await self._pull.run(UPLOAD_PREFIX, XATTR)
        if why:
            log.warning("third-party copy %s -> %s failed: %s", source, self.request.path, why)
        self.finish("success: Created\n" if why is None else f"failure: {why}\n")

    def _marker(self, size: int) -> None:
        self.write(perf_marker(size))
        self.flush()

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None

    def on_connection_close(self) -> None:
        # the client went away mid-upload (or mid-pull): the half file must not survive
        self._body_read()
        if self._pull is not None:
            self._pull.cancelled = True
        self._discard()
        super().on_connection_close()   # ends Tornado's wait for the rest of the body

    def on_finish(self) -> None:
        self._body_read()
        self._discard()


class SEApplication(tornado.web.Application):
    """Routes every path to SEHandler, after turning absolute-form targets into origin-form."""

    def find_handler(self, request, **kwargs):
        if "://" in request.uri.split("?", 1)[0]:
            parts = urlsplit(request.uri)
            request.uri = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            request.path = parts.path or "/"
            if parts.netloc:
                request.host = parts.netloc
        return super().find_handler(request, **kwargs)


def make_app(root: str, token: str | None = None, create_parents: bool = True,
             tpc: TpcConfig | None = None,
             body_timeout_s: float = BODY_TIMEOUT_S) -> SEApplication:
    root = os.path.realpath(root)
    return SEApplication([(r"/.*", SEHandler, {"root": root, "token": token,
                                               "create_parents": create_parents,
                                               "tpc": tpc or TpcConfig(),
                                               "body_timeout_s": body_timeout_s})])
