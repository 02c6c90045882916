"""``panda se`` as a correct HTTP/1.1 + WebDAV server, talked to over real sockets."""
from __future__ import annotations

import os
import socket
import time
import zlib

import pytest
import requests

from peers import start_se


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def raw(port: int, request: bytes, read_timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh connection, return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_put_get_head_roundtrip(se):
    data = os.urandom(2 * 1024 * 1024 + 1)
    r = requests.put(f"{se.url}/rt/a/b/file.bin", data=data)
    assert r.status_code == 201 and r.headers["Digest"] == f"adler32={adler(data)}"
    assert requests.put(f"{se.url}/rt/a/b/file.bin", data=data).status_code == 204
    assert requests.get(f"{se.url}/rt/a/b/file.bin").content == data
    h = requests.head(f"{se.url}/rt/a/b/file.bin", headers={"Want-Digest": "adler32"})
    assert h.status_code == 200 and int(h.headers["Content-Length"]) == len(data)
    assert h.headers["Digest"] == f"adler32={adler(data)}" and h.content == b""
    assert requests.head(f"{se.url}/rt/none").status_code == 404


def test_ranges(se):
    data = bytes(range(256)) * 4
    requests.put(f"{se.url}/rng/f", data=data)
    cases = {"bytes=10-19": (206, data[10:20]), "bytes=1000-": (206, data[1000:]),
             "bytes=-5": (206, data[-5:]), "bytes=0-99999": (206, data)}
    for rng, (status, body) in cases.items():
        r = requests.get(f"{se.url}/rng/f", headers={"Range": rng})
        assert (r.status_code, r.content) == (status, body), rng
    r = requests.get(f"{se.url}/rng/f", headers={"Range": "bytes=5000-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert requests.get(f"{se.url}/rng/f", headers={"Range": "bytes=x-y"}).content == data


def test_expect_100_continue_handshake(se):
    body = b"pushed by an ARC CE"
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PUT /arc/out.txt HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                  b"Expect: 100-continue\r\n\r\n" % len(body))
        assert s.recv(1024).startswith(b"HTTP/1.1 100")  # before we sent a byte of the body
        s.sendall(body)
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 201")
    assert (se.root / "arc" / "out.txt").read_bytes() == body


def test_if_none_match_refuses_before_the_body(se):
    requests.put(f"{se.url}/inm/f", data=b"first")
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PUT /inm/f HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
                  b"If-None-Match: *\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 412")
    assert requests.get(f"{se.url}/inm/f").content == b"first"
    assert requests.put(f"{se.url}/inm/g", data=b"new", headers={"If-None-Match": "*"}
                        ).status_code == 201


def test_if_none_match_holds_against_a_concurrent_upload(se):
    socks = [socket.create_connection(("127.0.0.1", se.port), timeout=5) for _ in range(2)]
    try:
        for s in socks:  # both pass the existence check: the file is not there yet
            s.sendall(b"PUT /race/f HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                      b"If-None-Match: *\r\nConnection: close\r\n\r\n")
        time.sleep(0.2)
        socks[0].sendall(b"first")
        first = socks[0].recv(1024)
        socks[1].sendall(b"later")
        later = socks[1].recv(1024)
    finally:
        for s in socks:
            s.close()
    assert first.startswith(b"HTTP/1.1 201") and later.startswith(b"HTTP/1.1 412")
    assert (se.root / "race" / "f").read_bytes() == b"first"
    assert os.listdir(se.root / "race") == ["f"]


def test_absolute_form_targets(se):
    requests.put(f"{se.url}/abs/in.txt", data=b"hello")
    reply = raw(se.port, f"GET {se.url}/abs/in.txt HTTP/1.1\r\nHost: elsewhere\r\n"
                f"Connection: close\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nhello")
    reply = raw(se.port, f"PUT {se.url}/abs/up.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                f"Connection: close\r\n\r\nok".encode())
    assert reply.startswith(b"HTTP/1.1 201") and (se.root / "abs" / "up.txt").read_bytes() == b"ok"


def test_propfind_mkcol_delete(se):
    assert requests.request("MKCOL", f"{se.url}/dav").status_code == 201
    assert requests.request("MKCOL", f"{se.url}/dav").status_code == 405
    assert requests.request("MKCOL", f"{se.url}/nope/deeper").status_code == 409
    requests.put(f"{se.url}/dav/f1", data=b"12345")
    r = requests.request("PROPFIND", f"{se.url}/dav/f1", headers={"Depth": "0"})
    assert r.status_code == 207 and "<D:getcontentlength>5</D:getcontentlength>" in r.text
    r = requests.request("PROPFIND", f"{se.url}/dav", headers={"Depth": "1"})
    assert r.status_code == 207 and "/dav/f1</D:href>" in r.text and "<D:collection/>" in r.text
    r = requests.request("PROPFIND", f"{se.url}/dav", headers={"Depth": "infinity"})
    assert r.status_code == 501
    assert requests.request("PROPFIND", f"{se.url}/dav").status_code == 501  # default: infinity
    assert requests.request("PROPFIND", f"{se.url}/gone", headers={"Depth": "0"}
                            ).status_code == 404
    assert requests.delete(f"{se.url}/dav/f1").status_code == 204
    assert requests.delete(f"{se.url}/dav/f1").status_code == 404
    assert requests.delete(f"{se.url}/dav").status_code == 204
    assert requests.delete(f"{se.url}/").status_code == 403
    o = requests.options(f"{se.url}/")
    assert "PROPFIND" in o.headers["Allow"] and o.headers["DAV"] == "1"


@pytest.mark.parametrize("target", ["/a/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                                    "/x%00y", "/..", "/a/.panda-upload.123"])
def test_paths_never_leave_the_root(se, target):
    reply = raw(se.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                .encode())
    assert reply.split(b" ")[1] in (b"400", b"403"), reply[:200]
    reply = raw(se.port, f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                f"Connection: close\r\n\r\nx".encode())
    assert reply.split(b" ")[1] in (b"400", b"403"), reply[:200]


def test_symlink_escape_refused(se, tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("secret")
    os.symlink(outside, se.root / "link")
    assert requests.get(f"{se.url}/link").status_code == 403
    assert requests.put(f"{se.url}/link", data=b"x").status_code == 403
    assert outside.read_text() == "secret"


def test_half_upload_never_visible(se):
    with socket.create_connection(("127.0.0.1", se.port), timeout=5) as s:
        s.sendall(b"PUT /half/f HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        s.sendall(b"x" * 300000)
        time.sleep(0.3)
        assert not (se.root / "half" / "f").exists()
    deadline = time.monotonic() + 5  # the server notices the close and drops the temp file
    while time.monotonic() < deadline and os.listdir(se.root / "half"):
        time.sleep(0.05)
    assert os.listdir(se.root / "half") == []
    assert requests.get(f"{se.url}/half/f").status_code == 404


def test_put_below_a_file_is_a_conflict(se):
    requests.put(f"{se.url}/conflict/f", data=b"x")
    assert requests.put(f"{se.url}/conflict/f/g", data=b"y").status_code == 409
    assert requests.put(f"{se.url}/conflict", data=b"y").status_code == 409  # a folder
    assert requests.get(f"{se.url}/conflict/f").content == b"x"


def test_chunked_upload(se):
    def gen():
        yield b"a" * 100
        yield b"b" * 100
    assert requests.put(f"{se.url}/chunked/f", data=gen()).status_code == 201
    assert requests.get(f"{se.url}/chunked/f").content == b"a" * 100 + b"b" * 100


def test_bearer_token_for_writes(tmp_path):
    with start_se(tmp_path / "root", token="s3cret") as se:
        assert requests.put(f"{se.url}/f", data=b"x").status_code == 401
        assert requests.put(f"{se.url}/f", data=b"x",
                            headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert requests.put(f"{se.url}/f", data=b"x", headers=ok).status_code == 201
        assert requests.get(f"{se.url}/f").content == b"x"  # reads stay open
        assert requests.delete(f"{se.url}/f").status_code == 401
        assert requests.request("MKCOL", f"{se.url}/d").status_code == 401
        assert requests.delete(f"{se.url}/f", headers=ok).status_code == 204


def test_full_disk_gives_507_and_keeps_nothing(tmp_path, tiny_fs):
    with start_se(tiny_fs / "root", log_path=tmp_path / "se.log") as se:
        r = requests.put(f"{se.url}/big", data=os.urandom(2 * 1024 * 1024))
        assert r.status_code == 507
        assert os.listdir(tiny_fs / "root") == []
        assert requests.put(f"{se.url}/small", data=b"fits").status_code == 201


def test_strict_webdav_needs_mkcol(tmp_path):
    with start_se(tmp_path / "root", strict_webdav=True) as se:
        assert requests.put(f"{se.url}/a/f", data=b"x").status_code == 409
        assert requests.request("MKCOL", f"{se.url}/a").status_code == 201
        assert requests.put(f"{se.url}/a/f", data=b"x").status_code == 201


def test_keep_alive_serves_many_requests_on_one_connection(se):
    with requests.Session() as s:
        for i in range(20):
            assert s.put(f"{se.url}/ka/{i}", data=b"%d" % i).status_code == 201
            assert s.get(f"{se.url}/ka/{i}").content == b"%d" % i
