"""``panda se --body-timeout``: a body that stalls or trickles is ended with 408, its half upload
removed, while other clients are served; honest uploads, slow ones included, are not touched."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from peers import start_se

WINDOW = 0.5        # the SE's --body-timeout here


@pytest.fixture(scope="module")
def se(tmp_path_factory):
    server = start_se(tmp_path_factory.mktemp("se-body") / "root",
                      extra_args=["--body-timeout", str(WINDOW)])
    yield server
    server.stop()


def _reply(s: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    s.settimeout(limit)
    out = bytearray()
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return bytes(out), time.monotonic()
        out += chunk


def _no_temp_files(root) -> bool:
    return not any(name.startswith(".panda-upload.")
                   for _, _, files in os.walk(root) for name in files)


def test_a_stalled_upload_is_ended_and_its_half_file_removed(se):
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PUT /stall/f HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        s.sendall(b"x" * 100_000)
        t0 = time.monotonic()
        # meanwhile the server serves others, and the half upload is not visible
        assert requests.put(f"{se.url}/stall/other", data=b"fine").status_code == 201
        assert requests.get(f"{se.url}/stall/f").status_code == 404
        reply, closed = _reply(s, 5)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"request body timeout" in reply
    assert WINDOW <= closed - t0 < WINDOW * 1.25 + 1.0
    assert not (se.root / "stall" / "f").exists() and _no_temp_files(se.root)
    assert requests.get(f"{se.url}/stall/other").content == b"fine"


def test_a_trickling_upload_is_ended_too(se):
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PUT /trickle/f HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        t0 = time.monotonic()
        reply = b""
        try:
            while time.monotonic() - t0 < 5:
                s.sendall(b"y")                  # one byte every 20 ms never stops being "idle"
                time.sleep(0.02)
        except OSError:                          # the server closed on us: read its answer
            pass
        try:
            reply, _ = _reply(s, 2)
        except OSError:                          # reset after the 408 was sent: it was seen
            pass
    assert time.monotonic() - t0 < 4, "the trickle was not ended"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 ")
    assert _no_temp_files(se.root) and not (se.root / "trickle" / "f").exists()


def test_a_silent_client_after_expect_100_continue_is_ended(se):
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PUT /silent/f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        reply, _ = _reply(s, 5)
    assert reply.startswith(b"HTTP/1.1 100 ") and b"HTTP/1.1 408 " in reply
    assert _no_temp_files(se.root)


def test_slow_but_steady_uploads_are_not_ended(se):
    data = os.urandom(64 * 1024)

    def steady():                                # 64 KiB per 0.3 s: progress in every window
        for _ in range(4):
            yield data
            time.sleep(0.3)
    r = requests.put(f"{se.url}/steady/f", data=steady())
    assert r.status_code == 201, r.text
    assert requests.get(f"{se.url}/steady/f").content == data * 4
    # once a body is complete its watch is over: the kept-alive connection is not ended later
    conn = http.client.HTTPConnection("127.0.0.1", se.port, timeout=5)
    conn.request("PROPFIND", "/steady/f", body=b"<propfind/>", headers={"Depth": "0"})
    assert conn.getresponse().read() and conn.sock is not None
    time.sleep(WINDOW * 2)
    conn.request("GET", "/steady/f")             # RemoteDisconnected if it had been closed
    assert conn.getresponse().read() == data * 4
    conn.close()


def test_a_reply_slower_than_the_window_is_not_cut_by_the_body_watch(se):
    big = os.urandom(1 << 20) * 16               # more than the socket buffers hold
    (se.root / "big").write_bytes(big)
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Length: 2\r\n\r\nab")
        time.sleep(WINDOW * 2)                   # the server waits to write the rest
        reply, _ = _reply(s, 5)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == big


def test_bodies_of_other_verbs_are_watched_and_small(se):
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PROPFIND / HTTP/1.1\r\nHost: x\r\nDepth: 0\r\nContent-Length: 100\r\n\r\n<x")
        reply, _ = _reply(s, 5)
    assert reply.startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        reply, _ = _reply(s, 5)
    assert reply.startswith(b"HTTP/1.1 400 ")
    body = b'<?xml version="1.0"?><propfind xmlns="DAV:"><allprop/></propfind>'
    r = requests.request("PROPFIND", f"{se.url}/", data=body, headers={"Depth": "0"})
    assert r.status_code == 207


@pytest.mark.parametrize("value", ["0", "nan"])
def test_a_body_timeout_that_is_not_a_positive_number_is_refused(tmp_path, value):
    res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "se", "--root",
                          str(tmp_path / "r"), "--body-timeout", value],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--body-timeout must be" in res.stderr
