"""The ``xrdcp`` copytool: XRootD storage through the xrootd client's ``xrdcp`` and ``xrdfs``.

The bytes pass through a pipe (``xrdcp URL -`` / ``xrdcp - URL``) so this process checksums
them as they stream; on upload the server's own adler32 (``--cksum adler32:print``, else
``xrdfs query checksum``) must match what was sent. ``--posc`` makes the server drop a partial
upload. Retries inside xrdcp are bounded, because the pilot's retry policy is ours.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from urllib.parse import urlsplit

from panda_core.errorcodes import ErrorCode

from .base import CopyTool, Transfer, TransferError, TransferResult, partial_path, unlink_quietly
from .checksum import StreamChecksum
from .runner import die_with_parent

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_EXISTS = re.compile(r"file exists|already exists|\[3018\]", re.IGNORECASE)
_PRINTED = re.compile(r"adler32:\s*([0-9a-fA-F]{1,8})\s+\S+\s+(\d+)")
_MISSING = ("[3011]", "no such file", "not found")


def says_exists(stderr: str) -> bool:
    """Whether xrdcp's error output says the destination file exists (without ``--force``
    xrdcp refuses to replace one; a server answers [3018] to a racing create)."""
    return bool(_EXISTS.search(stderr))


def split_root_url(surl: str) -> tuple[str, str]:
    """'root://host:port//a/b' -> ('host:port', '/a/b')."""
    parts = urlsplit(surl)
    if parts.scheme not in ("root", "xroot", "roots"):
        raise ValueError(f"the xrdcp copytool does not handle {surl!r}")
    return parts.netloc, "/" + parts.path.lstrip("/")


def root_url(surl: str) -> str:
    """XRootD wants an absolute path after the host ('root://h:p//a/b'); replica_url gives one
    slash ('root://h:p/a/b'), which servers read as a relative path and refuse."""
    host, path = split_root_url(surl)
    return f"{urlsplit(surl).scheme}://{host}/{path}"


class XrdcpTool(CopyTool):
    """Options: ``xrdcp`` / ``xrdfs`` (paths of the commands), ``connect_timeout`` (s)."""

    name = "xrdcp"
    schemes = ("root", "xroot", "roots")
    program_options = ("xrdcp", "xrdfs")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.xrdcp = options.get("xrdcp") or shutil.which("xrdcp") or "xrdcp"
        self.xrdfs = options.get("xrdfs") or shutil.which("xrdfs") or "xrdfs"
        self.connect_timeout = int(options.get("connect_timeout", 30))

    def _env(self, timeout: float) -> dict:
        env = dict(os.environ)
        env.update({"XRD_CONNECTIONRETRY": "1",
                    "XRD_CONNECTIONWINDOW": str(max(1, min(self.connect_timeout, int(timeout)))),
                    "XRD_REQUESTTIMEOUT": str(max(1, int(timeout))),
                    "XRD_STREAMTIMEOUT": str(max(1, int(timeout)))})
        return env

    def _start(self, args: list[str], timeout: float, **kw) -> tuple[subprocess.Popen, threading.Timer]:
        try:
            proc = subprocess.Popen([self.xrdcp, "--nopbar", *args], stderr=subprocess.PIPE,
                                    env=self._env(timeout), preexec_fn=die_with_parent, **kw)
        except FileNotFoundError:
            raise TransferError(ErrorCode.GENERAL, f"xrdcp not found ({self.xrdcp}); install the "
                                "xrootd client") from None
        timer = threading.Timer(timeout, proc.kill)
        timer.daemon = True
        timer.start()
        return proc, timer

    def _failed(self, t: Transfer, direction: str, rc: int, err: str) -> TransferError:
        text = err.strip().replace("\0", "")
        if rc < 0:
            code = ErrorCode.STAGEIN_TIMEOUT if direction == "in" else ErrorCode.STAGEOUT_TIMEOUT
            return TransferError(code, f"{t.lfn}: xrdcp killed after the timeout: {text}", True)
        low = text.lower()
        if direction == "in" and any(m in low for m in _MISSING):
            return TransferError(ErrorCode.MISSING_INPUT, f"{t.lfn}: {t.surl}: {text}")
        if direction == "out" and ("no space" in low or "[3009]" in low):
            return TransferError(ErrorCode.NO_REMOTE_SPACE, f"{t.lfn}: {t.surl}: {text}")
        if "permission denied" in low or "not authorized" in low or "[3010]" in low:
            return TransferError(ErrorCode.STAGEIN_AUTH_FAILURE if direction == "in" else
                                 ErrorCode.STAGEOUT_AUTH_FAILURE, f"{t.lfn}: {t.surl}: {text}")
        code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
        return TransferError(code, f"{t.lfn}: xrdcp exited with {rc}: {text}", retryable=True)

    def _check_url(self, t: Transfer, direction: str) -> None:
        try:
            split_root_url(t.surl)
        except ValueError as exc:
            code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
            raise TransferError(code, str(exc)) from None

    def copy_in(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        self._check_url(t, "in")
        tmp = partial_path(t.local_path)
        cs = StreamChecksum(want_md5)
        proc, timer = self._start(["-f", root_url(t.surl), "-"], timeout, stdout=subprocess.PIPE)
        try:
            errbuf: list[bytes] = []
            reader = threading.Thread(target=lambda: errbuf.append(proc.stderr.read()),
                                      daemon=True)
            reader.start()
            try:
                with open(tmp, "wb") as out:
                    while True:
                        data = proc.stdout.read(CHUNK)
                        if not data:
                            break
                        out.write(data)
                        cs.update(data)
            except OSError as exc:
                proc.kill()
                code = ErrorCode.NO_LOCAL_SPACE if exc.errno in (28, 122) else ErrorCode.STAGEIN_FAILED
                raise TransferError(code, f"{t.lfn}: writing {t.local_path}: {exc}") from None
            rc = proc.wait()
            reader.join()
            if rc != 0:
                raise self._failed(t, "in", rc, b"".join(errbuf).decode(errors="replace"))
            os.replace(tmp, t.local_path)
        except BaseException:
            unlink_quietly(tmp)
            raise
        finally:
            timer.cancel()
            proc.kill() if proc.poll() is None else None
            proc.stdout.close()
            proc.stderr.close()
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)

    def copy_out(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        self._check_url(t, "out")
        cs = StreamChecksum(want_md5)
        # no -f: a replica is never overwritten (an existing file is compared below)
        proc, timer = self._start(["--posc", "--cksum", "adler32:print", "-",
                                   root_url(t.surl)],
                                  timeout, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        errbuf: list[bytes] = []
        reader = threading.Thread(target=lambda: errbuf.append(proc.stderr.read()), daemon=True)
        reader.start()
        try:
            try:
                with open(t.local_path, "rb") as f:
                    while True:
                        data = f.read(CHUNK)
                        if not data:
                            break
                        cs.update(data)
                        proc.stdin.write(data)
            except BrokenPipeError:
                pass  # xrdcp died; its exit code and stderr say why
            except OSError as exc:
                proc.kill()
                raise TransferError(ErrorCode.STAGEOUT_FAILED,
                                    f"{t.lfn}: reading {t.local_path}: {exc}") from None
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            rc = proc.wait()
            reader.join()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
        err = b"".join(errbuf).decode(errors="replace")
        if rc != 0 and says_exists(err):
            return self._existing(t, timeout, want_md5)
        if rc != 0:
            raise self._failed(t, "out", rc, err)
        m = _PRINTED.search(err)
        remote, size = (m.group(1).lower().rjust(8, "0"), int(m.group(2))) if m else \
            (self.remote_adler32(t.surl, timeout), None)
        if size is not None and size != cs.size:
            self.remove_remote(t.surl)
            raise TransferError(ErrorCode.LOCAL_FILE_SIZE_MISMATCH,
                                f"{t.lfn}: sent {cs.size} bytes, storage holds {size}", True)
        if remote is None:
            log.warning("%s: the storage gave no adler32 for %s; only the size was checked",
                        t.lfn, t.surl)
        elif remote != cs.adler32:
            self.remove_remote(t.surl)
            raise TransferError(ErrorCode.ADLER32_MISMATCH_OUT,
                                f"{t.lfn}: sent adler32 {cs.adler32}, storage has {remote}", True)
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)

    def _existing(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        """The destination exists: success if it holds our bytes (a retried stage-out), else
        REPLICA_EXISTS (an unknown remote checksum counts as different)."""
        from .checksum import checksum_file
        mine = checksum_file(t.local_path, want_md5)
        if self.remote_adler32(t.surl, timeout) == mine.adler32:
            return TransferResult(fsize=mine.size, adler32=mine.adler32, md5=mine.md5,
                                  surl=t.surl)
        raise TransferError(ErrorCode.REPLICA_EXISTS, f"{t.lfn}: {t.surl} already holds a "
                            "different file; a replica is never overwritten")

    def _xrdfs(self, surl: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        host, path = split_root_url(surl)
        return subprocess.run([self.xrdfs, host, *args, path], capture_output=True, text=True,
                              errors="replace", env=self._env(timeout), timeout=timeout)

    def remote_adler32(self, surl: str, timeout: float = 60) -> str | None:
        """The server's adler32 of ``surl`` (needs ``xrootd.chksum adler32`` on the server)."""
        try:
            r = self._xrdfs(surl, "query", "checksum", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        parts = r.stdout.split()
        if r.returncode == 0 and len(parts) >= 2 and parts[0].lower() == "adler32":
            return parts[1].lower().rjust(8, "0")
        return None

    def remote_size(self, surl: str, timeout: float = 60) -> int | None:
        """The size of ``surl`` on the server (``xrdfs stat``), None if it is not there or the
        server did not say."""
        try:
            r = self._xrdfs(surl, "stat", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        m = re.search(r"^Size:\s*(\d+)\s*$", r.stdout, re.MULTILINE)
        return int(m.group(1)) if r.returncode == 0 and m else None

    def remove_remote(self, surl: str) -> None:
        try:
            r = self._xrdfs(surl, "rm")
            if r.returncode != 0:
                log.warning("could not remove %s: %s", surl, r.stderr.strip())
        except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
            log.warning("could not remove %s: %s", surl, exc)
