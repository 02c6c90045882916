"""http, xrdcp and gfal against real peers on 127.0.0.1: ``panda se`` and Debian's xrootd."""
from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path

import pytest

from copytools import Transfer, TransferError, load, run_transfer
from copytools.gfal import import_gfal2
from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_url
from peers import start_se


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def _gfal_missing() -> str | None:
    try:
        import_gfal2()
    except ImportError as exc:
        return str(exc)
    return None


needs_gfal = pytest.mark.skipif(_gfal_missing() is not None, reason=str(_gfal_missing()))


def _roundtrip(tool, se_url, tmp_path, payload, lfn):
    """Stage a file out, then in again under the catalogue's size and adler32."""
    src, data = payload
    url = replica_url(se_url, "user", lfn)
    out = run_transfer(tool, Transfer(lfn, "user", url, str(src)), "out", timeout=30, retries=0)
    assert (out.fsize, out.adler32, out.surl) == (len(data), adler(data), url)
    dst = tmp_path / lfn
    got = run_transfer(tool, Transfer(lfn, "user", url, str(dst), len(data), "ad:" + out.adler32),
                       "in", timeout=30, retries=0)
    assert got.adler32 == adler(data) and dst.read_bytes() == data
    return url


# -- http -----------------------------------------------------------------------------------------
def test_http_roundtrip(se, tmp_path, payload):
    url = _roundtrip(load("http"), se.url, tmp_path, payload, "h1.bin")
    assert (se.root / url[len(se.url) + 1:]).read_bytes() == payload[1]


def test_http_davs_style_url_and_md5(se, tmp_path, payload):
    src, data = payload
    url = replica_url(se.url.replace("http://", "dav://"), "user", "h2.bin")
    res = load("http").stage_out(Transfer("h2.bin", "user", url, str(src),
                                          checksum="md5:" + hashlib.md5(data).hexdigest()))
    assert res.md5 == hashlib.md5(data).hexdigest()


def test_http_token_and_mkcol_parents(tmp_path, payload):
    src, data = payload
    with start_se(tmp_path / "root", token="tok", strict_webdav=True) as se:
        url = replica_url(se.url, "user", "t.bin")
        t = Transfer("t.bin", "user", url, str(src))
        with pytest.raises(TransferError) as err:
            load("http").stage_out(t)
        assert err.value.code == ErrorCode.STAGEOUT_AUTH_FAILURE and "401" in err.value.message
        token_file = tmp_path / "token"
        token_file.write_text("tok\n")
        assert load("http", token_file=str(token_file)).stage_out(t).adler32 == adler(data)
        assert (se.root / url[len(se.url) + 1:]).read_bytes() == data


def test_https_with_the_sites_ca(tmp_path, payload):
    from peers import make_test_ca
    ca = make_test_ca(tmp_path / "ca")
    src, data = payload
    with start_se(tmp_path / "root", tls=ca) as se:
        assert se.url.startswith("https://")
        url = replica_url(se.url.replace("https://", "davs://"), "user", "s.bin")
        tool = load("http", ca=str(ca.ca))
        out = run_transfer(tool, Transfer("s.bin", "user", url, str(src)), "out", 30, 0)
        assert out.adler32 == adler(data)
        got = run_transfer(tool, Transfer("s.bin", "user", url, str(tmp_path / "s.bin"), len(data),
                                          "ad:" + adler(data)), "in", 30, 0)
        assert got.fsize == len(data)
        with pytest.raises(TransferError) as err:  # the system CAs do not know this one
            run_transfer(load("http"), Transfer("s.bin", "user", url, str(tmp_path / "t.bin")),
                         "in", 30, 3, 0)
        assert err.value.code == ErrorCode.STAGEIN_FAILED and "TLS" in err.value.message
        assert not err.value.retryable


def test_http_missing_and_mismatch(se, tmp_path, payload):
    t = Transfer("none.bin", "user", f"{se.url}/user/none.bin", str(tmp_path / "n"))
    with pytest.raises(TransferError) as err:
        run_transfer(load("http"), t, "in", timeout=10, retries=2, backoff=0)
    assert err.value.code == ErrorCode.MISSING_INPUT
    src, data = payload
    url = f"{se.url}/user/mm.bin"
    load("http").stage_out(Transfer("mm.bin", "user", url, str(src)))
    t = Transfer("mm.bin", "user", url, str(tmp_path / "mm.bin"), len(data), "ad:12345678")
    with pytest.raises(TransferError) as err:
        load("http").stage_in(t)
    assert err.value.code == ErrorCode.ADLER32_MISMATCH_IN
    assert not (tmp_path / "mm.bin").exists()


