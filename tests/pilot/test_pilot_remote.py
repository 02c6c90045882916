"""The pilot with a remote storage element: the real ``panda se`` (HTTP/WebDAV) through the
``http`` copytool, and a storage element that accepts connections and never answers."""
from __future__ import annotations

import zlib

import pytest

from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path
from peers import HungServer, start_se
from pilotkit import fake, make_job, run_pilot, se, stored  # noqa: F401


def test_job_through_http_storage_element(fake, tmp_path):
    root = tmp_path / "se-root"
    data = b"remote input\n" * 500
    path = root / replica_path("test", "remote.in")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with start_se(root, token="se-token") as httpse:
        tool = {"name": "http", "options": {"token": "se-token"}}
        fake.site_config["storage"] = {"input": {"name": "HTTP_SE", "url": httpse.url},
                                       "output": {"name": "HTTP_SE", "url": httpse.url}}
        fake.site_config["copytools"] = {"input": tool, "output": tool}
        entry = {"lfn": "remote.in", "scope": "test", "fsize": len(data),
                 "checksum": f"ad:{zlib.adler32(data):08x}"}
        script = "tr a-z A-Z < remote.in > remote.out; cat ../pilot_state.json > state.seen"
        fake.add_job(make_job(951, script, inputs=[entry], outputs=["remote.out", "state.seen"]))
        res = run_pilot(fake, tmp_path / "wd")
        final = fake.final(951)
        assert final is not None and final["state"] == "finished", res.stderr
        out = root / replica_path("test", "remote.out")
        assert out.read_bytes() == data.upper()
        files = stored(final)
        assert files["remote.out"]["surl"].startswith(httpse.url)
        assert files["remote.out"]["adler32"] == f"{zlib.adler32(data.upper()):08x}"
        assert (root / replica_path("test", "job951.log.tgz")).exists()
        # the state file a payload could read holds no copytool secret
        seen = (root / replica_path("test", "state.seen")).read_text()
        assert '"PandaID": 951' in seen and "se-token" not in seen


def test_hung_http_storage_element(fake, tmp_path):
    with HungServer() as hung:
        fake.site_config["storage"]["input"] = {"name": "HUNG", "url": hung.url}
        fake.site_config["copytools"]["input"] = {"name": "http", "options": {}}
        fake.site_config["transfer"] = {"timeout_s": 1, "retries": 0}
        entry = {"lfn": "never.in", "scope": "test", "fsize": 5, "checksum": "ad:00000001"}
        fake.add_job(make_job(952, "cat never.in", inputs=[entry]))
        res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(952)
    assert final is not None, res.stderr
    assert int(final["pilotErrorCode"]) == ErrorCode.STAGEIN_TIMEOUT, res.stderr


@pytest.mark.xrootd
def test_job_through_xrootd_storage_element(fake, tmp_path):
    """Input and output through Debian's xrootd with the xrdcp copytool."""
    from peers import start_xrootd, xrootd_available

    if xrootd_available():
        pytest.skip(xrootd_available())
    with start_xrootd() as xrd:
        data = b"over xrootd\n" * 300
        path = xrd.data / replica_path("xin", "x.in")
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        fake.site_config["storage"] = {"input": {"name": "XRD", "url": xrd.url},
                                       "output": {"name": "XRD", "url": xrd.url}}
        tool = {"name": "xrdcp", "options": {}}
        fake.site_config["copytools"] = {"input": tool, "output": tool}
        entry = {"lfn": "x.in", "scope": "xin", "fsize": len(data),
                 "checksum": f"ad:{zlib.adler32(data):08x}"}
        fake.add_job(make_job(953, "tr a-z A-Z < x.in > x.out", inputs=[entry], outputs=["x.out"],
                              scope="xout"))
        res = run_pilot(fake, tmp_path / "wd")
        final = fake.final(953)
        assert final is not None and final["state"] == "finished", res.stderr
        out = xrd.data / replica_path("xout", "x.out")
        assert out.read_bytes() == data.upper()
        assert stored(final)["x.out"]["surl"].startswith("root://127.0.0.1:")
