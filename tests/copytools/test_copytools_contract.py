"""The contract: checksum parsing, hostile names, loading, run_transfer's kill and retries."""
from __future__ import annotations

import os
import time

import pytest

import copytools
from copytools import Transfer, TransferError, load, parse_checksum, run_transfer
from copytools.base import CopyTool, TransferResult
from copytools.checksum import BACKEND, StreamChecksum, checksum_file
from panda_core.errorcodes import ErrorCode



def adler(data: bytes) -> str:
    import zlib
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def test_parse_checksum_forms():
    assert parse_checksum("ad:0A1B2C3D") == ("adler32", "0a1b2c3d")
    assert parse_checksum("adler32:1b2c3d") == ("adler32", "001b2c3d")
    assert parse_checksum("md5:" + "a" * 32) == ("md5", "a" * 32)
    assert parse_checksum("0a1b2c3d") == ("adler32", "0a1b2c3d")
    assert parse_checksum(None) is None and parse_checksum("") is None
    for bad in ("sha1:abcd", "ad:xyz", "md5:abc", "ad:123456789"):
        with pytest.raises(ValueError):
            parse_checksum(bad)


def test_stream_checksum_matches_zlib_and_hashlib(tmp_path):
    import hashlib
    data = os.urandom(5 * 1024 * 1024 + 3)
    cs = StreamChecksum(md5=True)
    for i in range(0, len(data), 777777):
        cs.update(data[i:i + 777777])
    assert (cs.size, cs.adler32, cs.md5) == (len(data), adler(data), hashlib.md5(data).hexdigest())
    (tmp_path / "f").write_bytes(data)
    assert checksum_file(str(tmp_path / "f")).adler32 == adler(data)
    assert BACKEND in ("isal", "zlib-ng", "zlib")


def test_load_names_the_unknown_tool_and_the_installed_ones():
    with pytest.raises(copytools.UnknownCopyTool) as err:
        load("nosuchtool")
    assert "nosuchtool" in str(err.value) and "cp" in str(err.value) and "http" in str(err.value)
    tool = load("cp", md5=True)
    assert tool.name == "cp" and tool.options == {"md5": True}


@pytest.mark.parametrize("lfn,scope,surl,local", [
    ("../etc/passwd", "s", "file:///se/x", "x"),
    ("/etc/passwd", "s", "file:///se/x", "x"),
    ("a\0b", "s", "file:///se/x", "x"),
    ("ok.txt", "..", "file:///se/x", "x"),
    ("ok.txt", "s", "file:///se/../../etc/passwd", "x"),
    ("ok.txt", "s", "file:///se/x%00y", "x"),
    ("ok.txt", "s", "file:///se/x", "bad\0path"),
    ("-rf", "s", "file:///se/x", "x"),
])
def test_hostile_names_refused_before_anything_moves(tmp_path, lfn, scope, surl, local):
    t = Transfer(lfn=lfn, scope=scope, surl=surl, local_path=str(tmp_path / "w" / local)
                 if "\0" not in local else local)
    for direction in ("in", "out"):
        with pytest.raises(TransferError) as err:
            run_transfer(load("cp"), t, direction, timeout=10, retries=3, backoff=0)
        assert err.value.code == ErrorCode.HOSTILE_FILE_NAME
        assert not err.value.retryable
    assert not (tmp_path / "w").exists()


