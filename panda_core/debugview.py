"""Debug mode's contract (issue 16): which views a pilot may be asked for and how big they are.

The server's ``debug`` command asks a running job's pilot for one built-in view of the job,
sent in its updates while the flag is set (docs/protocol.md, "Debug mode"):

    tail [NAME]   the end of the payload's stdout, or of the work-dir file NAME
    ls            the work dir's entries (size, mtime, type; links shown, never followed)
    ps            the payload's process tree with CPU time and memory
    du            the work dir's size, per top-level entry

The request travels as that text (``debugView`` in the updateJob reply), the view comes back as
JSON (``debugView`` in the update). It is never a command line: ``parse_request`` accepts these
four words only, and a NAME only as a relative path inside the work dir, without ``..``.
Written once here for the server (which checks a request before storing it) and the pilot
(which checks it again before acting on it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

VIEWS = ("tail", "ls", "ps", "du")
DEFAULT_TAIL = "payload.stdout"
MAX_NAME = 255
MAX_TEXT_BYTES = 32 * 1024        # the text of one view, as the pilot sends it
MAX_VIEW_BYTES = 48 * 1024        # one view's JSON as the server stores it (MySQL TEXT: 64 KiB)
DEFAULT_INTERVAL_S = 30.0         # how often the pilot sends updates while in debug mode


class BadDebugRequest(ValueError):
    """A debug request that is not one of the built-in views (the message says why)."""


@dataclass(frozen=True)
class DebugRequest:
    view: str
    name: str = ""                # tail only: the work-dir file; "" = the payload's stdout

    def to_wire(self) -> str:
        return f"{self.view} {self.name}".strip()

    @property
    def target(self) -> str:
        """The file a tail reads; "" for the other views."""
        return (self.name or DEFAULT_TAIL) if self.view == "tail" else ""


def check_name(name: str) -> str:
    """A file name relative to the work dir: no absolute path, no ``..``, no NUL or newline."""
    if not name or len(name) > MAX_NAME:
        raise BadDebugRequest(f"a file name must have 1 to {MAX_NAME} characters")
    if any(c in name for c in "\0\n\r"):
        raise BadDebugRequest("a file name must not hold NUL or line breaks")
    if name.startswith("/"):
        raise BadDebugRequest(f"{name[:80]!r}: the name must be relative to the work dir")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadDebugRequest(f"{name[:80]!r}: no empty, '.' or '..' path parts")
    return name


def parse_request(text: Any) -> DebugRequest:
    """``tail [NAME]``, ``ls``, ``ps`` or ``du`` (``""`` or ``debug``: tail of stdout)."""
    if text is None:
        return DebugRequest("tail")
    if not isinstance(text, str):
        raise BadDebugRequest("a debug request is text")
    text = text.strip()
    if text in ("", "debug"):
        return DebugRequest("tail")
    view, _, name = text.partition(" ")
    if view not in VIEWS:
        raise BadDebugRequest(f"unknown debug view {view[:40]!r}: one of {', '.join(VIEWS)}")
    name = name.strip()
    if name and view != "tail":
        raise BadDebugRequest(f"the {view} view takes no file name")
    return DebugRequest(view, check_name(name) if name else "")


def clean_view(raw: Any) -> str | None:
    """A pilot's view as the server stores it: JSON of the known keys, text bounded. A view
    that is not readable is stored as a note saying so (the heartbeat itself is kept)."""
    if raw in (None, ""):
        return None
    if isinstance(raw, dict):          # a JSON body's object, rather than its text
        data = raw
    elif not isinstance(raw, str) or len(raw) > 4 * MAX_VIEW_BYTES:
        return json.dumps({"error": "debug view dropped: too large or not text"})
    else:
        try:
            data = json.loads(raw)
        except ValueError:
            return json.dumps({"error": "debug view dropped: not JSON"})
    if not isinstance(data, dict):
        return json.dumps({"error": "debug view dropped: not a JSON object"})
    out: dict[str, Any] = {}
    for key in ("view", "name", "error"):
        if isinstance(data.get(key), str):
            out[key] = data[key][:300]
    if isinstance(data.get("time"), (int, float)) and not isinstance(data["time"], bool):
        out["time"] = data["time"]
    out["truncated"] = bool(data.get("truncated"))
    text = data.get("text") if isinstance(data.get("text"), str) else ""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) > MAX_TEXT_BYTES:
        text = encoded[-MAX_TEXT_BYTES:].decode("utf-8", "ignore")
        out["truncated"] = True
    out["text"] = text
    return json.dumps(out)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def render(view: Any) -> str:
    """A stored view as a person reads it (CLI, monitor): a header line and the text. Control
    characters (a payload's terminal escapes in its stdout or its file names) are shown as
    ``?``, so printing a view cannot drive the reader's terminal."""
    return _CONTROL.sub("?", _render(view))


def _render(view: Any) -> str:
    if isinstance(view, str):
        try:
            view = json.loads(view)
        except ValueError:
            return view
    if not isinstance(view, dict):
        return ""
    if view.get("error"):
        return str(view["error"])
    import time

    head = view.get("view", "?") + (f" {view['name']}" if view.get("name") else "")
    if isinstance(view.get("time"), (int, float)):
        head += time.strftime("  (pilot time %Y-%m-%d %H:%M:%S UTC)", time.gmtime(view["time"]))
    if view.get("truncated"):
        head += "  [truncated]"
    return f"{head}\n{view.get('text', '')}"