def test_http_dead_peer_is_a_retryable_failure(tmp_path):
    from peers import free_port
    t = Transfer("f", "user", f"http://127.0.0.1:{free_port()}/user/f", str(tmp_path / "f"))
    with pytest.raises(TransferError) as err:
        load("http").stage_in(t)
    assert err.value.code == ErrorCode.STAGEIN_FAILED and err.value.retryable


def test_http_full_storage_element(tmp_path, tiny_fs, payload):
    src, _ = payload
    with start_se(tiny_fs / "root", log_path=tmp_path / "se.log") as se:
        with pytest.raises(TransferError) as err:
            run_transfer(load("http"), Transfer("f", "user", f"{se.url}/user/f", str(src)), "out",
                         timeout=20, retries=2, backoff=0)
    assert err.value.code == ErrorCode.NO_REMOTE_SPACE and "507" in err.value.message
    assert not err.value.retryable


@pytest.mark.parametrize("direction,code", [("in", ErrorCode.STAGEIN_TIMEOUT),
                                            ("out", ErrorCode.STAGEOUT_TIMEOUT)])
def test_hung_storage_element_is_killed(hung, tmp_path, payload, direction, code):
    src, _ = payload
    local = str(tmp_path / "f") if direction == "in" else str(src)
    t = Transfer("f", "user", f"{hung.url}/user/f", local)
    start = time.monotonic()
    with pytest.raises(TransferError) as err:
        run_transfer(load("http"), t, direction, timeout=1.0, retries=1, backoff=0.1)
    assert err.value.code == code
    assert time.monotonic() - start < 6
    assert sorted(os.listdir(tmp_path)) == ["payload.bin"], "no half file may be left"


# -- xrootd ---------------------------------------------------------------------------------------
@pytest.mark.xrootd
def test_xrdcp_roundtrip_and_server_checksum(xrootd, tmp_path, payload):
    tool = load("xrdcp")
    url = _roundtrip(tool, xrootd.url, tmp_path, payload, "x1.bin")
    assert tool.remote_adler32(url) == adler(payload[1])


