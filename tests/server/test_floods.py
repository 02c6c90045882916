"""Issue 13, point 4 (item 5 of its plan): a connection flood does not stop the server or the
storage element.

1,100 half-open connections (silent ones, and ones that sent half a request head) against
``panda server`` and ``panda se`` started with ``ulimit -n 1024``: ``system/is_alive`` (a GET of
a file on the SE) still answers within 2 s, the log stays small, and a silent connection is
closed after the idle timeout. The guard itself (``panda_core.netguard``) is also driven in
process: the cap, eviction of the longest idle connection, never of one in a request, and the
bounded log of accept errors.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time

import pytest
import requests

from panda_core.netguard import FloodGuard, RateLimitedLog, connection_cap, raise_fd_limit
from peers import start_se
from testkit import start_server, stop_server

N_FLOOD = 1100


def _ulimit_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def flood(port: int, n: int = N_FLOOD) -> list[socket.socket]:
    """``n`` connections that never finish a request: half send nothing, half half a head."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            try:
                s.send(b"GET /api/v1/system/is_alive HTTP/1.1\r\nHost: x\r\n")
            except OSError:            # evicted already
                pass
        socks.append(s)
    return socks


def timed_get(url: str, **kw) -> tuple[float, requests.Response]:
    t0 = time.monotonic()
    reply = requests.get(url, timeout=2, **kw)
    return time.monotonic() - t0, reply


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("flood"), preexec_fn=_ulimit_1024,
                       extra=["--watcher-interval", "0"])
    yield srv
    stop_server(srv)


def test_half_open_flood_leaves_is_alive_answering(limited_server):
    srv = limited_server
    port = int(srv.url.rsplit(":", 1)[1])
    socks = flood(port)
    try:
        for _ in range(3):
            took, reply = timed_get(srv.url + "/api/v1/system/is_alive")
            assert reply.status_code == 200 and reply.json()["data"]["alive"] is True
            assert took < 2.0
        # the pilot protocol too
        pilot = requests.post(srv.url + "/server/panda/isAlive", timeout=2,
                              headers={"Accept": "application/json"})
        assert pilot.json() == {"StatusCode": 0, "alive": "yes"}
    finally:
        for s in socks:
            s.close()
    log = srv.log()
    assert "at most 896 connections per process (open-file limit 1024)" in log
    assert "closed the longest idle" in log
    assert "Too many open files" not in log
    assert srv.log_path.stat().st_size < 100_000, srv.log_path.stat().st_size


def test_a_slow_head_is_closed_after_the_idle_timeout(tmp_path):
    with start_se(tmp_path / "se", extra_args=["--idle-timeout", "1.5"]) as se:
        with socket.create_connection(("127.0.0.1", se.port)) as s:
            t0 = time.monotonic()
            s.settimeout(10)
            for _ in range(5):                     # a slowloris: a byte now and then
                s.sendall(b"G")
                time.sleep(0.2)
            assert s.recv(100) == b""              # closed by the server
            assert 1.0 < time.monotonic() - t0 < 5.0


def test_se_under_flood_still_serves(tmp_path):
    root = tmp_path / "se"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"payload")
    with start_se(root, preexec_fn=_ulimit_1024) as se:
        socks = flood(se.port)
        try:
            for _ in range(3):
                took, reply = timed_get(se.url + "/d/f")
                assert reply.content == b"payload" and took < 2.0
        finally:
            for s in socks:
                s.close()
        log = se.log_path.read_text()
        assert "closed the longest idle" in log and "Too many open files" not in log
        assert se.log_path.stat().st_size < 100_000


@pytest.mark.parametrize("bad", ["0", "x"])
def test_bad_flood_options_are_refused(tmp_path, bad):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server", "--db",
                           f"sqlite:///{tmp_path / 'x.db'}", "--key-dir", str(tmp_path / "k"),
                           "--port", "0", "--max-connections", bad], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode in (1, 2) and "--max-connections" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- the guard in process
