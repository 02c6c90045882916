"""One retry policy for every loop that tries again: server calls, transfers, factory reports.

Waits grow exponentially up to a cap and are jittered: when a server restarts, thousands of
pilots that lost it at the same moment must not come back in lock-step. Each wait is drawn
uniformly from ``[w, (1 + jitter) * w]``: the nominal wait is a floor (a retry never comes sooner
than the policy says, which a server that asked for patience relies on), the spread goes upward.
A server that says how long to wait (HTTP ``Retry-After``) is heard: :meth:`RetryPolicy.wait_after`
lengthens a wait to what it asked, never beyond the policy's cap, jittered the same way (a
thousand pilots told "5 s" at once must not all come back at second 5).

A caller with a deadline (a pilot whose batch slot ends at a known time) bounds a whole call,
every try and wait of it, with a :class:`Deadline`: no try's timeout reaches past it, and the
wait that would leave no room for a whole try is cut so that the try after it, the last one,
ends by the deadline. Without that a final report against a server answering 503 with
``Retry-After`` could go on for minutes past the slot, until the batch system kills the pilot.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5            # tries in all, the first included
    backoff_s: float = 2.0       # first wait; doubles each time
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0      # one try (used by callers whose tries can hang)
    jitter: float = 0.5          # 0: exact waits; 0.5: up to half as long again

    def waits(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits between tries: ``attempts - 1`` of them."""
        wait = self.backoff_s
        for _ in range(max(0, self.attempts - 1)):
            yield wait * (1.0 + self.jitter * rand())
            wait = min(wait * 2, self.max_backoff_s)

    def wait_after(self, wait: float, retry_after: float | None,
                   rand: Callable[[], float] = random.random) -> float:
        """``wait`` (one of :meth:`waits`), lengthened to the server's ``Retry-After`` when that
        asks for longer. What the server asks is capped at ``max_backoff_s`` (a hostile or
        broken huge value cannot stall the caller) and spread upward by the jitter; a missing,
        negative or non-finite value changes nothing."""
        if retry_after is None or not math.isfinite(retry_after) or retry_after <= 0:
            return wait
        asked = min(retry_after, self.max_backoff_s) * (1.0 + self.jitter * rand())
        return max(wait, asked)


class Deadline:
    """What is left of a caller's deadline across the tries of one call.

    ``at`` is epoch seconds (``time.time()``, as a batch slot's end is known); None: no deadline.
    Time left is counted on the monotonic clock from construction, so a wall-clock step during
    the call neither stretches nor shortens it."""

    def __init__(self, at: float | None) -> None:
        self.at = at
        self._end = None if at is None else time.monotonic() + (at - time.time())
        self.last_try = False      # the wait before this try was cut: no try comes after it

    def left(self) -> float:
        """Seconds until the deadline (infinite without one; negative once past)."""
        return math.inf if self._end is None else self._end - time.monotonic()

    def reached(self) -> bool:
        return self.left() <= 0

    def timeout(self, timeout_s: float) -> float:
        """One try's timeout: the policy's, or what is left of the deadline if less."""
        return min(timeout_s, max(self.left(), 0.0))

    def wait(self, wait: float, try_s: float) -> float | None:
        """``wait`` (the policy's next one), cut when a try of up to ``try_s`` after it would
        end past the deadline; None when no try is left: the deadline is reached, or the try
        just made was the one after a cut wait (another would only hammer the server until
        the deadline)."""
        left = self.left()
        if self._end is None:
            return wait
        if self.last_try or left <= 0:
            return None
        try_s = min(try_s, left)
        if wait + try_s <= left:
            return wait
        self.last_try = True
        return max(0.0, left - try_s)

    def describe(self) -> str:
        """The deadline for an error message: when it was, in UTC."""
        if self.at is None:
            return "no deadline"
        return "the deadline " + time.strftime("%H:%M:%S UTC", time.gmtime(self.at))
