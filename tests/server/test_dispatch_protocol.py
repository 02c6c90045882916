"""PanDA's pilot protocol (server.dispatcher) over the task buffer on SQLite, PostgreSQL and
MariaDB: getJob fields and signatures, nJobs, updateJob to the end, bad input, site-bound
pilots, heartbeats of jobs the pilot no longer owns."""
from __future__ import annotations

import base64
import calendar
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from dbkit import BlockingDispatcher, add_site, history, seed_jobs, stored_xml
from panda_core.canonical import signed_bytes
from panda_core.wire import DISPATCH_KEY
from server.auth import Identity, KeyStore
from server.dispatcher import Dispatcher, ProtocolError

PILOT = Identity("pilot-1", "pilot", "SITE_A")


@pytest.fixture
def disp(taskbuffer, tmp_path):
    add_site(taskbuffer, "SITE_A")
    add_site(taskbuffer, "SITE_B")
    return BlockingDispatcher(Dispatcher(taskbuffer, KeyStore(tmp_path / "keys")))


def test_getjob_spec_and_signature(disp, taskbuffer):
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    reply = disp.get_job({"siteName": "SITE_A", "node": "wn1", "someUnknownKey": "x",
                          "mem": "4000", "cores": "2"}, PILOT)
    assert reply["StatusCode"] == 0 and reply["PandaID"] == pid
    assert reply["taskID"] == task_id and reply["attemptNr"] == 1
    assert reply["inFiles"] == f"in.{task_id}.000001"
    assert reply["outFiles"].split(",") == [f"out.{task_id}.000001",
                                            f"log.{task_id}.000001.1.tgz"]
    assert reply["ddmEndPointIn"] == "SE_A" and reply["checksum"] == "ad:00000001"
    spec = {k: v for k, v in reply.items() if k != "StatusCode"}
    load_pem_public_key(disp.keys.public_key_pem.encode()).verify(
        base64.b64decode(spec["specSignature"]), signed_bytes(spec))
    job = taskbuffer.jobs.get(pid)
    assert (job["status"], job["node"], job["pilot_owner"]) == ("sent", "wn1", "pilot-1")
    assert disp.get_job({"siteName": "SITE_A"}, PILOT)["StatusCode"] == 20


def test_getjob_spec_is_bound_to_its_dispatch(disp, taskbuffer):
    """The signed spec names the site, the pilot it was sent to, the pilot's nonce and the
    dispatch time: a replayed spec does not match what its next receiver expects."""
    _, (pid, other) = seed_jobs(taskbuffer, "SITE_A", 2)
    reply = disp.get_job({"siteName": "SITE_A", "pilotID": "wn1:42", "pilotNonce": "n-1_x"},
                         PILOT)
    spec = {k: v for k, v in reply.items() if k != "StatusCode"}
    load_pem_public_key(disp.keys.public_key_pem.encode()).verify(
        base64.b64decode(spec["specSignature"]), signed_bytes(spec))
    sent = taskbuffer.jobs.get(pid)["state_changed"]
    assert spec[DISPATCH_KEY] == {"site": "SITE_A", "pilotID": "wn1:42", "nonce": "n-1_x",
                                  "time": calendar.timegm(sent.utctimetuple())}
    # pilot 3 sends no nonce: its spec binds none, and it is served as before
    many = disp.get_job({"siteName": "SITE_A", "nJobs": "1"}, PILOT)
    assert many["jobs"][0]["PandaID"] == other and many["jobs"][0][DISPATCH_KEY]["nonce"] == ""
    for bad in ("x" * 129, "no spaces", "ü"):
        with pytest.raises(ProtocolError) as err:
            disp.get_job({"siteName": "SITE_A", "pilotNonce": bad}, PILOT)
        assert err.value.status_code == 30 and "pilotNonce" in str(err.value)


def test_queuedata_is_signed(disp, taskbuffer):
    from panda_core.canonical import QUEUEDATA_SIGNATURE_KEY, queuedata_signed_bytes
    from server.queuedata import signed_queuedata

    config = taskbuffer.sites.get("SITE_A")["config"]
    doc = json.loads(json.dumps(signed_queuedata(config, disp.keys.sign_canonical)))
    key = load_pem_public_key(disp.keys.public_key_pem.encode())
    key.verify(base64.b64decode(doc[QUEUEDATA_SIGNATURE_KEY]),
               queuedata_signed_bytes("SITE_A", doc["panda_wms"]))
    with pytest.raises(InvalidSignature):   # one site's signed config is not another's
        key.verify(base64.b64decode(doc[QUEUEDATA_SIGNATURE_KEY]),
                   queuedata_signed_bytes("SITE_B", doc["panda_wms"]))


def test_getjob_njobs_and_fit(disp, taskbuffer):
    _, ids = seed_jobs(taskbuffer, "SITE_A", 3, memory_mb=2000)
    _, (big,) = seed_jobs(taskbuffer, "SITE_A", 1, memory_mb=64000)
    reply = disp.get_job({"siteName": "SITE_A", "nJobs": "5", "mem": "8000"}, PILOT)
    assert reply["StatusCode"] == 0
    assert [j["PandaID"] for j in reply["jobs"]] == ids      # the big one does not fit
    assert taskbuffer.jobs.get(big)["status"] == "activated"


