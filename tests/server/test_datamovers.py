"""The data movers against real peers: two ``panda se`` storage elements (third-party COPY and
streamed copies), two XRootD servers (``xrdcp --tpc first``), sources that hang (killed at the
deadline, not between chunks) and sources whose bytes do not match the catalogue."""
from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests

from panda_core.replicas import replica_path
from peers import HungServer, start_se, start_xrootd, xrootd_available
from server.datamovers import (DestinationExists, FileRef, SourceError, TransferFailed,
                               load_movers)
from server.datamovers.http import HttpMover
from server.datamovers.local import LocalMover
from server.datamovers.xrootd import XrootdMover

DATA = b"grid data " * 200_000          # 2 MB: several chunks


def ref(data: bytes = DATA, lfn: str = "f.dat") -> FileRef:
    return FileRef("s", lfn, len(data), f"ad:{zlib.adler32(data):08x}")


def put(root: Path, data: bytes = DATA, lfn: str = "f.dat") -> None:
    path = root / replica_path("s", lfn)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def url(se, lfn: str = "f.dat") -> str:
    return f"{se.url}/{replica_path('s', lfn)}"


@pytest.fixture(scope="module")
def ses(tmp_path_factory):
    """SE_SRC; SE_TPC accepts COPY from SE_SRC; SE_PLAIN does not offer COPY."""
    base = tmp_path_factory.mktemp("movers")
    src = start_se(base / "src")
    tpc = start_se(base / "tpc", extra_args=["--tpc-allow", f"127.0.0.1:{src.port}"])
    plain = start_se(base / "plain")
    yield src, tpc, plain
    for se in (src, tpc, plain):
        se.stop()


def test_third_party_copy_between_two_storage_elements(ses):
    src, tpc, _ = ses
    put(src.root)
    HttpMover().copy(url(src), url(tpc), ref(), timeout_s=30)
    assert (tpc.root / replica_path("s", "f.dat")).read_bytes() == DATA
    assert "third-party copy" in tpc.log()          # the destination pulled: no streaming
    HttpMover().copy(url(src), url(tpc), ref(), timeout_s=30)   # already there: idempotent


def test_destination_without_copy_gets_a_streamed_copy(ses):
    src, _, plain = ses
    put(src.root, lfn="g.dat")
    mover = HttpMover()
    mover.copy(url(src, "g.dat"), url(plain, "g.dat"), ref(lfn="g.dat"), timeout_s=30)
    assert (plain.root / replica_path("s", "g.dat")).read_bytes() == DATA
    assert f"127.0.0.1:{plain.port}" in mover._no_tpc      # asked once, then remembered
    assert "third-party copy" not in plain.log()


def test_copy_refuses_sources_off_the_allow_list_and_push_mode(ses):
    src, tpc, plain = ses
    r = requests.request("COPY", url(plain), headers={"Source": url(src)}, timeout=10)
    assert r.status_code == 403 and "not enabled" in r.text
    r = requests.request("COPY", url(tpc), headers={"Source": "http://127.0.0.1:1/x"},
                         timeout=10)
    assert r.status_code == 403 and "allow list" in r.text
    r = requests.request("COPY", url(tpc), headers={"Destination": url(plain)}, timeout=10)
    assert r.status_code == 501
    assert "COPY" in requests.options(tpc.url, timeout=10).headers["Allow"]
    assert "COPY" not in requests.options(plain.url, timeout=10).headers["Allow"]


@pytest.mark.parametrize("third_party", [True, False])
def test_a_corrupt_source_is_a_source_error_and_leaves_nothing(ses, third_party):
    src, tpc, plain = ses
    lfn = f"bad-{third_party}.dat"
    put(src.root, DATA[:-1] + b"X", lfn=lfn)
    dst = tpc if third_party else plain
    with pytest.raises(SourceError, match="adler32|catalogue"):
        HttpMover(third_party=third_party).copy(url(src, lfn), url(dst, lfn), ref(lfn=lfn), 30)
    assert not (dst.root / replica_path("s", lfn)).exists()


def test_a_missing_source_is_a_source_error(ses):
    src, tpc, plain = ses
    for dst in (tpc, plain):
        with pytest.raises(SourceError):
            HttpMover().copy(url(src, "absent.dat"), url(dst, "absent.dat"),
                             ref(lfn="absent.dat"), 30)


def test_a_hung_source_is_killed_at_the_deadline(ses):
    """The read timeout (60 s) is far beyond the deadline: only the deadline can end it."""
    _, _, plain = ses
    with HungServer() as hung:
        t0 = time.monotonic()
        with pytest.raises(TransferFailed, match="deadline"):
            HttpMover(read_timeout=60).copy(f"{hung.url}/s/x.dat", url(plain, "x.dat"),
                                            ref(lfn="x.dat"), timeout_s=1.5)
        assert time.monotonic() - t0 < 5


