"""The pilot as a real subprocess against the fake dispatcher: the job loop end to end."""
from __future__ import annotations

import json
import os
import tarfile
import zlib

from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path
from fakepanda import FakePanda
from pilotkit import (TOKEN, fake, make_job, put_input, run_pilot, se, site_config,  # noqa: F401
                      stored)


def test_job_with_input_and_output(fake, se, tmp_path):
    data = b"hello panda\n" * 1000
    entry = put_input(se, "test", "in.1.dat", data)
    # the payload looks at its own environment and at the pilot's (/proc/<pilot>/environ)
    script = ("cat in.1.dat > out.1.dat; env > env.txt; echo payload-says-hi; "
              "pilot=$(ps -o ppid= -p $PPID | tr -d ' '); "
              "tr '\\0' '\\n' < /proc/$pilot/environ >> env.txt; cp env.txt out.env.txt")
    fake.add_job(make_job(101, script, inputs=[entry], outputs=["out.1.dat", "out.env.txt"]))
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0, res.stderr
    final = fake.final(101)
    assert final is not None, res.stderr
    assert final["state"] == "finished", final
    assert final["pilotErrorCode"] == "0"
    assert final["transExitCode"] == "0"
    assert float(final["cpuConsumptionTime"]) >= 0 and int(final["maxRSS"]) > 0
    files = stored(final)
    assert set(files) == {"out.1.dat", "out.env.txt", "job101.log.tgz"}
    out = se / replica_path("test", "out.1.dat")
    assert out.read_bytes() == data
    assert files["out.1.dat"]["fsize"] == len(data)
    assert files["out.1.dat"]["adler32"] == f"{zlib.adler32(data):08x}"
    assert files["out.1.dat"]["surl"].endswith(replica_path("test", "out.1.dat"))
    assert files["job101.log.tgz"]["guid"] == "logguid-101"
    # the payload never saw the pilot's token
    env_text = (se / replica_path("test", "out.env.txt")).read_text()
    assert TOKEN not in env_text
    assert "PANDA_ID=101" in env_text and "PANDA_LOG_LEVEL=INFO" in env_text
    # the log tarball holds the payload's stdout, not the inputs or outputs
    with tarfile.open(se / replica_path("test", "job101.log.tgz")) as tar:
        names = tar.getnames()
        stdout = [n for n in names if n.endswith("payload.stdout")]
        assert stdout and b"payload-says-hi" in tar.extractfile(stdout[0]).read()
        pilot_log = tar.extractfile([n for n in names if n.endswith("/pilot.log")][0]).read()
        assert b"payload started" in pilot_log and b"stage-in of test:in.1.dat" in pilot_log
    assert not any(n.endswith(("in.1.dat", "out.1.dat")) for n in names)
    # protocol: getJob carried our fields; starting and running were reported before the end
    get = [f for m, p, f in fake.requests if p == "/server/panda/getJob"][0]
    for key in ("siteName", "node", "cpu", "mem", "diskSpace", "computingElement",
                "prodSourceLabel", "resourceType", "pilotVersion", "cores"):
        assert get.get(key), key
    assert [u["state"] for u in fake.updates(101)][:2] == ["starting", "running"]
    assert fake.unauthorized == 0
    # the work dir is cleaned up and the pilot exits 0 when there is no job left
    assert not list((tmp_path / "wd").glob("panda_job_*"))


def test_no_job_exits_zero(fake, tmp_path):
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0, res.stderr
    assert "no job" in res.stderr


def test_several_jobs_then_stop(fake, tmp_path):
    for i in range(3):
        fake.add_job(make_job(200 + i, f"echo {i}", log=False))
    res = run_pilot(fake, tmp_path / "wd", "--max-jobs", "2")
    assert res.returncode == 0, res.stderr
    assert fake.final(200)["state"] == "finished" and fake.final(201)["state"] == "finished"
    assert fake.final(202) is None and len(fake.jobs) == 1


