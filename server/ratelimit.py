"""A request rate limit per client: a token bucket per identity, HTTP 429 with Retry-After over it.

Why: without it one misbehaving client, or a stolen token, sends requests as fast as the network
carries them and takes the database's capacity from everyone else. Every request passes
:meth:`RateLimiter.check` once its head is in (``pilot_http.ServerApplication.find_handler``),
before its body is kept or any handler or database work starts; a refused one is answered by
:class:`Throttled` without reaching a handler.

The client is the identity the request proves (a bearer token's subject with its site binding,
or a certificate's DN), else the peer's address (its /64 for IPv6: one host holds a whole /64).
Two kinds of calls have limits of their own (docs/server.md, "Rate limits per client"):
``pilot`` (callers with the pilot role, and anonymous ones on the paths pilots read,
``PILOT_READS``) and ``api`` (users, and anonymous callers anywhere else). Admins and
``exempt`` subjects are not limited.

Per process, on the event loop: no lock (one thread touches the tables), O(1) per request (a
dict look-up and an ``OrderedDict.move_to_end``). Each table holds at most ``max_clients``
buckets: a new client past the bound pushes out the least recently seen one, and buckets idle long
enough to be full again go as new clients arrive. Losing a bucket only ever lets its client
through sooner (a new bucket starts full), so an attacker who rotates identities or addresses
fills the table without getting anyone refused.
"""
from __future__ import annotations

import collections
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Hashable

from tornado import httputil

from panda_core.netguard import RateLimitedLog

from .auth import Identity
from .dispatcher import SC_TIMEOUT          # "try again later": pilots wait, keep what they sent
from .metrics import RATE_LIMITED, RATE_LIMIT_CLIENTS

log = logging.getLogger(__name__)

#: the paths pilots read without a token (queue descriptions and cached files, the pilot file,
#: the Rucio API pilot 3 looks replicas up through): an anonymous caller there has the pilots'
#: limit, since the many pilots of a site may come from one NAT address
PILOT_READS = ("/cache/", "/pilot", "/rucio/")
#: the longest Retry-After asked: the limits' refill times are far below it
MAX_RETRY_AFTER_S = 3600


@dataclass(frozen=True)
class Limit:
    """``rate`` requests per second on average, up to ``burst`` at once; rate 0: no limit."""
    rate: float
    burst: int

    def __post_init__(self):
        if not (self.rate == 0 or 0 < self.rate < math.inf) or self.burst < 1:
            raise ValueError(f"a rate limit needs a finite rate >= 0 and a burst >= 1, "
                             f"not {self.rate}/{self.burst}")

    def describe(self) -> str:
        return "no limit" if not self.rate else f"{self.rate:g} requests/s, burst {self.burst}"


@dataclass(frozen=True)
class RateLimits:
    """What ``panda server`` limits (its ``--rate-limit-*`` options); per process."""
    pilot: Limit = Limit(5000, 10000)
    api: Limit = Limit(20, 200)
    exempt: frozenset[str] = field(default_factory=frozenset)   # subjects never limited
    limit_admins: bool = False
    max_clients: int = 20000              # buckets per kind (some 300 bytes each)


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens, self.stamp = tokens, stamp


class Buckets:
    """The token buckets of one kind of call, at most ``max_clients`` of them."""

    def __init__(self, limit: Limit, max_clients: int, kind: str = "api"):
        self.rate, self.burst = limit.rate, float(limit.burst)
        self.max_clients = max_clients
        self.kind = kind
        #: after this long idle a bucket is full again: the same as none
        self.refill_s = self.burst / self.rate if self.rate else 0.0
        self._table: collections.OrderedDict[Hashable, _Bucket] = collections.OrderedDict()
        self._gauge = RATE_LIMIT_CLIENTS.labels(kind)

    def __len__(self) -> int:
        return len(self._table)

    def take(self, key: Hashable, now: float) -> float:
        """One request of ``key`` at ``now`` (monotonic seconds): 0 when it may go on, else
        the seconds until its bucket holds a request again."""
        table = self._table
        bucket = table.get(key)
        if bucket is None:
            self._add(key, now)
            return 0.0
        table.move_to_end(key)
        tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return 0.0
        bucket.tokens = tokens
        return (1.0 - tokens) / self.rate

    def _add(self, key: Hashable, now: float) -> None:
        table = self._table
        # up to two idle buckets go per new one: the table shrinks back as a flood ends
        for _ in range(2):
            if not table:
                break
            oldest = next(iter(table.values()))
            if now - oldest.stamp < self.refill_s and len(table) < self.max_clients:
                break
            table.popitem(last=False)
        table[key] = _Bucket(self.burst - 1.0, now)
        self._gauge.set(len(table))


