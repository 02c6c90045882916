"""One retry policy for every loop that tries again: server calls, transfers, factory reports.

Waits grow exponentially up to a cap and are jittered: when a server restarts, thousands of
pilots that lost it at the same moment must not come back in lock-step. Each wait is drawn
uniformly from ``[w, (1 + jitter) * w]``: the nominal wait is a floor (a retry never comes sooner
than the policy says, which a server that asked for patience relies on), the spread goes upward.
A server that says how long to wait (HTTP ``Retry-After``) is heard: :meth:`RetryPolicy.wait_after`
lengthens a wait to what it asked, never beyond the policy's cap, jittered the same way (a
thousand pilots told "5 s" at once must not all come back at second 5).
"""
from __future__ import annotations

import math
import random
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