def test_payload_failure_is_reported(fake, tmp_path):
    fake.add_job(make_job(301, "echo broken >&2; exit 3", outputs=["never.out"]))
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0, res.stderr
    final = fake.final(301)
    assert final["state"] == "failed"
    assert final["transExitCode"] == "3"
    assert int(final["pilotErrorCode"]) == ErrorCode.PAYLOAD_FAILED
    assert set(stored(final)) == {"job301.log.tgz"}   # the log is kept, the outputs are not


def test_missing_output_fails_with_1165(fake, tmp_path):
    fake.add_job(make_job(302, "true", outputs=["not.made"]))
    run_pilot(fake, tmp_path / "wd")
    final = fake.final(302)
    assert final["state"] == "failed" and int(final["pilotErrorCode"]) == ErrorCode.NO_SUCH_FILE


def test_missing_input_fails_stagein(fake, se, tmp_path):
    entry = {"lfn": "absent.dat", "scope": "test", "fsize": 3, "checksum": "ad:00000001"}
    fake.add_job(make_job(303, "cat absent.dat", inputs=[entry]))
    run_pilot(fake, tmp_path / "wd")
    final = fake.final(303)
    assert final["state"] == "failed"
    assert int(final["pilotErrorCode"]) in (ErrorCode.MISSING_INPUT, ErrorCode.STAGEIN_FAILED)
    assert "transExitCode" not in final   # the payload never ran


def test_corrupt_input_fails_checksum(fake, se, tmp_path):
    entry = put_input(se, "test", "bad.dat", b"abc")
    entry["checksum"] = "ad:0badbad0"
    fake.add_job(make_job(304, "cat bad.dat", inputs=[entry]))
    run_pilot(fake, tmp_path / "wd")
    assert int(fake.final(304)["pilotErrorCode"]) == ErrorCode.ADLER32_MISMATCH_IN


def test_hostile_names_are_refused(fake, tmp_path):
    fake.add_job(make_job(305, "touch ../escape", outputs=["../escape"]))
    fake.add_job(make_job(306, "true", inputs=[{"lfn": "/etc/passwd", "scope": "test", "fsize": 1,
                                                "checksum": "ad:00000001"}]))
    run_pilot(fake, tmp_path / "wd")
    for pid in (305, 306):
        final = fake.final(pid)
        assert final["state"] == "failed"
        assert int(final["pilotErrorCode"]) == ErrorCode.HOSTILE_FILE_NAME
    assert not (tmp_path / "escape").exists()


def test_tampered_spec_is_refused(fake, tmp_path):
    marker = tmp_path / "ran"
    fake.add_job(make_job(401, f"touch {marker}"))
    fake.tamper[401] = {"jobPars": f"-c 'touch {marker}; echo evil'"}
    res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(401)
    assert final["state"] == "failed", res.stderr
    assert int(final["pilotErrorCode"]) == ErrorCode.BAD_SIGNATURE
    assert not marker.exists()
    assert [u["state"] for u in fake.updates(401)] == ["failed"]


def test_job_longer_than_walltime_is_not_run(fake, tmp_path):
    marker = tmp_path / "ran"
    fake.add_job(make_job(402, f"touch {marker}", maxWalltime=3000, _ignore_walltime=True))
    res = run_pilot(fake, tmp_path / "wd", "--walltime", "600", "--reserve", "10")
    get = [f for m, p, f in fake.requests if p == "/server/panda/getJob"][0]
    assert 500 < int(get["remainingWalltime"]) <= 590
    final = fake.final(402)
    assert final["state"] == "failed", res.stderr
    assert int(final["pilotErrorCode"]) == ErrorCode.BATCH_WALLTIME
    assert not marker.exists()


def test_walltime_from_slurm_environment(fake, tmp_path):
    import time
    end = int(time.time()) + 400
    res = run_pilot(fake, tmp_path / "wd", env={"SLURM_JOB_END_TIME": str(end), "SLURM_JOB_ID": "77"})
    assert res.returncode == 0, res.stderr
    get = [f for m, p, f in fake.requests if p == "/server/panda/getJob"][0]
    assert 300 < int(get["remainingWalltime"]) <= 340
    assert get["batchID"] == "77"