@dataclass(frozen=True)
class Refusal:
    kind: str                # pilot | api
    retry_after_s: int       # what the reply's Retry-After says
    limit: Limit

    def reason(self) -> str:
        return (f"too many requests: this client is over its rate limit of "
                f"{self.limit.describe()} ({self.kind} calls); retry after "
                f"{self.retry_after_s} s")


class RateLimiter:
    """Which requests go on (:meth:`check`); the buckets of both kinds of call."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.tables = {kind: Buckets(limit, limits.max_clients, kind)
                       for kind, limit in (("pilot", limits.pilot), ("api", limits.api))
                       if limit.rate}
        self._log = RateLimitedLog(log)

    def check(self, path: str, identity: Identity | None, address: str | None
              ) -> Refusal | None:
        """None when the request of ``identity`` (None: anonymous, or a credential that its
        handler will refuse) from ``address`` to ``path`` may go on, else why not."""
        if identity is not None:
            if identity.subject in self.limits.exempt or (
                    identity.role == "admin" and not self.limits.limit_admins):
                return None
            kind = "pilot" if identity.role == "pilot" else "api"
            key: Hashable = (identity.subject, identity.site)
        else:
            kind = "pilot" if path.startswith(PILOT_READS) else "api"
            key = client_network(address)
        table = self.tables.get(kind)
        if table is None:
            return None
        wait = table.take(key, self.clock())
        if not wait:
            return None
        refusal = Refusal(kind, min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait))),
                          self.limits.pilot if kind == "pilot" else self.limits.api)
        RATE_LIMITED.labels(kind).inc()
        self._log.warning(kind, "rate limit: %s client %r over %s: answered 429, retry after "
                          "%d s", kind, key[0] if isinstance(key, tuple) else key,
                          refusal.limit.describe(), refusal.retry_after_s)
        return refusal


def client_network(address: str | None) -> str:
    """The bucket of an anonymous caller: its IPv4 address, or the /64 of its IPv6 one (a host
    is given a whole /64: keyed by address, one client would have 2^64 buckets)."""
    if not address or ":" not in address:
        return address or "?"
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Throttled(httputil.HTTPMessageDelegate):
    """The 429 reply to a refused request, written once its body is in (and dropped): the
    connection stays open for the next request. One body for every caller: the API's
    ``success``/``message`` (panda-client reads it whatever the status) and the pilot
    protocol's ``StatusCode`` 10, "try again later"."""

    def __init__(self, request: httputil.HTTPServerRequest, refusal: Refusal):
        self.request, self.refusal = request, refusal

    def data_received(self, chunk: bytes) -> None:
        return None

    def finish(self) -> None:
        reason = self.refusal.reason()
        body = json.dumps({"success": False, "message": reason, "data": None,
                           "StatusCode": SC_TIMEOUT, "errorDialog": reason}).encode()
        headers = httputil.HTTPHeaders()
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
        headers["Retry-After"] = str(self.refusal.retry_after_s)
        conn = self.request.connection
        conn.write_headers(httputil.ResponseStartLine("", 429, "Too Many Requests"), headers,
                           body if self.request.method != "HEAD" else b"")
        conn.finish()

    def on_connection_close(self) -> None:
        return None
