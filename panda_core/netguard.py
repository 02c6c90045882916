"""Keep an HTTP server answering under a connection flood: a file-descriptor limit raised at
start, a cap on open connections below it, the oldest idle connection closed to make room, and
accept errors logged at a bounded rate.

Why: with Tornado's own accept loop, 1,100 half-open connections against a server whose fd
limit was 1024 used up every descriptor; ``accept()`` then failed with EMFILE on every turn of
the event loop, each failure was logged (63 MB in 7 s) and no request was answered any more.
Here a connection over the cap evicts the connection that has waited longest without sending a
request (a request in progress is never cut), so a flood of silent connections cannot lock out
a real caller; EMFILE all the same (descriptors taken by something else) evicts and pauses
accepting briefly instead of spinning.

Shared by ``panda server`` and ``panda se``. It speaks to a Tornado ``HTTPServer`` by duck
typing (``_connections``, ``_handle_connection``, ``start_request``, ``on_close``: Tornado 6's
interface), so that both can use it while this package stays on the standard library.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: descriptors kept free of client connections: database connections, log and data files,
#: the processes a server starts
MIN_RESERVE = 64
ACCEPT_BATCH = 128              # connections taken per turn of the event loop
PAUSE_S = 0.05                  # accepting stops this long after EMFILE and the like
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


#: the most a server raises its open-file limit to. Container runtimes and EL9 set hard limits
#: of ~10^9; the processes a server starts inherit its limit, and some size tables by it
#: (xrootd's poller: about 10 GB at 10^9, xrootd/xrootd#1962; under less memory it dies with
#: SIGSEGV at start) or close every descriptor up to it. 2^20 connections is beyond any server.
MAX_FD_LIMIT = 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, at most :data:`MAX_FD_LIMIT` (``ulimit
    -n`` is often 1024 while the hard limit is far higher); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_FD_LIMIT if hard == resource.RLIM_INFINITY else min(hard, MAX_FD_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_cap(fd_limit: int, wanted: int | None = None) -> int:
    """How many client connections a process may hold with ``fd_limit`` descriptors: the
    limit less a reserve (an eighth, at least :data:`MIN_RESERVE`); ``wanted`` lowers it."""
    cap = max(16, fd_limit - max(MIN_RESERVE, fd_limit // 8))
    if wanted is not None:
        if wanted > cap:
            log.warning("--max-connections %d is above what %d open files allow; using %d",
                        wanted, fd_limit, cap)
        cap = max(1, min(cap, wanted))
    return cap


class RateLimitedLog:
    """At most one record per ``key`` every ``interval_s``; the next says how many were
    dropped meanwhile."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval_s, self.clock = logger, interval_s, clock
        self._last: dict[str, float] = {}
        self._dropped: collections.Counter[str] = collections.Counter()

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] += 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            msg += " (%d similar in the last %.0f s not logged)"
            args = (*args, dropped, now - last)
        self.logger.warning(msg, *args)
        return True


class _Tracked:
    """A request delegate that tells the guard when its connection's request began."""

    def __init__(self, inner: Any, guard: "FloodGuard", server_conn: Any):
        self.inner, self.guard, self.server_conn = inner, guard, server_conn

    def headers_received(self, start_line, headers):
        self.guard._busy(self.server_conn)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk):
        return self.inner.data_received(chunk)

    def finish(self):
        return self.inner.finish()

    def on_connection_close(self):
        return self.inner.on_connection_close()


class FloodGuard:
    """The accept loop and connection accounting of one HTTP server (:meth:`install`).

    A connection is *idle* from its accept, and again after each response, until the headers of
    its next request are in; at the cap the longest idle is closed for a new one, and when none
    is idle (every connection is in a request) the new one is closed at once.
    """

    def __init__(self, cap: int, name: str = "server"):
        self.cap = cap
        self.name = name
        self.evicted = 0
        self.refused = 0
        self._server: Any = None
        self._idle: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self._closing: set[Any] = set()
        self._log = RateLimitedLog(log)

    # ------------------------------------------------------------------ wiring
    def install(self, server: Any, sockets: list[socket.socket]) -> None:
        """Serve ``sockets`` with Tornado's ``server`` through this guard (instead of
        ``server.add_sockets``); ``server.stop()`` still stops it."""
        self._server = server
        start_request, on_close = server.start_request, server.on_close

        def guarded_start_request(server_conn, request_conn):
            self._idle_again(server_conn)
            return _Tracked(start_request(server_conn, request_conn), self, server_conn)

        def guarded_on_close(server_conn):
            self._idle.pop(server_conn, None)
            self._closing.discard(server_conn)
            on_close(server_conn)

        server.start_request = guarded_start_request
        server.on_close = guarded_on_close
        for sock in sockets:
            sock.setblocking(False)
            server._sockets[sock.fileno()] = sock
            server._handlers[sock.fileno()] = self._listen(sock, server._handle_connection)

    def _listen(self, sock: socket.socket, handle: Callable[[socket.socket, Any], None]
                ) -> Callable[[], None]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:          # before the loop runs: the one set for this thread
            loop = asyncio.get_event_loop_policy().get_event_loop()
        fd = sock.fileno()
        state = {"removed": False, "paused": None}

        def resume() -> None:
            state["paused"] = None
            if not state["removed"]:
                loop.add_reader(fd, on_readable)

        def on_readable() -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, address = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno not in _OUT_OF_FDS:
                        self._log.warning("accept", "%s: accept failed: %s", self.name, exc)
                        return
                    freed = self._evict(max(1, ACCEPT_BATCH // 8))
                    self._log.warning("emfile", "%s: out of file descriptors (%s) with %d "
                                      "connections open: closed %d idle, pausing accept",
                                      self.name, exc.strerror, self.active(), freed)
                    loop.remove_reader(fd)
                    state["paused"] = loop.call_later(PAUSE_S, resume)
                    return
                self._admit(conn, address, handle)

        def remove() -> None:
            state["removed"] = True
            if state["paused"] is not None:
                state["paused"].cancel()
            loop.remove_reader(fd)

        loop.add_reader(fd, on_readable)
        return remove

    # ------------------------------------------------------------------ accounting
    def active(self) -> int:
        """Open client connections not already being closed by the guard."""
        return len(self._server._connections) - len(self._closing)

    def _admit(self, conn: socket.socket, address: Any, handle) -> None:
        if self.active() >= self.cap and not self._evict(1):
            self.refused += 1
            self._log.warning("full", "%s: %d connections open (the cap), none of them idle: "
                              "closing new connections", self.name, self.active())
            conn.close()
            return
        try:
            handle(conn, address)
        except Exception as exc:  # noqa: BLE001 - one bad connection must not stop accepting
            self._log.warning("handle", "%s: could not start a connection: %s", self.name, exc)
            conn.close()

    def _evict(self, n: int) -> int:
        """Close up to ``n`` of the longest idle connections; how many."""
        done = 0
        while done < n and self._idle:
            server_conn, _ = self._idle.popitem(last=False)
            self._closing.add(server_conn)
            server_conn.stream.close()
            done += 1
        if done:
            self.evicted += done
            self._log.warning("evict", "%s: %d connections open (the cap is %d): closed the "
                              "longest idle to make room", self.name, self.active(), self.cap)
        return done

    def _idle_again(self, server_conn: Any) -> None:
        self._idle.pop(server_conn, None)
        self._idle[server_conn] = None

    def _busy(self, server_conn: Any) -> None:
        self._idle.pop(server_conn, None)
