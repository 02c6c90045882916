"""cp, mv and symlink against a storage element on the local file system (file:// URLs)."""
from __future__ import annotations

import hashlib
import os
import zlib

import pytest

from copytools import Transfer, TransferError, load, run_transfer
from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_url


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def _no_leftovers(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".panda-part")]


@pytest.fixture
def site(tmp_path, payload):
    """A storage element folder holding the payload as scope 'data', and a work directory."""
    se, work = tmp_path / "se", tmp_path / "work"
    work.mkdir()
    _, data = payload
    url = replica_url(f"file://{se}", "data", "in.bin")
    path = url[len("file://"):]
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
    return se, work, url, data


@pytest.mark.parametrize("tool", ["cp", "mv", "symlink"])
def test_stage_in_verifies_size_and_adler32(site, tool):
    se, work, url, data = site
    t = Transfer("in.bin", "data", url, str(work / "in.bin"), len(data), "ad:" + adler(data))
    result = run_transfer(load(tool), t, "in", timeout=30, retries=0)
    assert (result.fsize, result.adler32, result.md5) == (len(data), adler(data), None)
    assert (work / "in.bin").read_bytes() == data
    assert _no_leftovers(work)
    if tool == "symlink":
        assert os.path.islink(work / "in.bin")
    assert os.path.exists(url[7:]) == (tool != "mv")


def test_stage_in_md5_catalogue(site):
    _, work, url, data = site
    md5 = hashlib.md5(data).hexdigest()
    t = Transfer("in.bin", "data", url, str(work / "in.bin"), len(data), "md5:" + md5)
    assert load("cp").stage_in(t).md5 == md5
    t.checksum = "md5:" + "0" * 32
    with pytest.raises(TransferError) as err:
        load("cp").stage_in(t)
    assert err.value.code == ErrorCode.MD5_MISMATCH_IN


@pytest.mark.parametrize("tool", ["cp", "symlink"])
def test_adler32_mismatch_in_fails_and_leaves_nothing(site, tool):
    _, work, url, data = site
    t = Transfer("in.bin", "data", url, str(work / "in.bin"), len(data), "ad:00000001")
    with pytest.raises(TransferError) as err:
        run_transfer(load(tool), t, "in", timeout=30, retries=1, backoff=0)
    assert err.value.code == ErrorCode.ADLER32_MISMATCH_IN and err.value.retryable
    assert not os.path.lexists(work / "in.bin") and _no_leftovers(work)


def test_size_mismatch(site):
    _, work, url, data = site
    t = Transfer("in.bin", "data", url, str(work / "in.bin"), len(data) + 1)
    with pytest.raises(TransferError) as err:
        load("cp").stage_in(t)
    assert err.value.code == ErrorCode.LOCAL_FILE_SIZE_MISMATCH


@pytest.mark.parametrize("tool", ["cp", "mv", "symlink"])
def test_missing_source(tmp_path, tool):
    t = Transfer("gone.bin", "data", f"file://{tmp_path}/se/gone.bin", str(tmp_path / "gone.bin"))
    with pytest.raises(TransferError) as err:
        run_transfer(load(tool), t, "in", timeout=10, retries=2, backoff=0)
    assert err.value.code == ErrorCode.MISSING_INPUT and not err.value.retryable


def test_stage_in_onto_a_full_disk(site, tiny_fs):
    _, _, url, data = site  # 3 MiB into a 1 MiB file system
    t = Transfer("in.bin", "data", url, str(tiny_fs / "in.bin"), len(data))
    with pytest.raises(TransferError) as err:
        run_transfer(load("cp"), t, "in", timeout=10, retries=2, backoff=0)
    assert err.value.code == ErrorCode.NO_LOCAL_SPACE and not err.value.retryable
    assert os.listdir(tiny_fs) == [], "a failed copy must not leave a partial file"


def test_stage_out_to_a_full_storage_element(tmp_path, payload, tiny_fs):
    src, data = payload
    t = Transfer("out.bin", "data", f"file://{tiny_fs}/data/out.bin", str(src))
    with pytest.raises(TransferError) as err:
        load("cp").stage_out(t)
    assert err.value.code == ErrorCode.NO_REMOTE_SPACE and "No space" in err.value.message
    assert os.listdir(tiny_fs / "data") == []


@pytest.mark.parametrize("tool", ["cp", "mv"])
def test_stage_out_creates_replica(tmp_path, payload, tool):
    src, data = payload
    url = replica_url(f"file://{tmp_path}/se", "user", "out.bin")
    t = Transfer("out.bin", "user", url, str(src))
    result = run_transfer(load(tool, md5=True), t, "out", timeout=30, retries=0)
    assert result.adler32 == adler(data) and result.md5 == hashlib.md5(data).hexdigest()
    assert result.surl == url and open(url[7:], "rb").read() == data
    assert src.exists() == (tool == "cp")


def test_stage_out_mismatch_removes_the_replica(tmp_path, payload):
    src, data = payload
    url = f"file://{tmp_path}/se/user/out.bin"
    t = Transfer("out.bin", "user", url, str(src), checksum="ad:00000001")
    with pytest.raises(TransferError) as err:
        load("cp").stage_out(t)
    assert err.value.code == ErrorCode.ADLER32_MISMATCH_OUT
    assert not os.path.exists(url[7:])


def test_stage_out_md5_mismatch(tmp_path, payload):
    src, data = payload
    url = f"file://{tmp_path}/se/user/out.bin"
    with pytest.raises(TransferError) as err:
        load("cp").stage_out(Transfer("out.bin", "user", url, str(src), checksum="md5:" + "0" * 32))
    assert err.value.code == ErrorCode.MD5_MISMATCH_OUT and not os.path.exists(url[7:])
    ok = load("cp").stage_out(Transfer("out.bin", "user", url, str(src), len(data),
                                       "md5:" + hashlib.md5(data).hexdigest()))
    assert ok.md5 == hashlib.md5(data).hexdigest()


def test_stage_out_of_a_missing_output(tmp_path):
    t = Transfer("out.bin", "user", f"file://{tmp_path}/se/out.bin", str(tmp_path / "nope"))
    with pytest.raises(TransferError) as err:
        load("cp").stage_out(t)
    assert err.value.code == ErrorCode.NO_SUCH_FILE


def test_symlink_cannot_stage_out(tmp_path, payload):
    src, _ = payload
    with pytest.raises(TransferError) as err:
        load("symlink").stage_out(Transfer("o", "s", f"file://{tmp_path}/o", str(src)))
    assert err.value.code == ErrorCode.STAGEOUT_FAILED and "symlink" in err.value.message


@pytest.mark.parametrize("tool", ["cp", "mv", "symlink"])
def test_missing_work_directory_is_not_a_missing_input(site, tool):
    _, work, url, data = site
    t = Transfer("in.bin", "data", url, str(work / "gone" / "in.bin"), len(data))
    with pytest.raises(TransferError) as err:
        load(tool).stage_in(t)
    assert err.value.code == ErrorCode.STAGEIN_FAILED
    assert os.path.exists(url[len("file://"):]), "the replica must stay where it was"


def test_plain_paths_work_like_file_urls(site):
    _, work, url, data = site
    t = Transfer("in.bin", "data", url[len("file://"):], str(work / "in.bin"), len(data))
    assert load("cp").stage_in(t).adler32 == adler(data)


def test_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    t = Transfer("e", "s", f"file://{tmp_path}/empty", str(tmp_path / "e"), 0, "ad:00000001")
    assert load("cp").stage_in(t).fsize == 0
