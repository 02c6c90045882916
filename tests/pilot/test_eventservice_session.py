"""The pilot's event-service session alone (pilot/eventservice/session.py): a stub server that
sends hostile ranges, a payload (a thread on the real named pipes) that misbehaves. Only the
usable range reaches the payload; every bad line is logged and survived; outputs go to a real
file:// storage element through the cp copytool."""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from panda_core.replicas import replica_path
from panda_core.siteconfig import SiteConfig
from panda_core.wire import decode_job, range_output_lfn
from pilot.eventservice import EventServiceSettings
from pilot.eventservice.session import EventServiceSession, SessionContext
from pilot.stage import StageSettings
from pilotkit import put_input, site_config

GOOD = "1-5-3-20-1"


class StubServer:
    """getEventRanges answers from a list; updateEventRanges takes everything."""

    def __init__(self, replies):
        self.url = "http://stub"
        self.replies = list(replies)
        self.reports: list[dict] = []

    def post(self, method, form, policy=None, deadline=None):
        if method == "getEventRanges":
            return self.replies.pop(0) if self.replies else {"StatusCode": 0, "eventRanges": [],
                                                            "eventRangesPending": 0}
        groups = json.loads(form["eventRanges"])
        for g in groups:
            for item in g["eventRanges"]:
                self.reports.append({**item, "zipFile": g["zipFile"]})
        return {"StatusCode": 0, "Returns": [True] * sum(len(g["eventRanges"]) for g in groups),
                "Command": {}}


def session(tmp_path, replies):
    se = tmp_path / "se"
    put_input(se, "s", "f.root", b"x" * 50)
    site = SiteConfig.from_dict(site_config(se))
    job = decode_job({"PandaID": 5, "transformation": "/bin/true", "jobsetID": 1, "taskID": 1,
                      "outFiles": "log.tgz", "logFile": "log.tgz", "scopeLog": "s"})
    work = tmp_path / "job" / "work"
    work.mkdir(parents=True)
    server = StubServer(replies)
    ctx = SessionContext(client=server, site=site, job=job, workdir=work,
                         outdir=tmp_path / "job" / "es", stage_settings=StageSettings.from_site(site),
                         remaining_s=lambda: None, reserve_s=0, stop_requested=lambda: False,
                         on_command=lambda c: None)
    return EventServiceSession(ctx, EventServiceSettings(batch=4, poll_s=0.1)), server, se, work


def payload(env, work: Path, seen: list[str]):
    """Misbehaves first (garbage, a done for a range it does not hold, a symlink as output),
    then does its one range properly, then asks again and gets ``end``."""
    reports = open(env["PANDA_ES_REPORTS"], "w", buffering=1)
    ranges = open(env["PANDA_ES_RANGES"])
    reports.write("hello pilot\n" + "x" * 5000 + "\n" + f"done {GOOD} nothing.txt\n\xff\n")
    while True:
        reports.write("ready\n")
        line = ranges.readline().strip()
        seen.append(line)
        if line == "end":
            return
        word, rid, lfn, first, last, path = line.split(" ")
        assert (work / path).read_bytes() == b"x" * 50            # its file was staged in
        if not any("link" in s for s in seen):
            os.symlink("/etc/passwd", work / "link")
            seen.append("link")
            reports.write(f"done {rid} link\n")
            continue
        (work / "out.txt").write_text(f"{first}-{last}\n")
        reports.write(f"done {rid} out.txt\n")


def test_hostile_ranges_and_a_misbehaving_payload(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    bad = [{"eventRangeID": "1-5-1-0-1", "startEvent": 0, "lastEvent": 9,
            "LFN": "../../etc/passwd", "scope": "s"},
           {"eventRangeID": "not-an-id", "startEvent": 0, "lastEvent": 9, "LFN": "f.root"},
           {"eventRangeID": "1-5-2-10-1", "startEvent": 19, "lastEvent": 10, "LFN": "f.root"},
           "a string"]
    good = {"eventRangeID": GOOD, "startEvent": 20, "lastEvent": 29, "LFN": "f.root",
            "GUID": "g", "scope": "s"}
    again = {**good, "eventRangeID": "1-5-3-20-2"}
    es, server, se, work = session(tmp_path, [
        {"StatusCode": 0, "eventRanges": json.dumps(bad + [good])},    # PanDA's string form
        {"StatusCode": 0, "eventRanges": [again]}])
    env = es.prepare()
    es.start()
    seen: list[str] = []
    t = threading.Thread(target=payload, args=(env, work, seen))
    t.start()
    t.join(30)
    assert not t.is_alive()
    es.finish(payload_crashed=False)
    ranges = [line for line in seen if line.startswith("range")]
    assert ranges == [f"range {GOOD} f.root 20 29 f.root", "range 1-5-3-20-2 f.root 20 29 f.root"]
    assert seen[-1] == "end"
    status = {(r["eventRangeID"], r["eventStatus"]) for r in server.reports}
    assert ("1-5-1-0-1", "failed") in status and ("1-5-2-10-1", "failed") in status
    assert (GOOD, "failed") in status                      # its output was a symlink
    [done] = [r for r in server.reports if r["eventStatus"] == "finished"]
    lfn = range_output_lfn("1-5-3-20-2")
    assert done["eventRangeID"] == "1-5-3-20-2" and done["zipFile"]["lfn"] == lfn
    assert (se / replica_path("s", lfn)).read_text() == "20-29\n"
    assert es.events == 10 and es.done == 1 and es.protocol_errors >= 4
    assert not (work / ".es_ranges").exists() and not (work / ".es_reports").exists()
    text = caplog.text
    assert "unusable event range" in text and "not a regular file" in text
    assert "which the payload does not hold" in text and "longer than 4096" in text
