"""The event-service line protocol between the pilot and its payload (docs/eventranges.md).

Two named pipes in the work dir, one line per message, UTF-8, at most ``MAX_LINE`` bytes:

- payload -> pilot (``$PANDA_ES_REPORTS``): ``ready`` (give me one range), ``done <rangeID>
  <file>`` (processed; its output is ``<file>`` in the work dir), ``failed <rangeID> [reason]``;
  blank lines and lines starting with ``#`` are ignored;
- pilot -> payload (``$PANDA_ES_RANGES``): ``range <rangeID> <lfn> <first> <last> <path>`` (events
  ``first``..``last`` inclusive, 0-based, of ``lfn``, found at ``path``: a file name in the work
  dir, or a URL for direct read) or ``end`` (no more ranges: finish and exit 0).

Every ``ready`` gets exactly one answer, so a payload with N workers sends N ``ready`` and keeps
N ranges in flight. The parser is strict and total: a line it cannot read is a ``ProtocolLine``
error with the reason, never an exception of another kind.
"""
from __future__ import annotations

from dataclasses import dataclass

from panda_core.replicas import BadFileName, check_name

MAX_LINE = 4096
RANGES_ENV = "PANDA_ES_RANGES"
REPORTS_ENV = "PANDA_ES_REPORTS"
RANGES_PIPE = ".es_ranges"        # pilot -> payload
REPORTS_PIPE = ".es_reports"      # payload -> pilot
END = "end"


class ProtocolLine(ValueError):
    """A payload line that is not a message of the protocol; the text says why."""


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Done:
    range_id: str
    output: str      # a file name in the work dir


@dataclass(frozen=True)
class Failed:
    range_id: str
    reason: str


Message = Ready | Done | Failed


def _range_id(text: str) -> str:
    parts = text.split("-")
    if len(text) > 120 or len(parts) != 5 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ProtocolLine(f"not an event range ID: {text[:80]!r}")
    return text


def parse(line: str) -> Message | None:
    """One payload line: a message, None for a blank or comment line, or ProtocolLine."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    word, _, rest = text.partition(" ")
    word = word.lower()
    if word == "ready":
        if rest.strip():
            raise ProtocolLine("'ready' takes no arguments")
        return Ready()
    if word == "done":
        args = rest.split()
        if len(args) != 2:
            raise ProtocolLine("'done' needs <rangeID> <output file>")
        try:
            name = check_name(args[1], "range output file name")
        except BadFileName as exc:
            raise ProtocolLine(str(exc)) from None
        return Done(_range_id(args[0]), name)
    if word == "failed":
        rid, _, reason = rest.strip().partition(" ")
        if not rid:
            raise ProtocolLine("'failed' needs <rangeID> [reason]")
        return Failed(_range_id(rid), reason.strip()[:250])
    raise ProtocolLine(f"unknown message {word[:40]!r} (ready, done, failed)")


def range_line(range_id: str, lfn: str, first: int, last: int, path: str) -> str:
    """The pilot's answer to ``ready`` with one range."""
    return f"range {range_id} {lfn} {int(first)} {int(last)} {path}\n"


class LineBuffer:
    """Bytes from a pipe into whole lines; a line over ``MAX_LINE`` is cut off and reported as
    one error instead of growing the buffer without bound (a payload writing garbage)."""

    def __init__(self) -> None:
        self._buf = b""
        self._skipping = False

    def feed(self, data: bytes) -> list[str | ProtocolLine]:
        out: list[str | ProtocolLine] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    if not self._skipping:
                        out.append(ProtocolLine(f"line longer than {MAX_LINE} bytes"))
                    self._skipping = True
                    self._buf = b""
                return out
            raw, self._buf = self._buf[:nl], self._buf[nl + 1:]
            if self._skipping:
                self._skipping = False
                continue
            if len(raw) > MAX_LINE:
                out.append(ProtocolLine(f"line longer than {MAX_LINE} bytes"))
                continue
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(ProtocolLine("line is not UTF-8"))
