"""A request body must keep coming: a stalled or trickling upload is ended, not waited for.

``panda se`` has no limit on how long a whole body may take (an upload of many GB takes as long
as it takes). What it must not do is wait for a client that stopped sending, or sends a byte now
and then: that connection would hold its handler and a partial temporary file for ever. So a body
has to bring at least :data:`MIN_PROGRESS` bytes in every ``timeout_s`` (or end); the
:class:`BodyWatch` of one request calls its ``on_stall`` when it does not. A window of progress
rather than "any byte" is what stops a trickle of one byte a minute.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

#: the least a body must bring per window: ~1 KiB/s at the default 60 s, far below any real link
MIN_PROGRESS = 64 * 1024
#: the default window (seconds, ``panda se --body-timeout``)
BODY_TIMEOUT_S = 60.0


class BodyWatch:
    """Watches one request's body from its headers on; ``received(n)`` for every chunk,
    ``stop()`` when the body is complete or the request is over. Checked a few times per
    window, so a stall is noticed between ``timeout_s`` and 1.25 times it."""

    def __init__(self, timeout_s: float, on_stall: Callable[[int], None],
                 min_progress: int = MIN_PROGRESS) -> None:
        self.timeout_s = timeout_s
        self.min_progress = min_progress
        self.received_bytes = 0
        self._on_stall = on_stall
        self._loop = asyncio.get_running_loop()
        self._mark = 0                       # bytes at the last window that made progress
        self._mark_at = self._loop.time()
        self._period = max(0.05, timeout_s / 4)
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._period,
                                                                         self._check)

    def received(self, n: int) -> None:
        self.received_bytes += n
        if self.received_bytes - self._mark >= self.min_progress:
            self._mark, self._mark_at = self.received_bytes, self._loop.time()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        idle = self._loop.time() - self._mark_at
        if idle >= self.timeout_s:
            self._on_stall(self.received_bytes)
            return
        self._handle = self._loop.call_later(min(self._period, self.timeout_s - idle),
                                             self._check)
