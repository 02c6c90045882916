"""The copytool contract: what the pilot hands a tool, what it gets back, how failures look.

A tool only moves bytes (``copy_in`` / ``copy_out``) and reports the size and checksums it saw
while they streamed; the checks every tool owes the pilot (safe names, size, adler32/md5 against
the catalogue, PanDA error codes) live here once, in ``stage_in`` / ``stage_out``.
"""
from __future__ import annotations

import abc
import logging
import os
from dataclasses import asdict, dataclass
from urllib.parse import unquote, urlsplit

from panda_core.errorcodes import ErrorCode, error_text
from panda_core.replicas import BadFileName, check_name

log = logging.getLogger(__name__)


@dataclass
class Transfer:
    """One file to move, as the job description gives it."""
    lfn: str
    scope: str
    surl: str                       # remote URL (file://, http(s)://, davs://, root://) or plain path
    local_path: str                 # where the file is (stage-out) or goes (stage-in)
    fsize: int | None = None        # catalogue size in bytes, None if unknown
    checksum: str | None = None     # catalogue checksum, PanDA form 'ad:xxxxxxxx' or 'md5:...'
    guid: str | None = None


@dataclass
class TransferResult:
    """What really moved: size and checksums computed on the bytes as they streamed."""
    fsize: int
    adler32: str                    # 8 lower-case hex digits
    md5: str | None = None          # hex, when it was computed (catalogue asked for md5)
    surl: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class TransferError(Exception):
    """A failed transfer with the pilot error code to report (``pilotErrorCode``).

    ``retryable`` says whether another attempt may succeed (network trouble, a timeout, a corrupt
    copy); a missing source, a hostile name or a full local disk will not get better by retrying.
    """

    def __init__(self, code: ErrorCode | int, message: str, retryable: bool = False) -> None:
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = retryable
        super().__init__(f"[{int(self.code)}] {message}")

    def __reduce__(self):  # keep code/message/retryable across process boundaries
        return (TransferError, (int(self.code), self.message, self.retryable))


def parse_checksum(value: str | None) -> tuple[str, str] | None:
    """'ad:0a1b2c3d' -> ('adler32', '0a1b2c3d'); 'md5:...' -> ('md5', ...); None/'' -> None.

    PanDA writes adler32 as 'ad:' (some catalogues 'adler32:'); a bare 8-hex value is adler32 and a
    bare 32-hex value md5, as PanDA's pilot assumes.
    """
    if not value:
        return None
    value = value.strip().lower()
    kind, sep, digest = value.partition(":")
    if not sep:
        kind, digest = ("adler32" if len(value) <= 8 else "md5"), value
    kind = {"ad": "adler32", "adler32": "adler32", "md5": "md5"}.get(kind)
    if kind is None or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"unreadable checksum {value!r}: expected 'ad:xxxxxxxx' or 'md5:...'")
    if kind == "adler32":
        digest = digest.rjust(8, "0")
        if len(digest) != 8:
            raise ValueError(f"adler32 checksum {value!r} has more than 8 hex digits")
    elif len(digest) != 32:
        raise ValueError(f"md5 checksum {value!r} is not 32 hex digits")
    return kind, digest


def url_path(url: str) -> str:
    """Local path of a file:// URL or a plain path; anything else is an error."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"not a local file URL: {url!r}")
    return unquote(parts.path)


def url_scheme(url: str) -> str:
    return urlsplit(url).scheme.lower() if "://" in url else "file"


def _check_url(url: str) -> None:
    """Refuse URLs whose path could climb out of the storage element's tree."""
    if "\0" in url or "%00" in url:
        raise BadFileName(f"refusing URL with a NUL byte: {url!r}")
    path = unquote(urlsplit(url).path if "://" in url else url)
    if any(seg == ".." for seg in path.split("/")):
        raise BadFileName(f"refusing URL with a '..' segment: {url!r}")