def test_updatejob_cycle_registers_outputs(disp, taskbuffer):
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    job = disp.get_job({"siteName": "SITE_A"}, PILOT)
    ok = {"StatusCode": 0, "command": "NULL"}
    assert disp.update_job({"jobId": str(pid), "state": "starting", "attemptNr": "1"}, PILOT) == ok
    assert disp.update_job({"jobId": pid, "state": "running", "attemptNr": 1, "node": "wn9",
                            "maxRSS": "1234", "unknown": "ignored"}, PILOT) == ok
    xml = stored_xml(job["outFiles"].split(","))
    assert disp.update_job({"jobId": pid, "state": "finished", "attemptNr": 1,
                            "transExitCode": "0", "cpuConsumptionTime": "12.5",
                            "xml": xml}, PILOT) == ok
    row = taskbuffer.jobs.get(pid)
    assert row["status"] == "finished" and row["max_rss"] == 1234 and row["node"] == "wn9"
    assert row["cpu_consumption_time"] == 12.5
    assert all(f["status"] == "ready" for f in row["files"])
    assert history(taskbuffer, pid)[-2:] == [("running", "holding"), ("holding", "finished")]
    assert taskbuffer.tasks.get(task_id)["status"] == "done"
    # the job is over: a late heartbeat is told to stop; so is one for an unknown job
    assert disp.update_job({"jobId": pid, "state": "running"}, PILOT)["command"] == "tobekilled"
    assert disp.update_job({"jobId": 10 ** 9, "state": "running"}, PILOT)["command"] == \
        "tobekilled"


@pytest.mark.parametrize("form, code", [
    ({"state": "running"}, 80),                                   # jobId missing
    ({"jobId": "abc", "state": "running"}, 30),                   # not a number
    ({"jobId": "1", "state": "activated"}, 30),                   # not a pilot state
    ({"jobId": "1"}, 80),                                         # state missing
])
def test_updatejob_bad_input(disp, form, code):
    with pytest.raises(ProtocolError) as err:
        disp.update_job(form, PILOT)
    assert err.value.status_code == code


def test_values_beyond_their_columns(disp, taskbuffer):
    """Numbers beyond a 32-bit column are refused with a reason (nothing changes); names longer
    than their column are cut; resources beyond 32 bits fit any job. No database error."""
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    reply = disp.get_job({"siteName": "SITE_A", "node": "n" * 1000, "pilotID": "p" * 2000,
                          "batchID": "b" * 600, "cores": str(2 ** 40), "mem": str(2 ** 40),
                          "remainingWalltime": str(2 ** 40)}, PILOT)
    assert reply["StatusCode"] == 0 and reply["PandaID"] == pid
    job = taskbuffer.jobs.get(pid)
    assert (len(job["node"]), len(job["pilot_id"]), len(job["batch_id"])) == (255, 512, 255)
    for key in ("pilotErrorCode", "transExitCode", "exeErrorCode", "attemptNr"):
        with pytest.raises(ProtocolError) as err:
            disp.update_job({"jobId": pid, "state": "running", key: str(2 ** 40)}, PILOT)
        assert err.value.status_code == 30 and "32-bit" in str(err.value)
    assert taskbuffer.jobs.get(pid)["status"] == "sent"
    reply = disp.update_job({"jobId": pid, "state": "running", "node": "n" * 5000,
                             "pilotErrorDiag": "d" * 9000}, PILOT)     # its node, cut alike
    assert reply == {"StatusCode": 0, "command": "NULL"}
    job = taskbuffer.jobs.get(pid)
    assert (job["status"], len(job["node"]), len(job["pilot_error_diag"])) == \
        ("running", 255, 4000)


def test_bad_xml_changes_nothing(disp, taskbuffer):
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    disp.get_job({"siteName": "SITE_A"}, PILOT)
    for xml in ("not json", json.dumps([1, 2]), json.dumps({"f": {"fsize": "big"}})):
        with pytest.raises(ProtocolError):
            disp.update_job({"jobId": pid, "state": "finished", "xml": xml}, PILOT)
    assert taskbuffer.jobs.get(pid)["status"] == "sent"


def test_site_bound_pilot(disp, taskbuffer):
    _, (pid_b,) = seed_jobs(taskbuffer, "SITE_B", 1)
    with pytest.raises(ProtocolError) as err:
        disp.get_job({"siteName": "SITE_B"}, PILOT)
    assert err.value.status_code == 70
    other = Identity("pilot-b", "pilot", "SITE_B")
    assert disp.get_job({"siteName": "SITE_B"}, other)["PandaID"] == pid_b
    with pytest.raises(ProtocolError) as err:
        disp.update_job({"jobId": pid_b, "state": "running"}, PILOT)
    assert err.value.status_code == 70
    with pytest.raises(ProtocolError) as err:
        disp.get_job({"siteName": "NO_SUCH_SITE"}, Identity("a", "admin"))
    assert err.value.status_code == 30


def test_kill_reaches_the_pilot(disp, taskbuffer):
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    disp.get_job({"siteName": "SITE_A"}, PILOT)
    disp.update_job({"jobId": pid, "state": "running"}, PILOT)
    taskbuffer.jobs.kill(pid, actor="alice")
    assert disp.update_job({"jobId": pid, "state": "running"}, PILOT)["command"] == "tobekilled"
    status = disp.get_status({"ids": f"{pid},nonsense"})
    assert status["status"] == "cancelled,unknown"