def test_bad_catalogue_checksum_is_a_clear_error(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    t = Transfer("f", "s", f"file://{src}", str(tmp_path / "g"), checksum="crc:1234")
    with pytest.raises(TransferError) as err:
        load("cp").stage_in(t)
    assert err.value.code == ErrorCode.STAGEIN_FAILED and "crc:1234" in err.value.message


class _DownloadOnly(CopyTool):
    """Base of the stage-in test tools below: CopyTool asks for both directions."""

    def copy_out(self, t, timeout, want_md5):
        raise TransferError(ErrorCode.STAGEOUT_FAILED, f"{self.name} is a stage-in test tool")


def test_a_tool_missing_a_copy_method_cannot_be_made():
    class InOnly(CopyTool):
        name = "in-only"

        def copy_in(self, t, timeout, want_md5):
            return TransferResult(fsize=0, adler32="00000001")

    with pytest.raises(TypeError, match="abstract.*copy_out"):
        InOnly()
    with pytest.raises(TypeError, match="abstract.*copy_in"):
        CopyTool()


class _FlakyTool(_DownloadOnly):
    """Fails ``fail_times`` attempts (counted in a file: each attempt is its own process)."""

    name = "flaky"

    def copy_in(self, t, timeout, want_md5):
        counter = self.options["counter"]
        n = int(open(counter).read() or 0) if os.path.exists(counter) else 0
        with open(counter, "w") as f:
            f.write(str(n + 1))
        if n < self.options["fail_times"]:
            raise TransferError(ErrorCode.STAGEIN_FAILED, f"attempt {n + 1} fails",
                                retryable=self.options.get("retryable", True))
        with open(t.local_path, "wb") as f:
            f.write(b"ok")
        return TransferResult(fsize=2, adler32=adler(b"ok"), surl=t.surl)


def test_retryable_errors_are_retried_with_backoff(tmp_path):
    counter = str(tmp_path / "n")
    tool = _FlakyTool(counter=counter, fail_times=2)
    t = Transfer("f", "s", "x://y", str(tmp_path / "f"), fsize=2, checksum="ad:" + adler(b"ok"))
    start = time.monotonic()
    result = run_transfer(tool, t, "in", timeout=10, retries=2, backoff=0.2)
    assert result.fsize == 2 and open(counter).read() == "3"
    assert time.monotonic() - start >= 0.2 + 0.4  # backoff doubles: 0.2 s, then 0.4 s


def test_retries_run_out_and_final_errors_are_not_retried(tmp_path):
    t = Transfer("f", "s", "x://y", str(tmp_path / "f"))
    with pytest.raises(TransferError) as err:
        run_transfer(_FlakyTool(counter=str(tmp_path / "a"), fail_times=5), t, "in", 10, 1, 0)
    assert "attempt 2 fails" in err.value.message
    with pytest.raises(TransferError):
        run_transfer(_FlakyTool(counter=str(tmp_path / "b"), fail_times=5, retryable=False),
                     t, "in", 10, 3, 0)
    assert open(tmp_path / "b").read() == "1"


class _HangingTool(_DownloadOnly):
    """Starts a child that would outlive us, then hangs: the kill must take both."""

    name = "hanging"

    def copy_in(self, t, timeout, want_md5):
        import subprocess
        proc = subprocess.Popen(["sleep", "300"])
        with open(self.options["pidfile"], "w") as f:
            f.write(str(proc.pid))
        with open(partial_path_of(t), "wb") as f:
            f.write(b"half")
        time.sleep(300)


def partial_path_of(t):
    from copytools.base import partial_path
    return partial_path(t.local_path)


def test_hung_attempt_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    t = Transfer("f", "s", "x://y", str(tmp_path / "f"))
    start = time.monotonic()
    with pytest.raises(TransferError) as err:
        run_transfer(_HangingTool(pidfile=str(pidfile)), t, "in", timeout=1.0, retries=0)
    assert err.value.code == ErrorCode.STAGEIN_TIMEOUT
    assert time.monotonic() - start < 5
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the transfer's child process survived the kill")
    assert not os.path.exists(partial_path_of(t)), "the half file must be removed"


def test_run_transfer_rejects_bad_arguments(tmp_path):
    t = Transfer("f", "s", "x://y", str(tmp_path / "f"))
    with pytest.raises(ValueError):
        run_transfer(load("cp"), t, "sideways", 10)
    with pytest.raises(ValueError):
        run_transfer(load("cp"), t, "in", 0)