def test_cap_is_below_the_fd_limit():
    assert connection_cap(1024) == 896
    assert connection_cap(100) == 36 and connection_cap(10) == 16
    assert connection_cap(1024, 100) == 100 and connection_cap(1024, 5000) == 896
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert raise_fd_limit() >= soft
    finally:  # this worker's later tests start peers, which inherit its limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fd_limit_is_raised_at_most_to_its_cap(monkeypatch):
    """A hard limit of ~10^9 (containers, EL9) is not passed on to what a server starts."""
    import panda_core.netguard as netguard
    set_to = []
    for hard, expected in ((1 << 30, netguard.MAX_FD_LIMIT), (resource.RLIM_INFINITY,
                                                                netguard.MAX_FD_LIMIT),
                           (4096, 4096)):
        set_to.clear()
        monkeypatch.setattr(netguard.resource, "getrlimit", lambda _r, h=hard: (1024, h))
        monkeypatch.setattr(netguard.resource, "setrlimit", lambda _r, v: set_to.append(v))
        assert raise_fd_limit() == expected
        assert set_to == [(expected, hard)]


def test_rate_limited_log_says_what_it_dropped(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        assert limited.warning("k", "accept failed")
        for _ in range(1000):
            now[0] += 0.001
            assert not limited.warning("k", "accept failed")
        assert limited.warning("other", "another kind")
        now[0] = 11
        assert limited.warning("k", "accept failed")
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed", "another kind", "accept failed (1000 similar in the last 11 s not logged)"]


def _guarded_app(cap: int):
    import tornado.httpserver
    import tornado.web

    class Slow(tornado.web.RequestHandler):
        async def get(self):
            await asyncio.sleep(float(self.get_argument("s", "0")))
            self.write("ok")

    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", Slow)]),
                                           idle_connection_timeout=30)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    guard = FloodGuard(cap, "test")
    guard.install(server, [sock])
    return server, guard, sock.getsockname()[1]


async def _request(port: int, path: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data


def test_guard_evicts_the_longest_idle_never_a_request_in_progress():
    async def main():
        server, guard, port = _guarded_app(cap=4)
        busy = asyncio.ensure_future(_request(port, "/?s=0.5"))   # in a request for 0.5 s
        await asyncio.sleep(0.1)
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        await asyncio.sleep(0.1)
        assert guard.active() <= 4 and guard.evicted >= 7
        assert (await _request(port)).endswith(b"ok")
        assert (await busy).endswith(b"ok")                       # never evicted
        for _, w in silent:
            w.close()
        server.stop()
    asyncio.run(main())


def test_guard_refuses_when_every_connection_is_in_a_request():
    async def main():
        server, guard, port = _guarded_app(cap=2)
        busy = [asyncio.ensure_future(_request(port, "/?s=0.6")) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert await _request(port) == b""          # closed at once, nothing half-served
        assert guard.refused == 1
        assert all(r.endswith(b"ok") for r in await asyncio.gather(*busy))
        server.stop()
    asyncio.run(main())


def test_guard_out_of_descriptors_pauses_and_logs_once(caplog, monkeypatch):
    async def main():
        server, guard, port = _guarded_app(cap=100)
        sock = next(iter(server._sockets.values()))
        calls = []
        real_accept = socket.socket.accept

        def accept(self):
            if self is sock and len(calls) < 20:
                calls.append(1)
                raise OSError(errno.EMFILE, "Too many open files")
            return real_accept(self)
        monkeypatch.setattr(socket.socket, "accept", accept)
        with caplog.at_level(logging.WARNING, "panda_core.netguard"):
            replies = await asyncio.gather(*[_request(port) for _ in range(3)])
        assert all(r.endswith(b"ok") for r in replies)
        server.stop()
    asyncio.run(main())
    emfile = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(emfile) == 1          # 20 failures, one line: paused, not spinning
