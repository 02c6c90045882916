"""Issue 13 item 2: an existing replica is never overwritten. Stage-out onto a file that holds
other bytes fails with REPLICA_EXISTS and leaves those bytes alone; the same bytes again (a
retried stage-out) succeed. The storage element (``panda se``) refuses such a PUT itself."""
from __future__ import annotations

import zlib

import pytest
import requests

from copytools import Transfer, TransferError, load
from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path, replica_url


ALICE = b"alice's bytes\n"


def test_the_storage_element_never_replaces_a_file(se):
    url = f"{se.url}/keep/base.000001.out"
    assert requests.put(url, data=ALICE).status_code == 201
    r = requests.put(url, data=b"bob's bytes\n")
    assert r.status_code == 412 and "never overwritten" in r.text
    assert requests.put(url, data=ALICE).status_code == 204     # same: fine
    assert requests.get(url).content == ALICE


def _gfal() -> list:
    try:
        from copytools.gfal import import_gfal2
        import_gfal2()
        return ["gfal"]
    except Exception:  # noqa: BLE001 - no gfal2 bindings here: that tool is not tested
        return []


@pytest.mark.parametrize("tool", ["cp", "mv", "http", *_gfal()])
def test_stage_out_onto_another_file_fails_and_keeps_it(tmp_path, se, tool):
    if tool in ("http", "gfal"):
        root, base = se.root, se.url
    else:
        root = tmp_path / "se"
        base = f"file://{root}"
    scope, lfn = "user.alice", f"base.{tool}.out"
    surl = replica_url(base, scope, lfn)
    theirs = root / replica_path(scope, lfn)
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(ALICE)
    out = tmp_path / lfn
    out.write_bytes(b"bob's bytes\n")
    copytool = load(tool)
    with pytest.raises(TransferError) as err:
        copytool.stage_out(Transfer(lfn, scope, surl, str(out)))
    assert err.value.code == ErrorCode.REPLICA_EXISTS and not err.value.retryable
    assert theirs.read_bytes() == ALICE
    assert out.exists()                                   # the job's own output is kept too
    # the same bytes again: a retry of a stage-out that did happen
    out.write_bytes(ALICE)
    result = copytool.stage_out(Transfer(lfn, scope, surl, str(out)))
    assert result.adler32 == f"{zlib.adler32(ALICE):08x}"
    assert theirs.read_bytes() == ALICE


@pytest.mark.slow
@pytest.mark.xrootd
def test_xrdcp_never_overwrites(xrootd, tmp_path):
    copytool = load("xrdcp")
    url = f"{xrootd.url}/user/keep.{tmp_path.name}.out"
    out = tmp_path / "out"
    out.write_bytes(ALICE)
    copytool.stage_out(Transfer("keep.out", "user", url, str(out)))
    out.write_bytes(b"bob's bytes\n")
    with pytest.raises(TransferError) as err:
        copytool.stage_out(Transfer("keep.out", "user", url, str(out)))
    assert err.value.code == ErrorCode.REPLICA_EXISTS, err.value
    assert copytool.remote_adler32(url) == f"{zlib.adler32(ALICE):08x}"
    out.write_bytes(ALICE)                                    # a retry: the same bytes
    assert copytool.stage_out(Transfer("keep.out", "user", url, str(out))).adler32 == \
        f"{zlib.adler32(ALICE):08x}"
