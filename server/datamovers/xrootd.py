"""XRootD storage elements: ``xrdcp --tpc first``, a third-party copy where both servers allow it,
otherwise the client streams the bytes through itself; ``--cksum adler32:<catalogue value>``
makes xrdcp compare the destination's checksum with the catalogue's before it reports success,
and ``--posc`` makes the destination drop a copy that did not complete.

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

from copytools.xrootd import root_url

from .base import DataMover, FileRef, SourceError, TransferFailed

log = logging.getLogger(__name__)

_MISSING = ("[3011]", "no such file", "not found")


class XrootdMover(DataMover):
    """Options: ``xrdcp`` (path of the command), ``tpc`` (``first``: third-party where offered,
    else streamed; ``only``; ``none``), ``connect_timeout`` (s)."""

    name = "xrootd"
    schemes = ("root", "xroot", "roots")

    def __init__(self, xrdcp: str | None = None, tpc: str = "first",
                 connect_timeout: float = 30.0) -> None:
        if tpc not in ("first", "only", "none"):
            raise ValueError(f"xrootd mover: tpc must be first, only or none, not {tpc!r}")
        self.xrdcp = xrdcp or shutil.which("xrdcp") or "xrdcp"
        self.tpc = tpc
        self.connect_timeout = float(connect_timeout)

    def command(self, src_url: str, dst_url: str, expected: FileRef,
                tpc: str | None = None) -> list[str]:
        tpc = tpc or self.tpc
        cmd = [self.xrdcp, "--nopbar", "--force", "--posc", "--path", "--rm-bad-cksum"]
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
            return self._run(self.command(src_url, dst_url, expected), src_url, dst_url,
                             timeout_s)
        except _NoTpc as exc:
            if self.tpc == "only":
                raise TransferFailed(f"xrdcp {src_url} -> {dst_url}: third-party copy refused "
                                     f"and the mover is set to tpc=only: {exc}") from None
            # xrdcp's 'first' falls back on some refusals only; a destination that answers
            # "tpc not supported" ([3013]) gets the streamed copy from us
            log.info("%s: no third-party copy (%s); streaming", dst_url, exc)
        self._run(self.command(src_url, dst_url, expected, tpc="none"), src_url, dst_url,
                  max(1.0, deadline - time.monotonic()))

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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        pass
