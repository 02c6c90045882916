"""The event service in the pilot: a job whose payload processes event ranges fetched from the
server as it goes (``session``), spoken to through a line protocol over two named pipes
(``protocol``; docs/eventranges.md). ``reference_payload.py`` is a payload (and merge) that
speaks it, with nothing but Python's standard library.

The settings live here, not in ``session``: every pilot builds them from its command line,
and only a pilot that gets an event-service job should import the session (~3 ms, more
where there is no bytecode cache).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EventServiceSettings:
    """``batch``: ranges per getEventRanges (0: the job's cores); ``poll_s``: how long to wait
    before asking again when no range is ready but other consumers hold some."""
    batch: int = 0
    poll_s: float = 10.0
