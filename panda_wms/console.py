"""What the user's commands share: the server options, the client, errors as exit codes,
tables, times and ``--watch``.

Tables are drawn by ``tabulate`` (the ``client`` extra): plain text columns that read like
squeue's and condor_q's and that grep, awk and sort take apart, with no terminal control codes
and one small pure-Python package (rich would bring markdown-it and pygments to draw boxes).
Exit codes: 0 done, 1 the server refused or could not be reached, 2 bad input (usage, a
malformed URL, an unreadable file).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from panda_core.client import (ApiClient, BadServerUrl, ClientError, ServerUnreachable,
                               default_url, load_token)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Input the command cannot use (exit 2); the message says what to write instead."""


def server_options(p: argparse.ArgumentParser, json_output: bool = True) -> None:
    p.add_argument("--server", default=None,
                   help=f"server URL (default $PANDA_URL or {default_url()})")
    p.add_argument("--token-file", help="bearer token file (default $PANDA_AUTH_TOKEN, "
                   "else ~/.panda/token)")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")


def client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.server, load_token(args.token_file))


def fail(exc: BaseException, prog: str = "panda") -> int:
    """Say why on stderr; the exit code for it."""
    sys.stderr.write(f"{prog}: {exc}\n")
    return EXIT_USAGE if isinstance(exc, (BadServerUrl, UsageError)) else EXIT_FAILED


def run(body: Callable[[], int], prog: str) -> int:
    """``body``'s exit code; a ClientError or UsageError becomes its message and exit code."""
    try:
        return body()
    except (ClientError, UsageError) as exc:
        return fail(exc, prog)


# ---------------------------------------------------------------------- states
def _states(text: str, known: list[str], what: str, option: str) -> str:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if not names or unknown:
        raise UsageError(f"{option} {text!r}: unknown {what} state(s) "
                         f"{', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return ",".join(names)


def job_states(text: str) -> str:
    """``--state`` of jobs: a comma list of job states, checked (UsageError lists the known)."""
    from panda_core.states import JobState
    return _states(text, [s.value for s in JobState], "job", "--state")


def task_states(text: str) -> list[str]:
    from panda_core.states import TaskState
    return _states(text, [s.value for s in TaskState], "task", "--state").split(",")


# ---------------------------------------------------------------------- times
_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: dt.datetime | None = None) -> str:
    """``--since``: a duration back from now (90s, 30m, 2h, 1d, 1w, 1h30m) or an ISO time
    (2026-12-04T01:00, UTC unless it says otherwise); as the ISO UTC time the server takes."""
    now = now or dt.datetime.now(dt.timezone.utc)
    compact = text.strip().lower().replace(" ", "")
    parts = _AGO.findall(compact)
    if parts and "".join(n + u for n, u in parts) == compact:
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
        return (now - dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: give a time back from now (30m, 2h, 1d) or an ISO "
                         "time (2026-12-04T01:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.isoformat(timespec="seconds")


def parse_time(value: Any) -> dt.datetime | None:
    """A time from the API (ISO text, UTC when it names no zone)."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def short_time(value: Any, year: bool = False) -> str:
    """``12-04 01:10:05`` (UTC): squeue's width, the year left out unless ``year``."""
    when = parse_time(value)
    fmt = "%Y-%m-%d %H:%M:%S" if year else "%m-%d %H:%M:%S"
    return when.astimezone(dt.timezone.utc).strftime(fmt) if when else ""


def duration(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03`` / ``45s``; '' for None."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}:{m:02d}:{s:02d}"
    return f"{m}:{s:02d}" if m else f"{s}s"


def clip(text: Any, width: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------------- output
def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate   # the 'client' extra (panda_wms.cli names it if missing)

    return tabulate(list(rows), headers=list(headers), tablefmt="simple", disable_numparse=True)


def print_json(data: Any, out=None) -> None:
    (out or sys.stdout).write(json.dumps(data, default=str, sort_keys=True) + "\n")


def watch(show: Callable[[], int], interval: float | None, out=None,
          machine: bool = False) -> int:
    """Run ``show`` once, or (``interval``) every ``interval`` seconds until Ctrl-C, clearing
    a terminal between refreshes (a pipe gets each refresh appended, as ``watch`` would not).
    ``machine`` (``--json``): stdout carries only the documents, one per refresh; the time
    line goes to stderr."""
    out = out or sys.stdout
    if not interval:
        return show()
    if interval < 0.5:
        raise UsageError("--watch: at least 0.5 seconds between refreshes")
    try:
        while True:
            if out.isatty() and not machine:
                out.write("\x1b[H\x1b[2J")
            (sys.stderr if machine else out).write(
                f"every {interval:g} s, Ctrl-C to stop; "
                f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
            try:
                rc = show()
            except ServerUnreachable as exc:  # a server restart: say so, keep watching
                sys.stderr.write(f"panda: {exc}\n")
                rc = EXIT_OK
            out.flush()
            if rc != EXIT_OK:
                return rc
            time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return EXIT_OK


def watch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="S",
                   help="refresh every S seconds (default 5) until Ctrl-C")


def progress(done: int, total: int, what: str, out=None) -> None:
    """One progress line on stderr (rewritten in place on a terminal)."""
    out = out or sys.stderr
    text = f"{what}: {done}/{total} ({100 * done // max(1, total)}%)"
    if out.isatty():
        out.write("\r" + text + ("\n" if done >= total else ""))
    else:
        out.write(text + "\n")
    out.flush()