def test_bad_token_is_a_clear_error(fake, tmp_path):
    fake.add_job(make_job(403, "true"))
    res = run_pilot(fake, tmp_path / "wd", env={"PANDA_AUTH_TOKEN": "wrong"})
    assert res.returncode != 0
    assert "403" in res.stderr and fake.jobs   # job not taken


def test_token_file(fake, tmp_path):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    fake.add_job(make_job(404, "true", log=False))
    res = run_pilot(fake, tmp_path / "wd", "--token-file", str(tok), env={"PANDA_AUTH_TOKEN": ""})
    assert res.returncode == 0, res.stderr
    assert fake.final(404)["state"] == "finished"


def test_queuedata_and_key_from_files(fake, se, tmp_path):
    qd = tmp_path / "qd.json"
    qd.write_text(json.dumps({"panda_wms": fake.site_config}))
    key = tmp_path / "key.pem"
    key.write_text(fake.pem)
    fake.add_job(make_job(405, "true", log=False))
    res = run_pilot(fake, tmp_path / "wd", "--queuedata", str(qd), "--public-key", str(key))
    assert res.returncode == 0, res.stderr
    assert fake.final(405)["state"] == "finished"
    paths = {p for m, p, f in fake.requests}
    assert not any(p.startswith("/cache/") or p.endswith("get_public_key") for p in paths)


def test_direct_read_gives_the_payload_the_url(fake, se, tmp_path):
    entry = put_input(se, "test", "remote.dat", b"read in place\n")
    fake.site_config["direct_read"] = True
    job = make_job(501, "", inputs=[entry], outputs=["args.txt", "listing.txt"], transferType="direct")
    job["jobPars"] = "-c 'echo \"$0\" > args.txt; ls > listing.txt' remote.dat"
    fake.add_job(job)
    res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(501)
    assert final["state"] == "finished", res.stderr
    args = (se / replica_path("test", "args.txt")).read_text().strip()
    assert args == f"file://{se}/{replica_path('test', 'remote.dat')}"
    assert "remote.dat" not in (se / replica_path("test", "listing.txt")).read_text()


def test_input_and_output_tools_differ(fake, se, tmp_path):
    entry = put_input(se, "test", "linked.dat", b"by symlink\n")
    fake.site_config["copytools"] = {"input": {"name": "symlink", "options": {}},
                                     "output": {"name": "cp", "options": {}}}
    fake.add_job(make_job(502, "test -L linked.dat && cat linked.dat > copy.out",
                          inputs=[entry], outputs=["copy.out"]))
    res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(502)
    assert final["state"] == "finished", res.stderr
    out = se / replica_path("test", "copy.out")
    assert out.read_text() == "by symlink\n" and not out.is_symlink()


def test_unknown_copytool_fails_stagein_clearly(fake, se, tmp_path):
    entry = put_input(se, "test", "x.dat", b"x")
    fake.site_config["copytools"] = {"input": {"name": "no-such-tool", "options": {}},
                                     "output": {"name": "cp", "options": {}}}
    fake.add_job(make_job(503, "true", inputs=[entry]))
    run_pilot(fake, tmp_path / "wd")
    final = fake.final(503)
    assert int(final["pilotErrorCode"]) == ErrorCode.STAGEIN_FAILED
    assert "no-such-tool" in final["pilotErrorDiag"]


def test_unusable_workdir_base_is_a_clear_error(fake, tmp_path):
    base = tmp_path / "a-file"
    base.write_text("not a folder")
    fake.add_job(make_job(504, "true"))
    res = run_pilot(fake, base)
    assert res.returncode == 1
    assert "pilot cannot start" in res.stderr and "Traceback" not in res.stderr
    assert fake.jobs   # the job was not taken