class _DripHandler(http.server.BaseHTTPRequestHandler):
    """Sends the header and then one byte a second: never silent, never done."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        try:
            for _ in range(60):
                self.wfile.write(b"g")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_trickling_source_is_killed_at_the_deadline_not_between_chunks(ses):
    _, _, plain = ses
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DripHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferFailed, match="deadline"):
            HttpMover(third_party=False, read_timeout=60).copy(
                f"http://127.0.0.1:{srv.server_address[1]}/s/d.dat", url(plain, "d.dat"),
                ref(lfn="d.dat"), timeout_s=2)
        assert time.monotonic() - t0 < 6
        assert not (plain.root / replica_path("s", "d.dat")).exists()
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------ a file already there


def test_copy_into_panda_se_does_not_replace_a_file_unless_told_overwrite_t(ses):
    src, tpc, _ = ses
    put(src.root, lfn="ow.dat")
    put(tpc.root, b"someone else's replica", lfn="ow.dat")
    target = tpc.root / replica_path("s", "ow.dat")
    for extra in ({}, {"Overwrite": "F"}, {"Overwrite": "f"}):
        r = requests.request("COPY", url(tpc, "ow.dat"),
                             headers={"Source": url(src, "ow.dat"), **extra}, timeout=10)
        assert r.status_code == 412 and "Overwrite: T" in r.text, (extra, r.text)
    r = requests.request("COPY", url(tpc, "ow.dat"),
                         headers={"Source": url(src, "ow.dat"), "Overwrite": "yes please"},
                         timeout=10)
    assert r.status_code == 400 and "Overwrite must be T or F" in r.text
    assert target.read_bytes() == b"someone else's replica"
    r = requests.request("COPY", url(tpc, "ow.dat"),
                         headers={"Source": url(src, "ow.dat"), "Overwrite": "T"}, timeout=30)
    assert r.status_code == 202 and r.text.rstrip().endswith("success: Created")
    assert target.read_bytes() == DATA                   # asked for explicitly: replaced


class _GateHandler(http.server.BaseHTTPRequestHandler):
    """Sends half of DATA, waits for the test's ``gate``, then the rest."""
    gate = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        try:
            self.wfile.write(DATA[:len(DATA) // 2])
            self.wfile.flush()
            type(self).gate.wait(20)
            self.wfile.write(DATA[len(DATA) // 2:])
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_file_that_appears_during_a_pull_is_kept(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GateHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _GateHandler.gate.clear()
    try:
        with start_se(tmp_path / "dst", extra_args=["--tpc-allow", "*"]) as dst:
            target = dst.root / "race.dat"
            with requests.request("COPY", f"{dst.url}/race.dat", timeout=30, stream=True,
                                  headers={"Source": f"http://127.0.0.1:"
                                           f"{srv.server_address[1]}/race.dat"}) as r:
                assert r.status_code == 202          # at once, before the outcome is known
                deadline = time.monotonic() + 10     # the pull is under way: its temp file
                while not any(n.startswith(".panda-upload.") for n in os.listdir(dst.root)):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                target.write_bytes(b"written meanwhile")
                _GateHandler.gate.set()
                body = r.text
            assert "failure: a file appeared at the destination" in body, body
            assert target.read_bytes() == b"written meanwhile"
            assert os.listdir(dst.root) == ["race.dat"]         # no temporary file left
    finally:
        _GateHandler.gate.set()
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("third_party", [True, False])
def test_the_http_mover_never_replaces_other_bytes_at_the_destination(ses, third_party):
    src, tpc, plain = ses
    lfn = f"keep-{third_party}.dat"
    dst = tpc if third_party else plain
    put(src.root, lfn=lfn)
    put(dst.root, b"not the catalogue's", lfn=lfn)
    with pytest.raises(DestinationExists, match="never replaced.*|adler32"):
        HttpMover(third_party=third_party).copy(url(src, lfn), url(dst, lfn), ref(lfn=lfn), 30)
    assert (dst.root / replica_path("s", lfn)).read_bytes() == b"not the catalogue's"


def test_the_http_mover_sends_overwrite_f_and_reads_412_as_there(ses, monkeypatch):
    """A file that appears between the mover's look and its COPY: compared, not replaced."""
    src, tpc, _ = ses
    put(src.root, lfn="late.dat")
    mover = HttpMover()
    look = mover._check_existing
    calls = []

    def late_writer(dst_url, expected, deadline):
        there = look(dst_url, expected, deadline)
        if not calls:                               # after the first look, before the COPY
            put(tpc.root, b"late writer", lfn="late.dat")
        calls.append(there)
        return there
    monkeypatch.setattr(mover, "_check_existing", late_writer)
    with pytest.raises(DestinationExists, match="size 11 bytes"):
        mover.copy(url(src, "late.dat"), url(tpc, "late.dat"), ref(lfn="late.dat"), 30)
    assert (tpc.root / replica_path("s", "late.dat")).read_bytes() == b"late writer"
    assert f"412 COPY /{replica_path('s', 'late.dat')}" in tpc.log()   # asked, and refused


def test_the_local_mover_never_replaces_other_bytes_at_the_destination(tmp_path):
    (tmp_path / "src").write_bytes(DATA)
    (tmp_path / "dst").write_bytes(b"other")
    mover = LocalMover()
    with pytest.raises(DestinationExists, match="size 5 bytes"):
        mover.copy(f"file://{tmp_path}/src", f"file://{tmp_path}/dst", ref(), 30)
    assert (tmp_path / "dst").read_bytes() == b"other"
    (tmp_path / "dst").write_bytes(DATA)
    mover.copy(f"file://{tmp_path}/src", f"file://{tmp_path}/dst", ref(), 30)   # the same: done
    mover.copy(f"file://{tmp_path}/src", f"file://{tmp_path}/new", ref(), 30)
    assert (tmp_path / "new").read_bytes() == DATA
    assert sorted(os.listdir(tmp_path)) == ["dst", "new", "src"]


def test_load_movers_by_name_with_options(tmp_path):
    token = tmp_path / "t"
    token.write_text("secret\n")
    movers = load_movers("local,http,xrootd", {"http": {"token_file": str(token)},
                                               "xrootd": {"tpc": "only"}})
    assert [m.name for m in movers] == ["local", "http", "xrootd"]
    assert movers[1].token == "secret" and movers[2].tpc == "only"
    with pytest.raises(ValueError):
        load_movers("nosuchmover")
    with pytest.raises(ValueError):
        XrootdMover(tpc="sometimes")


@pytest.fixture(scope="module")
def xrootds(tmp_path_factory):
    why = xrootd_available()
    if why:
        pytest.skip(why)
    a = start_xrootd()          # their own folders: pytest's are 0700, closed to xrootd's user
    b = start_xrootd()
    yield a, b
    a.stop()
    b.stop()


def _root(server, lfn: str) -> str:
    return server.url.rstrip("/") + "/" + replica_path("s", lfn)


def _put_root(server, data: bytes, lfn: str) -> None:
    path = server.data / replica_path("s", lfn)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    for p in [path, *path.parents]:
        if p == server.data:
            break
        shutil.chown(p, "xrootd")


@pytest.mark.xrootd
def test_xrootd_copy_verified_at_the_destination(xrootds):
    a, b = xrootds
    _put_root(a, DATA, "x.dat")
    XrootdMover().copy(_root(a, "x.dat"), _root(b, "x.dat"), ref(lfn="x.dat"), timeout_s=60)
    assert (b.data / replica_path("s", "x.dat")).read_bytes() == DATA


@pytest.mark.xrootd
def test_xrootd_checksum_mismatch_is_a_source_error(xrootds):
    a, b = xrootds
    _put_root(a, DATA[:-1] + b"Z", "y.dat")
    with pytest.raises(SourceError):
        XrootdMover().copy(_root(a, "y.dat"), _root(b, "y.dat"), ref(lfn="y.dat"), 60)
    assert not (b.data / replica_path("s", "y.dat")).exists()


@pytest.mark.xrootd
def test_xrootd_never_replaces_a_file_at_the_destination(xrootds):
    a, b = xrootds
    _put_root(a, DATA, "z.dat")
    _put_root(b, b"someone else's", "z.dat")
    with pytest.raises(DestinationExists, match="adler32 .*catalogue says"):
        XrootdMover().copy(_root(a, "z.dat"), _root(b, "z.dat"), ref(lfn="z.dat"), 60)
    assert (b.data / replica_path("s", "z.dat")).read_bytes() == b"someone else's"
    _put_root(b, DATA, "z.dat")                      # the catalogue's bytes: nothing to do
    XrootdMover(tpc="none").copy(_root(a, "z.dat"), _root(b, "z.dat"), ref(lfn="z.dat"), 60)
    with pytest.raises(DestinationExists, match="no adler32 to compare"):
        XrootdMover().copy(_root(a, "z.dat"), _root(b, "z.dat"),
                           FileRef("s", "z.dat", len(DATA), None), 60)


@pytest.mark.xrootd
def test_xrootd_hung_source_is_killed_at_the_deadline(xrootds):
    _, b = xrootds
    with HungServer() as hung:
        t0 = time.monotonic()
        with pytest.raises(TransferFailed, match="deadline|exited"):
            XrootdMover().copy(f"root://127.0.0.1:{hung.port}//s/h.dat", _root(b, "h.dat"),
                               ref(lfn="h.dat"), timeout_s=2)
        assert time.monotonic() - t0 < 8