@pytest.mark.xrootd
def test_xrootd_starts_with_a_bounded_fd_limit(xrootd):
    """xrootd sizes its poller by this limit; CI's ~10^9 made it die with SIGSEGV at start."""
    from peers import XROOTD_FD_LIMIT
    limits = Path(f"/proc/{xrootd.proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = (int(v) for v in line.split()[3:5])
    assert soft <= hard <= XROOTD_FD_LIMIT


def test_xrdcp_missing_and_mismatch(xrootd, tmp_path, payload):
    tool = load("xrdcp")
    t = Transfer("none", "user", f"{xrootd.url}/user/none", str(tmp_path / "none"))
    with pytest.raises(TransferError) as err:
        run_transfer(tool, t, "in", timeout=20, retries=1, backoff=0)
    assert err.value.code == ErrorCode.MISSING_INPUT
    assert sorted(os.listdir(tmp_path)) == ["payload.bin"]
    src, data = payload
    url = f"{xrootd.url}/user/x2.bin"
    tool.stage_out(Transfer("x2.bin", "user", url, str(src)))
    t = Transfer("x2.bin", "user", url, str(tmp_path / "x2.bin"), len(data),
                 "md5:" + "0" * 32)
    with pytest.raises(TransferError) as err:
        tool.stage_in(t)
    assert err.value.code == ErrorCode.MD5_MISMATCH_IN
    t = Transfer("x2.bin", "user", url, str(src), checksum="ad:00000002")
    with pytest.raises(TransferError) as err:
        tool.stage_out(t)
    assert err.value.code == ErrorCode.ADLER32_MISMATCH_OUT
    assert tool.remote_adler32(url) is None, "a bad upload must be removed"


@pytest.mark.xrootd
def test_xrdcp_hung_server_is_killed(hung, tmp_path):
    t = Transfer("f", "user", f"root://127.0.0.1:{hung.port}//user/f", str(tmp_path / "f"))
    start = time.monotonic()
    with pytest.raises(TransferError) as err:
        run_transfer(load("xrdcp"), t, "in", timeout=1.5, retries=0)
    assert err.value.code == ErrorCode.STAGEIN_TIMEOUT
    assert time.monotonic() - start < 6
    assert os.listdir(tmp_path) == []


# -- gfal -----------------------------------------------------------------------------------------
@needs_gfal
def test_gfal_over_http(se, tmp_path, payload):
    _roundtrip(load("gfal"), se.url, tmp_path, payload, "g1.bin")


@needs_gfal
@pytest.mark.xrootd
def test_gfal_over_xrootd(xrootd, tmp_path, payload):
    _roundtrip(load("gfal"), xrootd.url, tmp_path, payload, "g2.bin")


@needs_gfal
def test_gfal_missing_and_mismatch(se, tmp_path, payload):
    t = Transfer("none", "user", f"{se.url}/user/none", str(tmp_path / "none"))
    with pytest.raises(TransferError) as err:
        run_transfer(load("gfal"), t, "in", timeout=20, retries=1, backoff=0)
    assert err.value.code == ErrorCode.MISSING_INPUT
    src, data = payload
    url = f"{se.url}/user/g3.bin"
    # gfal2 only ever runs in run_transfer's children: its client threads must not be in a
    # process that forks later (the pilot never uses it in-process either)
    run_transfer(load("gfal"), Transfer("g3.bin", "user", url, str(src)), "out", 20, 0)
    t = Transfer("g3.bin", "user", url, str(tmp_path / "g3.bin"), len(data), "ad:00000003")
    with pytest.raises(TransferError) as err:
        run_transfer(load("gfal"), t, "in", 20, 0)
    assert err.value.code == ErrorCode.ADLER32_MISMATCH_IN


@needs_gfal
def test_gfal_hung_server_is_killed(hung, tmp_path):
    t = Transfer("f", "user", f"{hung.url}/user/f", str(tmp_path / "f"))
    with pytest.raises(TransferError) as err:
        run_transfer(load("gfal"), t, "in", timeout=1.5, retries=0)
    assert err.value.code == ErrorCode.STAGEIN_TIMEOUT


@pytest.mark.xrootd
@pytest.mark.parametrize("tool", ["xrdcp", pytest.param("gfal", marks=needs_gfal)])
def test_full_xrootd_storage_element(tool, tiny_fs, payload):
    from peers import start_xrootd, xrootd_available
    if xrootd_available():
        pytest.skip(xrootd_available())
    src, _ = payload  # 3 MiB onto a 1 MiB file system
    with start_xrootd(tiny_fs) as server:
        with pytest.raises(TransferError) as err:
            run_transfer(load(tool), Transfer("f", "user", f"{server.url}/user/f", str(src)),
                         "out", timeout=20, retries=2, backoff=0)
    assert err.value.code == ErrorCode.NO_REMOTE_SPACE and not err.value.retryable


@pytest.mark.parametrize("tool,scheme", [("xrdcp", "root"), pytest.param("gfal", "root", marks=needs_gfal),
                                         pytest.param("gfal", "http", marks=needs_gfal)])
def test_dead_peer_fails_fast_and_retryably(tool, scheme, tmp_path):
    from peers import free_port, xrootd_available
    if tool == "xrdcp" and xrootd_available():
        pytest.skip(xrootd_available())
    url = f"{scheme}://127.0.0.1:{free_port()}//user/f"
    start = time.monotonic()
    with pytest.raises(TransferError) as err:
        run_transfer(load(tool), Transfer("f", "user", url, str(tmp_path / "f")), "in", 30, 0)
    assert err.value.code == ErrorCode.STAGEIN_FAILED and err.value.retryable
    assert time.monotonic() - start < 10, "a refused connection must not be retried for long"
    assert os.listdir(tmp_path) == []


def test_http_truncated_response_leaves_nothing(tmp_path):
    """A peer that promises 1 MB and hangs up after 10 bytes: a retryable failure, no file."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = srv.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789")
            conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        t = Transfer("f", "user", f"http://127.0.0.1:{port}/user/f", str(tmp_path / "f"))
        with pytest.raises(TransferError) as err:
            run_transfer(load("http"), t, "in", timeout=10, retries=1, backoff=0)
    finally:
        srv.close()
    assert err.value.code == ErrorCode.STAGEIN_FAILED and err.value.retryable
    assert os.listdir(tmp_path) == []