def test_job_killed_before_it_starts(fake, se, tmp_path):
    """The server answers the 'starting' update with tobekilled: nothing is staged in or run."""
    marker = tmp_path / "ran"
    entry = put_input(se, "test", "k.dat", b"k")
    fake.commands["505"] = "tobekilled"
    fake.add_job(make_job(505, f"touch {marker}", inputs=[entry]))
    res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(505)
    assert final is not None, res.stderr
    assert int(final["pilotErrorCode"]) == ErrorCode.KILLED_BY_SERVER
    assert not marker.exists() and "stage-in of" not in res.stderr
    assert [u["state"] for u in fake.updates(505)] == ["starting", "failed"]


def test_garbage_from_the_server_is_a_clear_error(fake, tmp_path):
    fake.garbage = "<html>proxy error</html>"
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 1
    assert "not JSON" in res.stderr and "Traceback" not in res.stderr


def test_job_without_signature_or_id_is_refused(fake, tmp_path):
    marker = tmp_path / "ran"
    fake.add_job(make_job(506, f"touch {marker}"))
    fake.tamper[506] = {"specSignature": ""}
    res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(506)
    assert int(final["pilotErrorCode"]) == ErrorCode.BAD_SIGNATURE, res.stderr
    assert "not signed" in final["pilotErrorDiag"] and not marker.exists()


def test_no_signing_key_refuses_the_job(fake, tmp_path):
    bad_key = tmp_path / "key.pem"
    bad_key.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    fake.add_job(make_job(507, "true"))
    res = run_pilot(fake, tmp_path / "wd", "--public-key", str(bad_key))
    assert res.returncode == 1
    final = fake.final(507)
    assert int(final["pilotErrorCode"]) == ErrorCode.BAD_SIGNATURE
    assert "no key to check" in final["pilotErrorDiag"]


def test_malformed_panda_id_is_refused_safely(fake, tmp_path):
    job = make_job(508, "true")
    job["PandaID"] = "../../508x"
    fake.add_job(job)
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    final = fake.final("../../508x")
    assert int(final["pilotErrorCode"]) == ErrorCode.BAD_JOB_SPEC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["se", "wd"]   # nothing escaped


def test_timefloor_keeps_taking_jobs_then_stops_cleanly(se, tmp_path):
    """Issue 16 item 5: jobs are taken while the pilot has run less than the queue's timefloor;
    the first job that ends past it is the last, the pilot exits 0 and leaves the rest."""
    fake = FakePanda(site_config(se, pilots={"timefloor": 0.05}), token=TOKEN).start()  # 3 s
    try:
        for i in range(8):
            fake.add_job(make_job(900 + i, "sleep 0.5", log=False))
        res = run_pilot(fake, tmp_path / "wd")
        assert res.returncode == 0, res.stderr
        done = [i for i in range(900, 908) if fake.final(i)]
        assert 2 <= len(done) <= 6, (done, res.stderr[-2000:])
        assert all(fake.final(i)["state"] == "finished" for i in done)
        assert f"past the queue's timefloor of 0.05 min: no new job after {len(done)}" \
            in res.stderr
        assert len(fake.jobs) == 8 - len(done)        # the others stay with the server
        # --timefloor overrides the queue's value (0: no floor: every job while wall time lasts)
        res = run_pilot(fake, tmp_path / "wd", "--timefloor", "0")
        assert res.returncode == 0 and not fake.jobs, res.stderr
        res = run_pilot(fake, tmp_path / "wd", "--timefloor", "-1")
        assert res.returncode == 2 and "must be 0 or more minutes" in res.stderr
    finally:
        fake.stop()
        os.unlink(fake.key_file)


def test_past_timefloor_rule():
    from pilot.cli import past_timefloor

    assert not past_timefloor(0, 9999, 1)          # the first job is always asked for
    assert not past_timefloor(3, 59, 1) and past_timefloor(3, 60, 1)
    assert not past_timefloor(5, 1e6, 0)           # no floor