class CopyTool(abc.ABC):
    """Base class of every copytool (a stevedore driver in ``panda.copytools``).

    Subclasses set ``name`` and ``schemes`` and implement ``copy_in`` / ``copy_out``, which move
    the bytes and return a TransferResult computed while streaming (never a second pass). The
    public ``stage_in`` / ``stage_out`` wrap them with the checks every tool must make.
    """

    name: str = ""
    schemes: tuple[str, ...] = ()
    #: the options that name a program to run; the pilot refuses them unless the program is in
    #: its local allow list (a site config comes over the network)
    program_options: tuple[str, ...] = ()

    def __init__(self, **options) -> None:
        self.options = options

    # -- to implement --------------------------------------------------------------------------
    @abc.abstractmethod
    def copy_in(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        """Copy ``t.surl`` to ``t.local_path``; raise TransferError on failure."""

    @abc.abstractmethod
    def copy_out(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        """Copy ``t.local_path`` to ``t.surl``; raise TransferError on failure."""

    def remove_remote(self, surl: str) -> None:
        """Best-effort removal of a bad upload; tools that can should override."""

    def cleanup_after_kill(self, t: Transfer, direction: str) -> None:
        """Remove what a killed attempt left behind (runs in the pilot's process)."""
        if direction == "in":
            unlink_quietly(partial_path(t.local_path))

    # -- the contract the pilot uses -----------------------------------------------------------
    def stage_in(self, t: Transfer, timeout: float = 600.0) -> TransferResult:
        """Download one input file, verified against the catalogue size and checksum."""
        expected = self._precheck(t, "in")
        want_md5 = expected is not None and expected[0] == "md5"
        result = self.copy_in(t, timeout, want_md5)
        try:
            self._verify(t, result, expected, "in")
        except TransferError:
            unlink_quietly(t.local_path)
            raise
        return result

    def stage_out(self, t: Transfer, timeout: float = 600.0) -> TransferResult:
        """Upload one output file; the result's checksums are what the pilot registers."""
        expected = self._precheck(t, "out")
        if not os.path.isfile(t.local_path):
            raise TransferError(ErrorCode.NO_SUCH_FILE, f"output file {t.local_path} does not exist")
        want_md5 = bool(self.options.get("md5")) or (expected is not None and expected[0] == "md5")
        result = self.copy_out(t, timeout, want_md5)
        try:
            self._verify(t, result, expected, "out")
        except TransferError:
            self.remove_remote(t.surl)
            raise
        return result

    # -- shared checks -------------------------------------------------------------------------
    def _precheck(self, t: Transfer, direction: str) -> tuple[str, str] | None:
        try:
            check_name(t.lfn)
            check_name(t.scope, "scope")
            _check_url(t.surl)
            if not t.local_path or "\0" in t.local_path:
                raise BadFileName(f"refusing local path {t.local_path!r}")
        except BadFileName as exc:
            raise TransferError(ErrorCode.HOSTILE_FILE_NAME, str(exc)) from None
        try:
            return parse_checksum(t.checksum)
        except ValueError as exc:
            code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
            raise TransferError(code, f"{t.lfn}: {exc}") from None

    def _verify(self, t: Transfer, r: TransferResult, expected: tuple[str, str] | None,
                direction: str) -> None:
        if t.fsize is not None and int(t.fsize) != r.fsize:
            raise TransferError(ErrorCode.LOCAL_FILE_SIZE_MISMATCH,
                                f"{t.lfn}: size {r.fsize} after transfer, catalogue says {t.fsize}",
                                retryable=True)
        if expected is None:
            return
        kind, digest = expected
        got = r.adler32 if kind == "adler32" else r.md5
        if got is None:  # a tool that could not compute md5 must say so, not pass silently
            raise TransferError(ErrorCode.STAGEIN_FAILED if direction == "in" else
                                ErrorCode.STAGEOUT_FAILED, f"{t.lfn}: tool {self.name} gave no {kind}")
        if got.lower() != digest:
            code = {("adler32", "in"): ErrorCode.ADLER32_MISMATCH_IN,
                    ("adler32", "out"): ErrorCode.ADLER32_MISMATCH_OUT,
                    ("md5", "in"): ErrorCode.MD5_MISMATCH_IN,
                    ("md5", "out"): ErrorCode.MD5_MISMATCH_OUT}[(kind, direction)]
            raise TransferError(code, f"{t.lfn}: {kind} {got} after transfer, expected {digest} "
                                f"({error_text(code)})", retryable=True)


def partial_path(path: str) -> str:
    """Hidden name a download is written to before the rename, so no half file ever shows."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.panda-part")


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
