"""XRootD storage elements: ``xrdcp --tpc first``, a third-party copy where both servers allow it,
otherwise the client streams the bytes through itself; ``--cksum adler32:<catalogue value>``
makes xrdcp compare the destination's checksum with the catalogue's before it reports success,
and ``--posc`` makes the destination drop a copy that did not complete.

No ``--force``: a file already at the destination is never replaced. xrdcp then says "file
exists", and the destination's adler32 (``xrdfs query checksum``) decides: the catalogue's, and
the copy is done; another, or none to compare, and it fails with ``DestinationExists``.

The deadline is real: xrdcp runs in its own process group, killed with everything it started
when the time is up.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time

from copytools.xrootd import XrdcpTool, root_url, says_exists

from .base import DataMover, DestinationExists, FileRef, SourceError, TransferFailed

log = logging.getLogger(__name__)

_MISSING = ("[3011]", "no such file", "not found")


class XrootdMover(DataMover):
    """Options: ``xrdcp`` and ``xrdfs`` (paths of the commands), ``tpc`` (``first``:
    third-party where offered, else streamed; ``only``; ``none``), ``connect_timeout`` (s)."""

    name = "xrootd"
    schemes = ("root", "xroot", "roots")

    def __init__(self, xrdcp: str | None = None, tpc: str = "first",
                 connect_timeout: float = 30.0, xrdfs: str | None = None) -> None:
        if tpc not in ("first", "only", "none"):
            raise ValueError(f"xrootd mover: tpc must be first, only or none, not {tpc!r}")
        self.xrdcp = xrdcp or shutil.which("xrdcp") or "xrdcp"
        self.xrdfs = xrdfs or shutil.which("xrdfs") or "xrdfs"
        self.tpc = tpc
        self.connect_timeout = float(connect_timeout)

    def command(self, src_url: str, dst_url: str, expected: FileRef,
                tpc: str | None = None) -> list[str]:
        tpc = tpc or self.tpc
        cmd = [self.xrdcp, "--nopbar", "--posc", "--path", "--rm-bad-cksum"]
        if tpc != "none":
            cmd += ["--tpc", tpc]
        ck = (expected.checksum or "").lower()
        if ck.startswith("ad:"):
            cmd += ["--cksum", f"adler32:{ck[3:].zfill(8)}"]
        elif ck.startswith("md5:"):
            cmd += ["--cksum", f"md5:{ck[4:]}"]
        return cmd + [root_url(src_url), root_url(dst_url)]

    def copy(self, src_url: str, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            try:
                return self._run(self.command(src_url, dst_url, expected), src_url, dst_url,
                                 timeout_s)
            except _NoTpc as exc:
                if self.tpc == "only":
                    raise TransferFailed(f"xrdcp {src_url} -> {dst_url}: third-party copy "
                                         f"refused and the mover is set to tpc=only: {exc}"
                                         ) from None
                # xrdcp's 'first' falls back on some refusals only; a destination that answers
                # "tpc not supported" ([3013]) gets the streamed copy from us
                log.info("%s: no third-party copy (%s); streaming", dst_url, exc)
                self._drop_refused_open(dst_url, max(1.0, deadline - time.monotonic()))
            self._run(self.command(src_url, dst_url, expected, tpc="none"), src_url, dst_url,
                      max(1.0, deadline - time.monotonic()))
        except _Exists:
            self._existing(dst_url, expected, max(1.0, deadline - time.monotonic()))

    def _tool(self) -> XrdcpTool:
        return XrdcpTool(xrdfs=self.xrdfs, connect_timeout=self.connect_timeout)

    def _drop_refused_open(self, dst_url: str, timeout_s: float) -> None:
        """A destination that refused the third-party open ("tpc not supported") has created
        the file empty and keeps it; without ``--force`` the streamed copy would meet it as
        "file exists". xrdcp found no file there before it opened, so an empty one is ours."""
        tool = self._tool()
        try:
            if tool.remote_size(root_url(dst_url), timeout=timeout_s) == 0:
                tool.remove_remote(root_url(dst_url))
        except OSError as exc:                       # no xrdfs: the streamed copy says why
            log.warning("%s: cannot look for the refused open's empty file: %s", dst_url, exc)

    def _existing(self, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        """The destination holds a file already: done if its adler32 is the catalogue's,
        else DestinationExists (it is not replaced)."""
        ck = (expected.checksum or "").lower()
        if not ck.startswith("ad:"):
            raise DestinationExists(dst_url, "the catalogue has no adler32 to compare it with")
        try:
            have = self._tool().remote_adler32(root_url(dst_url), timeout=timeout_s)
        except OSError as exc:                       # no xrdfs on this host
            raise TransferFailed(f"{dst_url} exists; cannot read its adler32: {exc}") from None
        if have is None:
            raise DestinationExists(dst_url, "the destination gave no adler32 for it")
        if have != ck[3:].zfill(8):
            raise DestinationExists(dst_url, f"adler32 {have}, catalogue says {ck[3:]}")
        log.info("%s already holds the catalogue's file (adler32 %s): nothing to copy",
                 dst_url, have)

    def _run(self, cmd: list[str], src_url: str, dst_url: str, timeout_s: float) -> None:
        env = dict(os.environ, XRD_CONNECTIONRETRY="1",
                   XRD_CONNECTIONWINDOW=str(max(1, int(min(self.connect_timeout, timeout_s)))),
                   XRD_REQUESTTIMEOUT=str(max(1, int(timeout_s))),
                   XRD_STREAMTIMEOUT=str(max(1, int(timeout_s))))
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True)
        except FileNotFoundError:
            raise TransferFailed(f"xrdcp not found ({self.xrdcp}): install the xrootd "
                                 "client on the server's host") from None
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise TransferFailed(f"xrdcp {src_url} -> {dst_url} killed after the "
                                 f"{timeout_s:g} s deadline") from None
        text = err.decode(errors="replace").replace("\0", "").strip()
        if proc.returncode == 0:
            return
        low = text.lower()
        if says_exists(text):
            raise _Exists(text[-300:])
        if "tpc not supported" in low and "--tpc" in cmd and cmd[cmd.index("--tpc") + 1] != "none":
            raise _NoTpc(text[-300:])
        if any(m in low for m in _MISSING) and "source" in low or "[3011]" in low:
            raise SourceError(f"{src_url}: {text[-500:]}")
        if "checksum error" in low or ("checksum" in low and ("mismatch" in low or "differ" in low)):
            raise SourceError(f"{src_url}: the copy's checksum differs from the catalogue's: "
                              f"{text[-500:]}")
        raise TransferFailed(f"xrdcp {src_url} -> {dst_url} exited with {proc.returncode}: "
                             f"{text[-500:]}")


class _NoTpc(Exception):
    """The destination or the source does not take part in a third-party copy."""


class _Exists(Exception):
    """xrdcp refused to write: the destination file exists."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        pass
