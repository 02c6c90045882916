"""The PostgreSQL hot path (server.pghot) against the general TaskBuffer path, on PostgreSQL only.

- Parity: the same scenario runs once through a dispatcher on the general path
  (``GeneralPath``) and once through one on the hot path (``HotPath``), each on a freshly
  emptied database with the identity sequences restarted and the
  clock at the same start: the replies and every table the pilot protocol writes must be equal.
  Each step also says which path it expects the hot run to take, so parity cannot hold
  trivially because everything fell back.
- The common cases really take the hot path (a recording ``run`` sees no fallback) and write
  what they must; the uncommon ones change nothing in the hot statement and get the general
  path's canonical reply.
- Many coroutines on one HotPath; the connection pool's limits and its recovery from broken
  connections and database errors; a real server over HTTP whose log must show no hot-path
  failure (a broken hot statement silently falling back is the bug these tests exist for).
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import json
import logging
import re
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests
from sqlalchemy import func, select, text, update

from dbkit import SE_URL, add_site, history, out_lfn, seed_jobs, start_server, stop_server
from panda_core.replicas import replica_url
from server import db
from server.auth import Identity, KeyStore
from server.dispatcher import Dispatcher, ProtocolError
from server.dispatchpath import GeneralPath
from server.pghot import ConnectionPool, HotPath, conninfo
from server.shares import ShareChooser, ShareStore, parse_shares
from server.taskbuffer import TaskBuffer

pytestmark = [pytest.mark.postgres,
              pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True,
                                      scope="session")]

PILOT = Identity("pilot-1", "pilot", "SITE_A")
PILOT_B = Identity("pilot-b", "pilot", "SITE_B")
ADMIN = Identity("root", "admin")
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
FALLBACKS = ("take_job", "apply_update")       # the general path, as ``run`` sees it
HOT_FAILED = "hot path failed"
#: the form of the protocol call a coroutine serves (each gathered call is a task of its own)
REQUEST: contextvars.ContextVar = contextvars.ContextVar("request", default=None)


# ---------------------------------------------------------------------- helpers
class Records(logging.Handler):
    """Warnings of server.pghot: a hot statement that raised is logged there."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def hot_failures(self) -> list[str]:
        return [m for m in self.messages if HOT_FAILED in m]


class HotEnv:
    """An event loop with a thread pool (the server's shape), a HotPath on it and two
    dispatchers over one TaskBuffer: ``disp`` with the hot path, ``general`` without."""

    def __init__(self, engine, clock, keys, size: int = 4):
        self.engine, self.clock, self.keys, self.size = engine, clock, keys, size
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="db")
        self.calls: list[str] = []
        self.ran: list[tuple] = []          # (function name, the form of its request)
        self.records = Records()
        logging.getLogger("server.pghot").addHandler(self.records)
        self.hot: HotPath | None = None
        self.renew()

    def renew(self) -> None:
        """A fresh TaskBuffer, HotPath and dispatchers: no cache survives."""
        if self.hot is not None:
            self.sync(self.hot.close())
        self.tb = TaskBuffer(self.engine, clock=self.clock)
        self.hot = HotPath(GeneralPath(self.tb, self.run), size=self.size)
        self.disp = self.dispatcher(self.hot)
        self.general = self.dispatcher(GeneralPath(self.tb, self.run))
        self.calls.clear()
        self.ran.clear()

    def dispatcher(self, path, chooser=None) -> Dispatcher:
        return Dispatcher(self.tb, self.keys, chooser or ShareChooser(self.tb, ttl_s=0), path,
                          self.run)

    def sync(self, coro):
        return self.loop.run_until_complete(coro)

    async def run(self, func, *args):
        """The server's ``run``: sync code in the thread pool; records what it ran."""
        self.calls.append(getattr(func, "__name__", repr(func)))
        self.ran.append((self.calls[-1], REQUEST.get()))
        return await self.loop.run_in_executor(self.executor, func, *args)

    def fallbacks(self) -> list[str]:
        return [c for c in self.calls if c in FALLBACKS]

    def fell_back(self, form: dict) -> bool:
        """Did the protocol call of ``form`` (through :meth:`call`) take the general path?"""
        return any(name in FALLBACKS and request is form for name, request in self.ran)

    async def call(self, disp: Dispatcher, name: str, form: dict, identity) -> dict:
        """``disp.<name>(form, identity)``, its thread-pool work marked as this form's."""
        REQUEST.set(form)
        return await getattr(disp, name)(form, identity)

    def get_job(self, form: dict, identity=PILOT) -> dict:
        return self.sync(self.call(self.disp, "get_job", form, identity))

    def update_job(self, form: dict, identity=PILOT) -> dict:
        return self.sync(self.call(self.disp, "update_job", form, identity))

    def close(self) -> None:
        try:
            if self.hot is not None:
                self.sync(self.hot.close())
        finally:
            logging.getLogger("server.pghot").removeHandler(self.records)
            self.executor.shutdown(wait=True)
            self.loop.close()


@pytest.fixture
def env(taskbuffer, clock, tmp_path):
    e = HotEnv(taskbuffer.engine, clock, KeyStore(tmp_path / "keys"))
    add_site(e.tb, "SITE_A")
    add_site(e.tb, "SITE_B")
    yield e
    e.close()


def reset_database(engine) -> None:
    """Every table emptied and every identity sequence restarted: a second run of a scenario
    gets the same ids as the first."""
    names = [t.name for t in reversed(db.metadata.sorted_tables)]
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE " + ", ".join(names) + " RESTART IDENTITY"))


def stored(lfns, *, guid=True, checksum="adler32", surl=True, fsize=True) -> dict:
    """A final updateJob's stored files, deterministic (uuid5 guids), so that two runs report
    the same."""
    out = {}
    for lfn in lfns:
        data = lfn.encode()
        info: dict = {}
        if guid:
            info["guid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, lfn))
        if fsize:
            info["fsize"] = len(data)
        if checksum == "adler32":
            info["adler32"] = f"{zlib.adler32(data):08x}"
        elif checksum == "md5sum":
            info["md5sum"] = "0" * 31 + str(len(data) % 10)
        if surl:
            info["surl"] = replica_url(SE_URL, "test", lfn)
        out[lfn] = info
    return out


def xml(lfns, **kw) -> str:
    return json.dumps(stored(lfns, **kw))


# guids the server or the seeding drew at random (uuid4) differ between two runs; the ones the
# pilots report here are uuid5 and are compared as they are
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _norm(value):
    if isinstance(value, str):
        return _UUID4.sub("<uuid4>", value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items() if k != "specSignature"}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def snapshot(engine) -> dict:
    """What the pilot protocol writes, comparable between two runs. Rows of tables whose ids a
    run may draw in another order (history, replicas, dataset entries) keep their order but
    not their row_id."""
    out = {}
    with engine.connect() as conn:
        for table, key in ((db.tasks, ["task_id"]), (db.jobs, ["panda_id"]),
                           (db.jobs_archive, ["panda_id"]), (db.files, ["row_id"]),
                           (db.job_history, ["panda_id", "row_id"]),
                           (db.replicas, ["scope", "lfn", "ddm_endpoint"]),
                           (db.dataset_files, ["dataset", "scope", "lfn"]),
                           (db.datasets, ["name"])):
            rows = conn.execute(select(table).order_by(*(table.c[k] for k in key)))
            out[table.name] = [
                {k: _norm(v) for k, v in r._mapping.items()
                 if not (k == "row_id" and table is not db.files)} for r in rows]
    return out


def set_jobs(engine, ids, **values) -> None:
    with engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id.in_(list(ids))).values(**values))


def job(tb, pid) -> dict:
    return tb.jobs.get(pid)


def outputs(tb, pid, **kw) -> dict:
    """Every output and log file of the job, stored (as the pilot reports them)."""
    return stored([f["lfn"] for f in tb.jobs.get(pid)["files"] if f["type"] != "input"], **kw)


# ---------------------------------------------------------------------- parity harness
class Pilot:
    """The protocol through one path. Hot mode checks that each step took the path it
    expects (``expect``: "hot", "general", or None for "either") and logged no hot failure."""

    def __init__(self, env: HotEnv, hot: bool):
        self.env, self.hot = env, hot
        self.wrong_path: list[str] = []

    def _call(self, name: str, form: dict, identity, expect: str | None):
        env = self.env
        before = len(env.calls), len(env.records.messages)
        try:
            reply = env.sync(env.call(env.disp if self.hot else env.general, name, form,
                                      identity))
        except ProtocolError as exc:
            reply = {"ProtocolError": exc.status_code, "message": str(exc)}
        if self.hot:
            fell_back = any(c in FALLBACKS for c in env.calls[before[0]:])
            took = "general" if fell_back else "hot"
            if expect is not None and took != expect:
                self.wrong_path.append(f"{name} {form}: took the {took} path, "
                                       f"expected the {expect} path")
            for msg in env.records.messages[before[1]:]:
                if HOT_FAILED in msg:
                    self.wrong_path.append(f"{name} {form}: {msg}")
        return reply

    def get_job(self, form, identity=PILOT, expect="hot"):
        return self._call("get_job", form, identity, expect)

    def update_job(self, form, identity=PILOT, expect="hot"):
        return self._call("update_job", form, identity, expect)

    def update_together(self, items: list[tuple[dict, Identity, str | None]]) -> list:
        """updateJobs of distinct jobs arriving together: the hot run sends them at once
        (the hot path applies reports that arrive together in one statement), the general
        run one after the other. (form, identity, expected path) each."""
        if not self.hot:
            return [self._call("update_job", form, identity, None)
                    for form, identity, _ in items]
        env = self.env
        first = len(env.records.messages)

        async def together():
            return await asyncio.gather(
                *(env.call(env.disp, "update_job", form, identity)
                  for form, identity, _ in items), return_exceptions=True)
        replies = []
        for (form, _, expect), reply in zip(items, env.sync(together())):
            if isinstance(reply, ProtocolError):
                reply = {"ProtocolError": reply.status_code, "message": str(reply)}
            elif isinstance(reply, BaseException):
                raise reply
            took = "general" if env.fell_back(form) else "hot"
            if expect is not None and took != expect:
                self.wrong_path.append(f"{form}: took the {took} path, expected the {expect}")
            replies.append(reply)
        self.wrong_path += [m for m in env.records.messages[first:] if HOT_FAILED in m]
        return replies


def parity(env: HotEnv, scenario) -> tuple[list, dict]:
    """Run ``scenario(tb, pilot, clock)`` through the general path, then the hot path, each
    on an empty database; assert equal replies and database contents. Returns the hot run's
    (replies, snapshot) for further checks."""
    results = {}
    for mode in ("general", "hot"):
        reset_database(env.engine)
        env.clock.set(T0)
        env.renew()
        add_site(env.tb, "SITE_A")
        add_site(env.tb, "SITE_B")
        pilot = Pilot(env, hot=mode == "hot")
        replies = scenario(env.tb, pilot, env.clock)
        assert not pilot.wrong_path, pilot.wrong_path
        results[mode] = (_norm(replies), snapshot(env.engine))
    hot, general = results["hot"], results["general"]
    for i, (h, g) in enumerate(zip(hot[0], general[0])):
        assert h == g, f"reply {i} differs"
    assert len(hot[0]) == len(general[0])
    for table in general[1]:
        assert hot[1][table] == general[1][table], f"table {table} differs"
    return hot


def pids(reply: dict) -> list[int]:
    if "jobs" in reply:
        return [j["PandaID"] for j in reply["jobs"]]
    return [reply["PandaID"]] if "PandaID" in reply else []


# ---------------------------------------------------------------------- scenarios
def sc_getjob_spec(tb, p, clock):
    """test_dispatch_protocol's spec test."""
    seed_jobs(tb, "SITE_A", 1)
    out = [p.get_job({"siteName": "SITE_A", "node": "wn1", "someUnknownKey": "x",
                      "mem": "4000", "cores": "2", "pilotID": "pid-7", "batchID": "b-9"})]
    clock.advance(3)
    out.append(p.get_job({"siteName": "SITE_A"}))
    return out


def sc_priority_and_fit(tb, p, clock):
    """Priority order, then each limit a pilot states: cores, memory, walltime, label,
    pilot version; nJobs."""
    _, by_prio = seed_jobs(tb, "SITE_A", 4, priorities=[100, 900, 500, 900])
    _, (big_mem,) = seed_jobs(tb, "SITE_A", 1, memory_mb=64000, priority=5000)
    _, (many_cores,) = seed_jobs(tb, "SITE_A", 1, cores=8, priority=5000)
    _, (long,) = seed_jobs(tb, "SITE_A", 1, walltime_s=7200, priority=5000)
    _, (labelled,) = seed_jobs(tb, "SITE_A", 1, priority=5000)
    set_jobs(tb.engine, [labelled], prod_source_label="test")
    _, (versioned,) = seed_jobs(tb, "SITE_A", 1, pilot_version="3.7.1", priority=6000)
    out = []

    def ask(**form):
        clock.advance(1)
        out.append(p.get_job({"siteName": "SITE_A", "node": "wn", **form}))

    # none of the 5000s fits this pilot: the label "test" job only for a "test" pilot...
    ask(mem="8000", cores="4", remainingWalltime="3600", prodSourceLabel="test")
    # ... the rest, best first, with every limit stated
    ask(mem="8000", cores="4", maxWalltime="3600", nJobs="10", prodSourceLabel="managed")
    ask(mem="8000", cores="4", maxWalltime="3600")                 # nothing left that fits
    ask(pilotVersion="3.7.0", mem="100000", cores="16")            # not the versioned one
    ask(pilotVersion="3.7.1", nJobs="2")                           # the versioned one
    ask(coreCount="8", mem="100000", remainingWalltime="100000")   # the last
    ask()
    return out + [big_mem, many_cores, long, labelled, versioned, by_prio]


def sc_shares(tb, p, clock):
    """Share by share: the eq steps in the tree's order, then the tuple step ("any share not
    in the tree"); at the end one share waits and the plain order is used."""
    ShareStore(tb).save(parse_shares([
        {"name": "production", "value": 30, "children": [
            {"name": "mc", "value": 50}, {"name": "reprocessing", "value": 50}]},
        {"name": "analysis", "value": 70}]))
    groups = {}
    for share, n, prio, mem in (("analysis", 3, 10, 1000), ("mc", 2, 500, 1000),
                                ("reprocessing", 1, 700, 1000), ("production", 1, 9000, 1000),
                                ("weird", 2, 99999, 1000), ("analysis", 1, 20, 30000)):
        _, ids = seed_jobs(tb, "SITE_A", n, priority=prio, memory_mb=mem,
                           task_name=f"{share}-{prio}")
        set_jobs(tb.engine, ids, share=share)
        groups.setdefault(share, []).extend(ids)
    out = []
    for form in ({"mem": "4000"}, {"mem": "4000"}, {"mem": "4000", "nJobs": "3"},
                 {"mem": "4000"}, {"mem": "4000", "nJobs": "4"}, {"mem": "4000"}, {}, {}):
        clock.advance(1)
        out.append(p.get_job({"siteName": "SITE_A", "node": "wn", "cores": "1", **form}))
    return out + [groups]


def sc_stale_share_plan(tb, p, clock):
    """A share plan cached (as the server's chooser keeps it for a while) when new jobs
    arrive: the tuple step still means "a share not in the tree"; the last ask (any share)
    finds the new job that no step names. The default tree."""
    for disp in (p.env.disp, p.env.general):
        disp.job_chooser = ShareChooser(tb, ttl_s=3600)
    _, (big,) = seed_jobs(tb, "SITE_A", 1, priority=1, memory_mb=30000, task_name="ana")
    set_jobs(tb.engine, [big], share="analysis")
    _, weird = seed_jobs(tb, "SITE_A", 2, priority=1, task_name="weird")
    set_jobs(tb.engine, weird, share="weird")
    out = [p.get_job({"siteName": "SITE_A", "mem": "4000"})]       # the plan is made here
    _, (late,) = seed_jobs(tb, "SITE_A", 1, priority=99999, task_name="mc")
    set_jobs(tb.engine, [late], share="mc")
    for form in ({"mem": "4000"}, {"mem": "4000"}, {}, {}):
        clock.advance(1)
        out.append(p.get_job({"siteName": "SITE_A", **form}))
    return out + [[*weird, late, big]]


def sc_sites(tb, p, clock):
    """Offline and unknown sites, site-bound pilots."""
    add_site(tb, "SITE_OFF", status="offline")
    seed_jobs(tb, "SITE_OFF", 1)
    _, (pid_b,) = seed_jobs(tb, "SITE_B", 1)
    out = [
        p.get_job({"siteName": "SITE_OFF"}, ADMIN),
        p.get_job({"siteName": "NO_SUCH_SITE"}, ADMIN, expect=None),
        p.get_job({"siteName": "SITE_B"}, PILOT),                   # 70: bound to SITE_A
        p.get_job({"siteName": ""}, PILOT, expect=None),            # 80: missing
        p.get_job({"siteName": "SITE_A"}, PILOT),                   # no jobs there
        p.get_job({"siteName": "SITE_B", "node": "wn-b"}, PILOT_B),
    ]
    clock.advance(5)
    out += [
        # a pilot of SITE_A naming its own site for SITE_B's job: the general path refuses
        p.update_job({"jobId": pid_b, "state": "running", "siteName": "SITE_A"}, PILOT,
                     expect="general"),
        # naming SITE_B: not the hot path either (the token is bound to SITE_A)
        p.update_job({"jobId": pid_b, "state": "running", "siteName": "SITE_B"}, PILOT,
                     expect="general"),
        # an unknown site named: the general path
        p.update_job({"jobId": pid_b, "state": "running", "siteName": "NO_SUCH_SITE"},
                     PILOT_B, expect="general"),
        p.update_job({"jobId": pid_b, "state": "running", "siteName": "SITE_B"}, PILOT_B),
    ]
    clock.advance(5)
    done = json.dumps(outputs(tb, pid_b))
    out += [
        # a final update naming the wrong site: refused (bound), applied (unbound), both by
        # the general path
        p.update_job({"jobId": pid_b, "state": "finished", "siteName": "SITE_A", "xml": done},
                     PILOT, expect="general"),
        p.update_job({"jobId": pid_b, "state": "holding", "siteName": "SITE_A"},
                     Identity("pilot-any", "pilot"), expect="general"),
        p.update_job({"jobId": pid_b, "state": "finished", "siteName": "SITE_B", "xml": done},
                     PILOT_B),
    ]
    return out


def sc_cycle(tb, p, clock):
    """test_dispatch_protocol's full cycle, with heartbeats, every progress state and both
    jobs of a task ending (the second ends the task)."""
    task_id, (a, b) = seed_jobs(tb, "SITE_A", 2)
    out = []

    def upd(pid, state, **form):
        clock.advance(7)
        out.append(p.update_job({"jobId": pid, "state": state, "siteName": "SITE_A",
                                 "attemptNr": 1, **form}))

    out.append(p.get_job({"siteName": "SITE_A", "node": "wn1", "batchID": "b1"}))
    upd(a, "starting")
    upd(a, "starting")                                        # heartbeat: no history row
    upd(a, "running", node="wn1", maxRSS="1234", unknown="ignored")   # its own node
    upd(a, "running", cpuConsumptionTime="12.5", nEvents="10", jobMetrics="a=1")
    upd(a, "transferring")
    upd(a, "holding")
    upd(a, "holding", pilotErrorDiag="still copying")
    upd(a, "finished", transExitCode="0", exeErrorCode="0", maxRSS="2345", xml=xml(
        [out_lfn(task_id, 1), f"log.{task_id}.000001.1.tgz"]))
    clock.advance(1)
    out.append(p.get_job({"siteName": "SITE_A", "node": "wn2"}))
    upd(b, "running")                                         # straight from sent
    # the second job: outputs without guid, checksum or surl; log not reported at all
    upd(b, "finished", xml=xml([out_lfn(task_id, 2)], guid=False, checksum=None, surl=False))
    clock.advance(1)
    # over: a late heartbeat is told to stop; so is one for an unknown job
    out.append(p.update_job({"jobId": a, "state": "running", "siteName": "SITE_A"},
                            expect="general"))
    out.append(p.update_job({"jobId": 10 ** 9, "state": "running", "siteName": "SITE_A"},
                            expect="general"))
    out.append(p.update_job({"jobId": b, "state": "finished", "siteName": "SITE_A",
                             "xml": xml([out_lfn(task_id, 2)])}, expect="general"))
    return out


def sc_md5_and_no_site(tb, p, clock):
    """md5 checksums, a job dispatched from sent straight to finished, and a pilot that
    names no site (the general path)."""
    task_id, (a, b) = seed_jobs(tb, "SITE_A", 2, max_attempts=1)
    out = [p.get_job({"siteName": "SITE_A", "nJobs": "2"})]
    clock.advance(60)
    out.append(p.update_job({"jobId": a, "state": "finished", "siteName": "SITE_A",
                             "xml": xml([out_lfn(task_id, 1), f"log.{task_id}.000001.1.tgz"],
                                        checksum="md5sum", fsize=False)}))
    clock.advance(60)
    out.append(p.update_job({"jobId": b, "state": "running"}, expect="general"))
    out.append(p.update_job({"jobId": b, "state": "finished",
                             "xml": xml([out_lfn(task_id, 2)])}, expect="general"))
    return out


def sc_failures(tb, p, clock):
    """Everything the hot statements refuse: the general path's answers."""
    task_id, ids = seed_jobs(tb, "SITE_A", 6, max_attempts=2)
    out = [p.get_job({"siteName": "SITE_A", "nJobs": "6", "node": "wn"})]
    for pid in ids:
        clock.advance(1)
        out.append(p.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A",
                                 "attemptNr": 1}))
    fail, missing, attempt, illegal, killed, badxml = ids

    def upd(pid, state, expect="general", **form):
        clock.advance(5)
        out.append(p.update_job({"jobId": pid, "state": state, "siteName": "SITE_A", **form},
                                expect=expect))

    upd(fail, "failed", pilotErrorCode="1301", pilotErrorDiag="boom", attemptNr=1)
    upd(missing, "finished", attemptNr=1, xml=xml([f"log.{task_id}.000002.1.tgz"]))
    upd(attempt, "running", attemptNr=2)                     # another attempt: tobekilled
    upd(attempt, "finished", attemptNr=2, xml=xml([out_lfn(task_id, 3)]))
    upd(illegal, "starting", attemptNr=1)                    # running -> starting
    tb.jobs.kill(killed, actor="alice")
    upd(killed, "running", attemptNr=1)                      # cancelled: tobekilled
    upd(killed, "finished", xml=xml([out_lfn(task_id, 5)]))
    upd(badxml, "finished", expect=None, xml="not json")
    upd(badxml, "finished", expect=None, xml=json.dumps({"f": {"fsize": "big"}}))
    upd(badxml, "activated", expect=None)
    upd(badxml, "running", expect=None, attemptNr="abc")
    # the retries of the two failed jobs run and finish on the hot path
    clock.advance(30)
    retries = p.get_job({"siteName": "SITE_A", "nJobs": "5"})
    out.append(retries)
    for spec in retries.get("jobs", []):
        upd(spec["PandaID"], "running", expect="hot", attemptNr=2)
        upd(spec["PandaID"], "finished", expect="hot", attemptNr=2,
            xml=xml(spec["outFiles"].split(",")))
    # the rest end: the two refused above finish on the hot path; the one that sent bad
    # input fails (general path) and is retried: its first attempt of two
    upd(attempt, "finished", expect="hot", attemptNr=1, xml=xml([out_lfn(task_id, 3)]))
    upd(illegal, "finished", expect="hot", xml=xml([out_lfn(task_id, 4)]))
    upd(badxml, "failed", pilotErrorCode="1137")
    return out


def sc_together(tb, p, clock):
    """Reports of many jobs arriving at once (applied in batches by the hot path), mixing
    every case: heartbeats, progress, finishes, and reports the hot statements refuse."""
    task_id, ids = seed_jobs(tb, "SITE_A", 14, max_attempts=2)
    _, (pid_b,) = seed_jobs(tb, "SITE_B", 1)
    # one retry at most in the batch (two made at once could swap their PandaIDs)
    set_jobs(tb.engine, [ids[7]], max_attempts=1)
    out = [p.get_job({"siteName": "SITE_A", "nJobs": "14", "node": "wn"}),
           p.get_job({"siteName": "SITE_B"}, PILOT_B)]
    for pid in ids[:10]:
        clock.advance(1)
        out.append(p.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A"}))
    clock.advance(1)
    out.append(p.update_job({"jobId": pid_b, "state": "running", "siteName": "SITE_B"},
                            PILOT_B))
    clock.advance(60)

    def form(i, state, **kw):
        return {"jobId": ids[i], "state": state, "siteName": "SITE_A", **kw}

    def done(i, **kw):
        return xml([out_lfn(task_id, i + 1), f"log.{task_id}.{i + 1:06d}.1.tgz"], **kw)

    unbound = Identity("pilot-b", "pilot")   # the holder's subject, not site-bound
    # job 8 reports job 6's output as well: each job's outputs count from its own report
    with_6 = json.dumps({**json.loads(done(8, checksum="md5sum")),
                         **stored([out_lfn(task_id, 7)])})
    out += p.update_together([
        # the first report of each kind may run alone, the rest go together
        (form(0, "running", nEvents="1"), PILOT, "hot"),
        (form(13, "transferring", exeErrorCode="3", exeErrorDiag="x"), PILOT, "hot"),
        (form(1, "finished", xml=done(1)), PILOT, "hot"),
        (form(12, "finished", xml=done(12, guid=False, surl=False)), PILOT, "hot"),
        (form(2, "running", maxRSS="100", nEvents="5", node="wn"), PILOT, "hot"),
        (form(3, "running", attemptNr="2"), PILOT, "general"),        # other attempt
        (form(4, "starting"), PILOT, "general"),                      # illegal
        (form(6, "finished", xml=xml([f"log.{task_id}.000007.1.tgz"])), PILOT,
         "general"),                                                  # an output missing
        (form(5, "holding", pilotErrorDiag="copying"), PILOT, "hot"),
        (form(7, "failed", pilotErrorCode="1301"), PILOT, "general"),
        (form(8, "finished", attemptNr="1", transExitCode="0", cpuConsumptionTime="3.5",
              xml=with_6), PILOT, "hot"),
        (form(9, "finished", attemptNr="2", xml=done(9)), PILOT, "general"),
        (form(10, "starting"), PILOT, "hot"),                         # sent -> starting
        (form(11, "running", batchID="b-11"), PILOT, "hot"),          # sent -> running
        (form(0, "running", nEvents="2"), PILOT, "hot"),              # job 0 again
        (form(2, "running", nEvents="6"), PILOT, "hot"),              # job 2 twice at once
        ({"jobId": pid_b, "state": "holding", "siteName": "SITE_A"}, unbound, "general"),
        ({"jobId": 10 ** 9, "state": "running", "siteName": "SITE_A"}, PILOT, "general"),
        ({"jobId": 10 ** 9, "state": "finished", "siteName": "SITE_A", "xml": done(0)},
         PILOT, "general"),
    ])
    clock.advance(60)
    # the rest end together
    out += p.update_together(
        [(form(i, "finished", xml=done(i)), PILOT, "hot")
         for i in (0, 2, 3, 4, 5, 10, 11, 13)]
        + [(form(9, "finished", xml=done(9)), PILOT, "hot")])
    return out


def sc_pending_command(tb, p, clock):
    """A command pending on a live job reaches the pilot in the heartbeat's reply; a finish
    clears it."""
    task_id, (a, b) = seed_jobs(tb, "SITE_A", 2)
    out = [p.get_job({"siteName": "SITE_A", "nJobs": "2"})]
    set_jobs(tb.engine, [a, b], command="tobekilled")
    for pid in (a, b):
        clock.advance(2)
        out.append(p.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A"}))
    clock.advance(2)
    out.append(p.update_job({"jobId": a, "state": "finished", "siteName": "SITE_A",
                             "xml": xml([out_lfn(task_id, 1)])}))
    return out


def sc_debug_mode(tb, p, clock):
    """Debug mode (issue 16): the heartbeat's reply asks for the view, the view the pilot
    sends is stored as the job's latest (bounded, known keys only); a kill wins over it."""
    _, (a, b) = seed_jobs(tb, "SITE_A", 2)
    out = [p.get_job({"siteName": "SITE_A", "nJobs": "2"})]
    tb.jobs.set_debug(a, "tail out.txt", "alice")
    tb.jobs.set_debug(b, "ls", "alice")
    set_jobs(tb.engine, [b], command="tobekilled")
    view = json.dumps({"view": "tail", "name": "out.txt", "time": 1.5, "text": "hello\n",
                       "extra": "dropped"})
    for pid in (a, b):
        clock.advance(2)
        out.append(p.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A",
                                 "debugView": view}))
    clock.advance(2)
    out.append(p.update_job({"jobId": a, "state": "running", "siteName": "SITE_A",
                             "debugView": "not json"}))
    return out


SCENARIOS = [sc_getjob_spec, sc_priority_and_fit, sc_shares, sc_stale_share_plan, sc_sites,
             sc_cycle,
             sc_md5_and_no_site, sc_failures, sc_pending_command, sc_together, sc_debug_mode]


# ---------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__[3:] for s in SCENARIOS])
def test_hot_path_gives_the_general_paths_results(env, scenario):
    replies, snap = parity(env, scenario)
    # the scenarios must mean something: a few outcomes of the hot run
    name = scenario.__name__
    if name == "sc_getjob_spec":
        assert replies[0]["StatusCode"] == 0 and replies[1]["StatusCode"] == 20
        [row] = snap["jobs"]
        assert (row["status"], row["node"], row["pilot_owner"], row["pilot_id"],
                row["batch_id"]) == ("sent", "wn1", "pilot-1", "pid-7", "b-9")
    elif name == "sc_priority_and_fit":
        big_mem, many_cores, long, labelled, versioned, by_prio = replies[7:]
        assert pids(replies[0]) == [labelled]
        assert pids(replies[1]) == [by_prio[1], by_prio[3], by_prio[2], by_prio[0]]
        assert replies[2]["StatusCode"] == 20
        assert pids(replies[3]) == [big_mem]
        assert pids(replies[4]) == [versioned, many_cores]
        assert pids(replies[5]) == [long] and replies[6]["StatusCode"] == 20
    elif name == "sc_shares":
        groups = replies[-1]
        order = [pid for r in replies[:-1] for pid in pids(r)]
        share_of = {pid: s for s, ids in groups.items() for pid in ids}
        # analysis (70 %, priority 10) before the far higher priorities of the others
        assert share_of[order[0]] == "analysis"
        assert sorted(order) == sorted(share_of)           # every job, each once
        assert share_of[order[-1]] == "analysis"           # the 30000 MB one: the last ask
    elif name == "sc_stale_share_plan":
        assert [pid for r in replies[:-1] for pid in pids(r)] == replies[-1]
        assert replies[-2]["StatusCode"] == 20
    elif name == "sc_cycle":
        assert [j["status"] for j in snap["jobs"]] == ["finished", "finished"]
        assert snap["tasks"][0]["status"] == "done"
        assert replies[-3:-1] == [{"StatusCode": 0, "command": "tobekilled"}] * 2
    elif name == "sc_failures":
        statuses = Counter(j["status"] for j in snap["jobs"])
        assert statuses["failed"] == 3 and statuses["cancelled"] == 1
    elif name == "sc_together":
        statuses = Counter(j["status"] for j in snap["jobs"])
        assert statuses == {"finished": 12, "failed": 2, "activated": 1, "holding": 1}, statuses
        assert snap["tasks"][0]["status"] == "running"
    elif name == "sc_pending_command":
        assert replies[1:3] == [{"StatusCode": 0, "command": "tobekilled"}] * 2
        assert [j["command"] for j in snap["jobs"]] == [None, "tobekilled"]
    elif name == "sc_debug_mode":
        assert replies[1] == {"StatusCode": 0, "command": "debug", "debugView": "tail out.txt"}
        assert replies[2] == {"StatusCode": 0, "command": "tobekilled"}
        a, b = snap["jobs"]
        assert json.loads(b["debug_view"]) == {"view": "tail", "name": "out.txt", "time": 1.5,
                                               "truncated": False, "text": "hello\n"}
        assert "not JSON" in json.loads(a["debug_view"])["error"]


# ---------------------------------------------------------------------- 2. the hot path is taken
def test_common_cases_take_the_hot_path_and_write_what_they_must(env, clock):
    tb = env.tb
    task_id, (a, b) = seed_jobs(tb, "SITE_A", 2)
    ok = {"StatusCode": 0, "command": "NULL"}

    def upd(pid, state, **form):
        return env.update_job({"jobId": pid, "state": state, "siteName": "SITE_A",
                               "attemptNr": 1, **form})

    # getJob: sent to this pilot, with a valid signature
    clock.advance(10)
    reply = env.get_job({"siteName": "SITE_A", "node": "wn1", "pilotID": "p1", "batchID": "b1"})
    assert reply["StatusCode"] == 0 and reply["PandaID"] == a
    spec = {k: v for k, v in reply.items() if k != "StatusCode"}
    assert spec == env.general.job_spec(job(tb, a), tb.sites.get("SITE_A")["config"])
    row = job(tb, a)
    assert (row["status"], row["node"], row["pilot_id"], row["batch_id"], row["pilot_owner"],
            row["heartbeat_time"], row["state_changed"]) == (
        "sent", "wn1", "p1", "b1", "pilot-1", T0 + dt.timedelta(seconds=10),
        T0 + dt.timedelta(seconds=10))
    assert tb.jobs.history(a)[-1]["actor"] == "pilot-1"
    sent_at = clock()

    # starting: a history row; a heartbeat in the same state: none, state_changed kept
    clock.advance(10)
    assert upd(a, "starting") == ok
    assert history(tb, a)[-1] == ("sent", "starting")
    clock.advance(10)
    with pytest.raises(ProtocolError) as refused:        # another node: not the job's pilot
        upd(a, "starting", node="wn1b")
    assert refused.value.status_code == 70 and "held by a pilot on 'wn1'" in str(refused.value)
    env.calls.clear()                                    # (refused by the general path)
    assert upd(a, "starting", node="wn1") == ok
    row = job(tb, a)
    assert history(tb, a) == [(None, "activated"), ("activated", "sent"), ("sent", "starting")]
    assert row["heartbeat_time"] == clock() and row["modification_time"] == clock()
    assert row["state_changed"] == clock() - dt.timedelta(seconds=10) and row["node"] == "wn1"
    assert row["start_time"] is None and tb.tasks.get(task_id)["status"] == "ready"

    # running: start time from starting, the task runs
    clock.advance(10)
    assert upd(a, "running", maxRSS="1234", cpuConsumptionTime="1.5") == ok
    row = job(tb, a)
    assert row["status"] == "running" and row["start_time"] == clock()
    assert (row["max_rss"], row["cpu_consumption_time"]) == (1234, 1.5)
    assert tb.tasks.get(task_id)["status"] == "running"
    assert tb.jobs.history(a)[-1]["time"] == clock()
    started = clock()
    clock.advance(10)
    assert upd(a, "running", nEvents="7") == ok                  # heartbeat
    row = job(tb, a)
    assert row["start_time"] == started and row["n_events"] == 7
    assert row["heartbeat_time"] == clock() and len(history(tb, a)) == 4

    # finished with every output: files, replicas, dataset entries, history, task
    set_jobs(tb.engine, [a], command="debug")        # a pending command the finish clears
    outs = [out_lfn(task_id, 1), f"log.{task_id}.000001.1.tgz"]
    reported = stored(outs)
    clock.advance(10)
    assert upd(a, "finished", transExitCode="0", xml=json.dumps(reported)) == ok
    row = job(tb, a)
    assert (row["status"], row["end_time"], row["command"], row["trans_exit_code"]) == (
        "finished", clock(), None, 0)
    assert history(tb, a)[-2:] == [("running", "holding"), ("holding", "finished")]
    assert [h["time"] for h in tb.jobs.history(a)[-2:]] == [clock(), clock()]
    by_lfn = {f["lfn"]: f for f in row["files"]}
    for lfn in outs:
        f, info = by_lfn[lfn], reported[lfn]
        assert (f["status"], f["guid"], f["fsize"], f["checksum"], f["ddm_endpoint"]) == (
            "ready", info["guid"], info["fsize"], "ad:" + info["adler32"], "SE_A")
    assert by_lfn[f"in.{task_id}.000001"]["status"] == "ready"
    with tb.engine.connect() as conn:
        replicas = {(r.scope, r.lfn, r.ddm_endpoint, r.surl)
                    for r in conn.execute(select(db.replicas))}
        entries = [dict(r._mapping) for r in conn.execute(select(db.dataset_files))]
    assert replicas == {("test", lfn, "SE_A", reported[lfn]["surl"]) for lfn in outs}
    [entry] = entries                                  # outputs only, not the log
    assert (entry["dataset"], entry["lfn"], entry["guid"], entry["fsize"], entry["checksum"],
            entry["task_id"]) == ("bulk.out", outs[0], reported[outs[0]]["guid"],
                                  reported[outs[0]]["fsize"], "ad:" + reported[outs[0]]["adler32"],
                                  None)
    assert tb.tasks.get(task_id)["status"] == "running"           # b is still to run

    # b: getJob, running straight from sent (start time set), finished: the task is done
    clock.advance(10)
    assert env.get_job({"siteName": "SITE_A", "nJobs": "3"})["jobs"][0]["PandaID"] == b
    clock.advance(10)
    assert upd(b, "running") == ok
    assert job(tb, b)["start_time"] == clock()
    clock.advance(10)
    assert upd(b, "finished", xml=xml([out_lfn(task_id, 2)])) == ok
    assert history(tb, b)[-3:] == [("sent", "running"), ("running", "holding"),
                                   ("holding", "finished")]
    assert tb.tasks.get(task_id)["status"] == "done"

    assert env.fallbacks() == [] and env.records.hot_failures() == []
    assert "after_job_end" in env.calls          # the last job's end updated the task
    assert started - sent_at == dt.timedelta(seconds=30)


def test_finish_straight_from_sent_and_from_transferring(env, clock):
    """A job that finishes without a progress report passes holding; one reported
    transferring passes holding too; one already holding gets one history row."""
    tb = env.tb
    task_id, ids = seed_jobs(tb, "SITE_A", 3)
    env.get_job({"siteName": "SITE_A", "nJobs": "3"})
    env.update_job({"jobId": ids[1], "state": "transferring", "siteName": "SITE_A"})
    env.update_job({"jobId": ids[2], "state": "holding", "siteName": "SITE_A"})
    clock.advance(5)
    for serial, pid in enumerate(ids, 1):
        reply = env.update_job({"jobId": pid, "state": "finished", "siteName": "SITE_A",
                                "xml": xml([out_lfn(task_id, serial)])})
        assert reply == {"StatusCode": 0, "command": "NULL"}
    assert history(tb, ids[0])[-3:] == [("activated", "sent"), ("sent", "holding"),
                                        ("holding", "finished")]
    assert history(tb, ids[1])[-3:] == [("sent", "transferring"), ("transferring", "holding"),
                                        ("holding", "finished")]
    assert history(tb, ids[2])[-2:] == [("sent", "holding"), ("holding", "finished")]
    assert all(job(tb, pid)["start_time"] is None for pid in ids)
    assert tb.tasks.get(task_id)["status"] == "done"
    assert env.fallbacks() == [] and env.records.hot_failures() == []


# ---------------------------------------------------------------------- 3. fallbacks
@pytest.fixture
def running(env, clock):
    """Jobs of SITE_A (4) and SITE_B (1), all running (max 2 attempts)."""
    tb = env.tb
    task_id, ids = seed_jobs(tb, "SITE_A", 4, max_attempts=2)
    _, (pid_b,) = seed_jobs(tb, "SITE_B", 1)
    env.get_job({"siteName": "SITE_A", "nJobs": "4"})
    env.get_job({"siteName": "SITE_B"}, PILOT_B)
    for pid in ids:
        env.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A"})
    env.update_job({"jobId": pid_b, "state": "running", "siteName": "SITE_B"}, PILOT_B)
    assert env.fallbacks() == []
    clock.advance(60)
    return task_id, ids, pid_b


def refused(env, call: str, *args, **kw) -> None:
    """The hot statement refuses (None) and changes nothing."""
    before = snapshot(env.engine)
    result = env.sync(getattr(env.hot, call)(*args, **kw))
    assert result is None, f"{call} applied: {result!r}"
    assert snapshot(env.engine) == before


def via_dispatcher(env, form, identity=PILOT):
    """updateJob through the hot dispatcher: (reply or ProtocolError code, fallbacks taken)."""
    env.calls.clear()
    try:
        reply = env.update_job(form, identity)
    except ProtocolError as exc:
        reply = exc.status_code
    return reply, env.fallbacks()


def progress_args(**kw):
    return {"actor": "pilot-1", "attempt_nr": 1, "site": "SITE_A", **kw}


def finish_args(stored_files, **kw):
    return {"actor": "pilot-1", "attempt_nr": 1, "site": "SITE_A", "endpoint": "SE_A",
            "stored": stored_files, **kw}


def test_wrong_attempt_is_told_to_stop(env, running):
    task_id, ids, _ = running
    refused(env, "progress", ids[0], "running", {}, **progress_args(attempt_nr=2))
    refused(env, "finish", ids[0], {}, **finish_args(outputs(env.tb, ids[0]), attempt_nr=2))
    for state, extra in (("running", {}), ("finished", {"xml": xml([out_lfn(task_id, 1)])})):
        reply, fell_back = via_dispatcher(env, {"jobId": ids[0], "state": state,
                                                "attemptNr": 2, "siteName": "SITE_A", **extra})
        assert reply == {"StatusCode": 0, "command": "tobekilled"} and fell_back == ["apply_update"]
    assert job(env.tb, ids[0])["status"] == "running"


def test_job_of_another_site(env, running):
    """The pilot names a site that is not the job's: the hot statement refuses; the general
    path decides by the caller's identity."""
    task_id, ids, pid_b = running
    refused(env, "progress", pid_b, "running", {}, **progress_args())
    refused(env, "finish", pid_b, {}, **finish_args(outputs(env.tb, pid_b)))
    reply, fell_back = via_dispatcher(env, {"jobId": pid_b, "state": "finished",
                                            "siteName": "SITE_A",
                                            "xml": json.dumps(outputs(env.tb, pid_b))})
    assert reply == 70 and fell_back == ["apply_update"]        # PILOT is bound to SITE_A
    # an unbound pilot (or an admin) may: the general path applies it
    unbound = Identity("pilot-b", "pilot")   # the holder's subject, not site-bound
    reply, fell_back = via_dispatcher(env, {"jobId": pid_b, "state": "holding",
                                            "siteName": "SITE_A"}, unbound)
    assert reply == {"StatusCode": 0, "command": "NULL"} and fell_back == ["apply_update"]
    assert job(env.tb, pid_b)["status"] == "holding"


def test_site_bound_token_of_another_site_is_denied(env, running):
    _, ids, pid_b = running
    before = snapshot(env.engine)
    for site in ("SITE_A", "SITE_B"):        # naming its own site, or the job's
        reply, fell_back = via_dispatcher(env, {"jobId": pid_b, "state": "running",
                                                "siteName": site}, PILOT)
        assert reply == 70 and fell_back == ["apply_update"]
    with pytest.raises(ProtocolError) as err:       # getJob at the other site
        env.get_job({"siteName": "SITE_B"}, PILOT)
    assert err.value.status_code == 70
    assert snapshot(env.engine) == before


def test_unknown_and_finished_jobs_are_told_to_stop(env, running):
    task_id, ids, _ = running
    for pid in (10 ** 9, -5):
        refused(env, "progress", pid, "running", {}, **progress_args())
        refused(env, "finish", pid, {}, **finish_args({}))
        reply, fell_back = via_dispatcher(env, {"jobId": pid, "state": "running",
                                                "siteName": "SITE_A"})
        assert reply == {"StatusCode": 0, "command": "tobekilled"} and fell_back
    outs = stored([out_lfn(task_id, 1)])
    assert env.update_job({"jobId": ids[0], "state": "finished", "siteName": "SITE_A",
                           "xml": json.dumps(outs)}) == {"StatusCode": 0, "command": "NULL"}
    refused(env, "progress", ids[0], "running", {}, **progress_args())
    refused(env, "finish", ids[0], {}, **finish_args(outs))
    for state in ("running", "finished", "holding"):
        reply, fell_back = via_dispatcher(env, {"jobId": ids[0], "state": state,
                                                "siteName": "SITE_A", "xml": json.dumps(outs)})
        assert reply == {"StatusCode": 0, "command": "tobekilled"} and fell_back
    assert history(env.tb, ids[0])[-1] == ("holding", "finished")


def test_job_not_yet_sent_is_not_touched(env, clock):
    """An activated job (not the pilot's yet): no hot statement applies; the general path
    replies NULL and changes nothing."""
    _, (pid,) = seed_jobs(env.tb, "SITE_A", 1)
    env.get_job({"siteName": "SITE_B"}, PILOT_B)        # caches nothing of SITE_A
    env.tb.sites.get_cached("SITE_A")
    refused(env, "progress", pid, "running", {}, **progress_args())
    refused(env, "finish", pid, {}, **finish_args(outputs(env.tb, pid)))
    before = snapshot(env.engine)
    for state in ("running", "finished"):
        reply, fell_back = via_dispatcher(env, {"jobId": pid, "state": state,
                                                "siteName": "SITE_A",
                                                "xml": json.dumps(outputs(env.tb, pid))})
        assert reply == {"StatusCode": 0, "command": "NULL"} and fell_back
    assert snapshot(env.engine) == before
    assert job(env.tb, pid)["status"] == "activated"


def test_illegal_transition_is_refused(env, running):
    _, ids, _ = running
    refused(env, "progress", ids[0], "starting", {}, **progress_args())
    reply, fell_back = via_dispatcher(env, {"jobId": ids[0], "state": "starting",
                                            "siteName": "SITE_A"})
    assert reply == 30 and fell_back == ["apply_update"]
    # holding -> running is not a way back either
    env.update_job({"jobId": ids[1], "state": "holding", "siteName": "SITE_A"})
    refused(env, "progress", ids[1], "running", {}, **progress_args())
    assert via_dispatcher(env, {"jobId": ids[1], "state": "running",
                                "siteName": "SITE_A"})[0] == 30
    assert [job(env.tb, p)["status"] for p in ids[:2]] == ["running", "holding"]


def test_failed_goes_to_the_general_path_and_is_retried(env, running, clock):
    task_id, ids, _ = running
    reply, fell_back = via_dispatcher(env, {
        "jobId": ids[0], "state": "failed", "siteName": "SITE_A", "attemptNr": 1,
        "pilotErrorCode": "1301", "pilotErrorDiag": "boom",
        "xml": xml([f"log.{task_id}.000001.1.tgz"])})
    assert reply == {"StatusCode": 0, "command": "NULL"} and fell_back == ["apply_update"]
    row = job(env.tb, ids[0])
    assert (row["status"], row["pilot_error_code"], row["pilot_error_diag"], row["end_time"]) == (
        "failed", 1301, "boom", clock())
    assert history(env.tb, ids[0])[-2:] == [("running", "holding"), ("holding", "failed")]
    [retry] = [j for j in env.tb.jobs.find(task_id=task_id) if j["parent_id"] == ids[0]]
    assert (retry["status"], retry["attempt_nr"]) == ("activated", 2)
    # the retry fails too: no attempt left, no third job
    env.get_job({"siteName": "SITE_A"})
    assert via_dispatcher(env, {"jobId": retry["panda_id"], "state": "failed", "attemptNr": 2,
                                "siteName": "SITE_A"})[0]["command"] == "NULL"
    assert [j["attempt_nr"] for j in env.tb.jobs.find(task_id=task_id)
            if j["serial"] == 1] == [1, 2]


def test_finished_with_a_missing_output_fails_by_the_general_path(env, running, clock):
    task_id, ids, _ = running
    log_only = stored([f"log.{task_id}.000001.1.tgz"])
    refused(env, "finish", ids[0], {"trans_exit_code": 0}, **finish_args(log_only))
    refused(env, "finish", ids[0], {}, **finish_args({}))
    # a stored file that is not one of the job's outputs does not count
    refused(env, "finish", ids[0], {}, **finish_args(stored([out_lfn(task_id, 2)])))
    reply, fell_back = via_dispatcher(env, {"jobId": ids[0], "state": "finished",
                                            "siteName": "SITE_A", "attemptNr": 1,
                                            "xml": json.dumps(log_only)})
    assert reply == {"StatusCode": 0, "command": "NULL"} and fell_back == ["apply_update"]
    row = job(env.tb, ids[0])
    assert (row["status"], row["pilot_error_code"]) == ("failed", 1165)
    assert out_lfn(task_id, 1) in row["pilot_error_diag"]
    files = {f["lfn"]: f["status"] for f in row["files"]}
    assert files[f"log.{task_id}.000001.1.tgz"] == "ready"
    assert files[out_lfn(task_id, 1)] == "defined"
    assert any(j["parent_id"] == ids[0] for j in env.tb.jobs.find(task_id=task_id))


def test_kill_reaches_the_pilot(env, running):
    task_id, ids, _ = running
    # a command pending on a live job: the hot statement returns it
    set_jobs(env.engine, [ids[0]], command="tobekilled")
    reply, fell_back = via_dispatcher(env, {"jobId": ids[0], "state": "running",
                                            "siteName": "SITE_A"})
    assert reply == {"StatusCode": 0, "command": "tobekilled"} and fell_back == []
    assert env.sync(env.hot.progress(ids[0], "running", {}, **progress_args())) == "tobekilled"
    # a job killed (cancelled at once): the general path tells the pilot
    env.tb.jobs.kill(ids[1], actor="alice")
    refused(env, "progress", ids[1], "running", {}, **progress_args())
    refused(env, "finish", ids[1], {}, **finish_args(outputs(env.tb, ids[1])))
    reply, fell_back = via_dispatcher(env, {"jobId": ids[1], "state": "running",
                                            "siteName": "SITE_A"})
    assert reply == {"StatusCode": 0, "command": "tobekilled"} and fell_back == ["apply_update"]
    assert job(env.tb, ids[1])["status"] == "cancelled"


def test_fields_the_hot_statements_leave_to_the_general_path(env, running):
    """Fields no pilot form yields (start_time, end_time, command) are refused by the hot
    statements, not written."""
    task_id, ids, _ = running
    refused(env, "progress", ids[0], "running", {"start_time": T0}, **progress_args())
    outs = stored([out_lfn(task_id, 1)])
    refused(env, "finish", ids[0], {"end_time": T0}, **finish_args(outs))
    refused(env, "finish", ids[0], {"command": "x"}, **finish_args(outs))


# ---------------------------------------------------------------------- 4. concurrency
class ConnectCounter:
    """Wraps psycopg.AsyncConnection.connect: every connection opened, and the most open at
    once (counted when one opens, which is when the number grows)."""

    def __init__(self, monkeypatch):
        self.opened: list = []
        self.most = 0
        original = psycopg.AsyncConnection.connect.__func__

        async def connect(cls, *args, **kw):
            conn = await original(cls, *args, **kw)
            self.opened.append(conn)
            self.most = max(self.most, sum(1 for c in self.opened if not c.closed))
            return conn
        monkeypatch.setattr(psycopg.AsyncConnection, "connect", classmethod(connect))

    def open_now(self) -> int:
        return sum(1 for c in self.opened if not c.closed)


def test_many_pilots_on_one_hot_path_take_each_job_once(env, monkeypatch, clock):
    """40 coroutines, a pool of 4: each of 120 jobs is dispatched once and finished; some
    pilots ask for several jobs at once; a few take the general path in the thread pool at
    the same time."""
    counter = ConnectCounter(monkeypatch)
    env.hot = HotPath(GeneralPath(env.tb, env.run), size=4)
    env.disp = env.dispatcher(env.hot, ShareChooser(env.tb))
    n_jobs, n_pilots = 120, 40
    task_id, ids = seed_jobs(env.tb, "SITE_A", n_jobs, max_attempts=1)
    got: list[int] = []
    general_got: list[int] = []
    errors: list[str] = []

    async def pilot(i: int) -> None:
        identity = Identity(f"pilot-{i}", "pilot", "SITE_A")
        while True:
            form = {"siteName": "SITE_A", "node": f"wn{i}"}
            if i % 4 == 1:
                form["nJobs"] = "3"
            if i % 10 == 9:       # the general path, in the pool, racing the hot one
                try:
                    reply = await env.general.get_job(form, identity)
                except Exception as exc:  # noqa: BLE001 - collected
                    errors.append(repr(exc))
                    return
                general_got.extend(pids(reply))
            else:
                reply = await env.disp.get_job(form, identity)
            if reply["StatusCode"] == 20:
                return
            if reply["StatusCode"] != 0:
                errors.append(f"getJob: {reply}")
                return
            specs = reply.get("jobs") or [reply]
            for spec in specs:
                got.append(spec["PandaID"])
                for state in ("running", "finished"):
                    form = {"jobId": spec["PandaID"], "state": state, "siteName": "SITE_A",
                            "attemptNr": spec["attemptNr"]}
                    if state == "finished":
                        form["xml"] = xml(spec["outFiles"].split(","))
                    answer = await env.disp.update_job(form, identity)
                    if answer != {"StatusCode": 0, "command": "NULL"}:
                        errors.append(f"updateJob {spec['PandaID']} {state}: {answer}")

    async def main():
        await asyncio.gather(*(pilot(i) for i in range(n_pilots)))
    env.sync(main())
    assert errors == []
    assert [pid for pid, n in Counter(got).items() if n > 1] == []
    assert sorted(got) == ids
    assert general_got, "the general path raced no dispatch"
    assert env.records.hot_failures() == []
    assert [c for c in env.calls if c == "apply_update"] == []   # every update was hot
    assert counter.most <= 4 and counter.opened, counter.most
    with env.engine.connect() as conn:
        sent = Counter(r[0] for r in conn.execute(select(db.job_history.c.panda_id).where(
            db.job_history.c.new_status == "sent")))
        states = dict(conn.execute(select(db.jobs.c.status, func.count())
                                   .group_by(db.jobs.c.status)).all())
        n_replicas = conn.execute(select(func.count()).select_from(db.replicas)).scalar()
    assert set(sent.values()) == {1} and len(sent) == n_jobs
    assert states == {"finished": n_jobs}
    assert n_replicas == 2 * n_jobs
    assert env.tb.tasks.get(task_id)["status"] == "done"


def test_pilots_asking_together_get_the_best_jobs_each_marked_as_theirs(env, clock):
    """getJobs that arrive together (the hot path serves pilots with the same request in one
    statement): the best jobs go out, each to one pilot, and each job's row and history name
    the pilot that got it; pilots with other limits are served by their own statement."""
    prios = [10, 80, 30, 70, 20, 60, 50, 40, 90, 5]
    _, ids = seed_jobs(env.tb, "SITE_A", 10, priorities=prios, memory_mb=1000)
    _, (big,) = seed_jobs(env.tb, "SITE_A", 1, priority=1, memory_mb=50000)
    env.disp = env.dispatcher(env.hot, ShareChooser(env.tb))
    assert env.get_job({"siteName": "SITE_A", "node": "warm"})["PandaID"] == ids[8]   # 90
    env.calls.clear()

    async def together():
        asks = [(Identity(f"pilot-{i}", "pilot", "SITE_A"),
                 {"siteName": "SITE_A", "node": f"wn{i}", "pilotID": f"p{i}",
                  "batchID": f"b{i}", **({"mem": "100000"} if i == 6 else {})})
                for i in range(7)]
        return asks, await asyncio.gather(*(env.disp.get_job(form, who) for who, form in asks))
    asks, replies = env.sync(together())
    got = {}
    for (who, form), reply in zip(asks, replies):
        assert reply["StatusCode"] == 0, reply
        row = job(env.tb, reply["PandaID"])
        assert (row["node"], row["pilot_id"], row["batch_id"], row["pilot_owner"]) == (
            form["node"], form["pilotID"], form["batchID"], who.subject)
        assert env.tb.jobs.history(reply["PandaID"])[-1]["actor"] == who.subject
        got[reply["PandaID"]] = row["current_priority"]
    # the seven best after the 90: 80 70 60 50 40 30 20 (the big one fits only one pilot,
    # and has the lowest priority)
    assert sorted(got.values(), reverse=True) == [80, 70, 60, 50, 40, 30, 20]
    assert job(env.tb, big)["status"] == "activated"
    assert env.fallbacks() == [] and env.records.hot_failures() == []


def test_pilots_of_many_sites_asking_together_share_one_statement(env, monkeypatch, clock):
    """getJobs of pilots at different sites that arrive together are served by one dispatch
    statement (a grid of many sites costs as few statements per getJob as one site): each
    pilot gets the best jobs of its own site, marked as its own. Pilots at the same site with
    other limits of the same shape are served by another statement beside it (a statement
    does not skip the rows it locked itself: two picks at one site in one statement would
    take the same jobs)."""
    sites = ["SITE_A", "SITE_B", "SITE_C", "SITE_D", "SITE_E"]
    for site in sites[2:] + ["SITE_F"]:
        add_site(env.tb, site)
    best = {}
    for site in sites:
        _, ids = seed_jobs(env.tb, site, 4, priorities=[10, 40, 20, 30], memory_mb=1000)
        best[site] = ids
    seed_jobs(env.tb, "SITE_F", 1)
    env.disp = env.dispatcher(env.hot, ShareChooser(env.tb))
    asks = [(Identity(f"pilot-{site}-{i}", "pilot", site),
             {"siteName": site, "node": f"wn-{site}-{i}", "mem": "4000"})
            for site in sites for i in range(2)]
    asks.append((Identity("pilot-big", "pilot", "SITE_A"),
                 {"siteName": "SITE_A", "node": "wn-big", "mem": "8000"}))
    statements: list[list[int]] = []          # per dispatch statement: pilots per pick
    many = env.hot._dispatch_many

    async def counted(shape, items, picks):
        statements.append([len(group) for group in picks])
        if len(statements) == 1:       # SITE_F's pilot's: held until all the others wait
            for _ in range(500):
                if sum(map(len, env.hot._dispatches._waiting.values())) == len(asks):
                    break
                await asyncio.sleep(0.01)
        return await many(shape, items, picks)
    monkeypatch.setattr(env.hot, "_dispatch_many", counted)

    async def together():
        first = asyncio.ensure_future(env.disp.get_job(
            {"siteName": "SITE_F", "node": "wn-f", "mem": "4000"},
            Identity("pilot-f", "pilot", "SITE_F")))
        while not statements:
            await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(env.disp.get_job(form, who) for who, form in asks))
        return [await first, *rest]
    replies = env.sync(together())
    assert [r["StatusCode"] for r in replies] == [0] * (len(asks) + 1), replies
    assert statements == [[1], [2] * len(sites), [1]], statements
    for (who, form), reply in zip(asks, replies[1:]):
        row = job(env.tb, reply["PandaID"])
        assert row["site"] == form["siteName"]
        assert (row["node"], row["pilot_owner"]) == (form["node"], who.subject)
        assert env.tb.jobs.history(reply["PandaID"])[-1]["actor"] == who.subject
    for site in sites:
        got = {r["PandaID"] for (_, f), r in zip(asks, replies[1:]) if f["siteName"] == site}
        # priorities 40 and 30; at SITE_A also 20 (which of its pilots gets which depends on
        # which of the two statements beside each other locks first)
        assert got == {best[site][1], best[site][3]} | (
            {best[site][2]} if site == "SITE_A" else set())
    assert env.fallbacks() == [] and env.records.hot_failures() == []


def test_pilots_of_one_site_with_other_limits_together_take_each_job_once(env, clock):
    """Twelve pilots of one site arriving together, each with another remaining walltime
    (pilots report what is left of theirs): twelve statements side by side, each job sent
    once, every pilot served."""
    _, ids = seed_jobs(env.tb, "SITE_A", 12, walltime_s=600)
    env.disp = env.dispatcher(env.hot, ShareChooser(env.tb))
    env.get_job({"siteName": "SITE_B"}, PILOT_B)              # warms the caches: no job there

    async def together():
        return await asyncio.gather(*(env.disp.get_job(
            {"siteName": "SITE_A", "node": f"wn{i}", "remainingWalltime": str(3000 + i)},
            PILOT) for i in range(12)))
    replies = env.sync(together())
    assert [r["StatusCode"] for r in replies] == [0] * 12, replies
    assert sorted(r["PandaID"] for r in replies) == ids
    assert {job(env.tb, r["PandaID"])["node"] for r in replies} == {f"wn{i}" for i in range(12)}
    assert [len(history(env.tb, pid)) for pid in ids] == [2] * 12     # seeded, then sent
    assert env.fallbacks() == [] and env.records.hot_failures() == []


def test_racing_heartbeats_and_finish_of_one_job(env, clock):
    """Heartbeats racing the final update: the job ends finished exactly once, nothing is
    written after it ended, and late heartbeats are told to stop."""
    task_id, (pid,) = seed_jobs(env.tb, "SITE_A", 1)
    env.get_job({"siteName": "SITE_A"})
    env.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A"})
    clock.advance(30)

    async def main():
        forms = [{"jobId": pid, "state": "running", "siteName": "SITE_A", "nEvents": str(i)}
                 for i in range(15)]
        forms.insert(7, {"jobId": pid, "state": "finished", "siteName": "SITE_A",
                         "xml": xml([out_lfn(task_id, 1), f"log.{task_id}.000001.1.tgz"])})
        return await asyncio.gather(*(env.disp.update_job(f, PILOT) for f in forms))
    replies = env.sync(main())
    assert replies[7] == {"StatusCode": 0, "command": "NULL"}
    assert {r["command"] for r in replies} <= {"NULL", "tobekilled"}
    assert history(env.tb, pid)[-2:] == [("running", "holding"), ("holding", "finished")]
    assert sum(1 for h in history(env.tb, pid) if h[1] == "finished") == 1
    row = job(env.tb, pid)
    assert row["status"] == "finished" and all(f["status"] == "ready" for f in row["files"])
    assert env.records.hot_failures() == []


@pytest.mark.parametrize("kind", ["progress", "finish", "getJob"])
def test_a_report_the_database_refuses_leaves_the_others_on_the_hot_path(env, clock, kind):
    """One pilot's request carries a value its column cannot hold: an error code beyond a
    32-bit INTEGER (the protocol checks 64 bits), a node name longer than its 255 characters
    (the protocol cuts at 4000). The database refuses it, on either path. The requests that
    arrive with it are not at fault: the hot path must still apply them, without a fallback
    and without a "hot path failed" warning about them."""
    task_id, ids = seed_jobs(env.tb, "SITE_A", 8)
    env.disp = env.dispatcher(env.hot, ShareChooser(env.tb))
    bad_node = "n" * 300
    if kind == "getJob":
        env.get_job({"siteName": "SITE_A"})               # warms the caches

        async def together():
            forms = [{"siteName": "SITE_A", "node": f"wn{i}"} for i in range(6)]
            forms[3]["node"] = bad_node
            return forms, await asyncio.gather(
                *(env.call(env.disp, "get_job", f, PILOT) for f in forms),
                return_exceptions=True)
    else:
        env.get_job({"siteName": "SITE_A", "nJobs": "8"})
        for pid in ids:
            env.update_job({"jobId": pid, "state": "running", "siteName": "SITE_A"})

        async def together():
            forms = [{"jobId": pid, "state": "running", "siteName": "SITE_A"} for pid in ids]
            if kind == "finish":
                for serial, f in enumerate(forms, 1):
                    f.update(state="finished", xml=xml([out_lfn(task_id, serial)]))
            forms[4]["pilotErrorCode" if kind == "progress" else "transExitCode"] = \
                str(2 ** 40)
            return forms, await asyncio.gather(
                *(env.call(env.disp, "update_job", f, PILOT) for f in forms),
                return_exceptions=True)
    env.calls.clear()
    env.ran.clear()
    env.records.messages.clear()
    forms, replies = env.sync(together())
    bad = 3 if kind == "getJob" else 4
    for i, (form, reply) in enumerate(zip(forms, replies)):
        if i == bad:
            continue
        assert isinstance(reply, dict) and reply["StatusCode"] == 0, (i, reply)
        assert not env.fell_back(form), \
            f"request {i} fell back to the general path with the refused one"
    assert len(env.records.hot_failures()) <= 1, env.records.hot_failures()   # its own


# ---------------------------------------------------------------------- 5. the connection pool
@pytest.fixture
def pool_env(db_url, monkeypatch):
    """(loop, conninfo, admin connection, connection counter) for ConnectionPool tests."""
    from sqlalchemy.engine import make_url
    info = conninfo(make_url(db_url))
    counter = ConnectCounter(monkeypatch)
    loop = asyncio.new_event_loop()
    admin = psycopg.connect(info, autocommit=True)
    yield loop, info, admin, counter
    admin.close()
    loop.close()


async def _backend_pid(pool) -> int:
    async with pool.connection() as conn:
        return conn.info.backend_pid


def test_pool_never_opens_more_than_its_size(pool_env):
    loop, info, _admin, counter = pool_env
    pool = ConnectionPool(info, 3)
    holding: list = []

    async def main():
        release = asyncio.Event()

        async def worker(i):
            async with pool.connection() as conn:
                holding.append(conn)
                await release.wait()
                cur = await conn.execute("SELECT %s::int", (i,))
                assert (await cur.fetchone())[0] == i
                holding.remove(conn)
            return i

        tasks = [asyncio.ensure_future(worker(i)) for i in range(12)]
        while len(holding) < 3:                     # three get a connection ...
            await asyncio.wait(tasks, timeout=0.01)
            assert not any(t.done() for t in tasks)
        for _ in range(20):                          # ... and the others wait for one
            await asyncio.sleep(0)
        assert len(holding) == 3 and counter.open_now() == 3
        release.set()
        assert sorted(await asyncio.wait_for(asyncio.gather(*tasks), 30)) == list(range(12))
        await pool.close()
    loop.run_until_complete(main())
    assert counter.most == 3 and len(counter.opened) == 3      # reused, none beyond the size
    assert counter.open_now() == 0


def test_pool_drops_a_broken_connection(pool_env):
    loop, info, admin, counter = pool_env
    pool = ConnectionPool(info, 1)

    async def main():
        pid = await _backend_pid(pool)
        with pytest.raises(psycopg.OperationalError):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid          # the idle one is reused
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await conn.execute("SELECT 1")
        # size 1: the next request only gets a connection if the broken one's slot was freed
        new_pid = await asyncio.wait_for(_backend_pid(pool), 30)
        assert new_pid != pid
        async with pool.connection() as conn:
            assert (await (await conn.execute("SELECT 42")).fetchone())[0] == 42
        await pool.close()
    loop.run_until_complete(main())
    assert len(counter.opened) == 2 and counter.open_now() == 0


def test_pool_keeps_a_connection_after_a_database_error(pool_env):
    loop, info, _admin, counter = pool_env
    pool = ConnectionPool(info, 1)

    async def main():
        pid = await _backend_pid(pool)
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with pool.connection() as conn:
                await conn.execute("SELECT * FROM no_such_table")
        insert = ("INSERT INTO replicas (scope, lfn, ddm_endpoint, created) "
                  "VALUES ('s', 'f', 'SE', now())")
        async with pool.connection() as conn:
            await conn.execute(insert)
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with pool.connection() as conn:
                await conn.execute(insert)
        # the same connection, usable, not in a failed transaction (autocommit)
        async with pool.connection() as conn:
            assert conn.info.backend_pid == pid
            cur = await conn.execute("SELECT count(*) FROM replicas")
            assert (await cur.fetchone())[0] == 1
        await pool.close()
    loop.run_until_complete(main())
    assert len(counter.opened) == 1


def test_pool_drops_a_connection_left_by_other_errors_and_cancellation(pool_env):
    """A non-database exception in the request, or a request cancelled while its statement
    runs (waiting here for a lock another session holds), may leave the connection in an
    unknown state: it is closed, its slot freed. A request cancelled while it waits for a
    connection frees nothing it did not have."""
    loop, info, admin, counter = pool_env
    pool = ConnectionPool(info, 1)

    async def main():
        pid = await _backend_pid(pool)
        with pytest.raises(ValueError):
            async with pool.connection():
                raise ValueError("not the database's")
        pid2 = await asyncio.wait_for(_backend_pid(pool), 30)
        assert pid2 != pid

        admin.execute("SELECT pg_advisory_lock(4711)")
        blocked = asyncio.ensure_future(_locked(pool))
        waiter = asyncio.ensure_future(_backend_pid(pool))      # waits for the one slot
        while not _waits_for_lock(admin, pid2):
            await asyncio.wait([blocked], timeout=0.01)
        await asyncio.sleep(0)
        assert not waiter.done()
        waiter.cancel()
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        admin.execute("SELECT pg_advisory_unlock(4711)")
        pid3 = await asyncio.wait_for(_backend_pid(pool), 30)
        assert pid3 != pid2
        async with pool.connection() as conn:
            assert (await (await conn.execute("SELECT 1")).fetchone())[0] == 1
        await pool.close()
    loop.run_until_complete(main())
    assert counter.open_now() == 0 or _wait_closed(loop, counter)


async def _locked(pool):
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock(4711)")


def _waits_for_lock(admin, pid: int) -> bool:
    return admin.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                         (pid,)).fetchone()[0] > 0


def _wait_closed(loop, counter) -> bool:
    """Connections dropped by the pool close in a task of their own: let them finish."""
    loop.run_until_complete(asyncio.sleep(0))
    pending = asyncio.all_tasks(loop)
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=10))
    return counter.open_now() == 0


def test_hot_path_pools_per_event_loop_are_closed(env, monkeypatch):
    """One pool per event loop; ``close`` on a loop closes that loop's connections."""
    counter = ConnectCounter(monkeypatch)
    _, ids = seed_jobs(env.tb, "SITE_A", 2)
    params = env.tb.jobs.dispatch_params("SITE_A")
    who = {"node": "wn", "actor": "pilot-1", "pilot_id": None, "batch_id": None}
    first = env.sync(env.hot.dispatch(params, **who))
    other = asyncio.new_event_loop()
    try:
        second = other.run_until_complete(env.hot.dispatch(params, **who))
        assert counter.open_now() == 2                     # one per loop
        other.run_until_complete(env.hot.close())
        assert counter.open_now() == 1
    finally:
        other.close()
    assert [first["panda_id"], second["panda_id"]] == ids
    assert env.sync(env.hot.dispatch(params, **who)) is None
    env.sync(env.hot.close())
    assert counter.open_now() == 0


# ---------------------------------------------------------------------- 6. over HTTP
# Loaded by the server subprocess at start (sitecustomize on its PYTHONPATH): notes in a file
# whether the hot path is on and every call of the dispatcher's general path, so the test
# sees which requests fell back without reading the SQL the hot path sends.
_PATH_NOTES = """
import sys
sys.path.insert(0, {repo!r})
import server.app
import server.dispatchpath

_notes = open({notes!r}, "a", buffering=1)


def _general(name):
    original = getattr(server.dispatchpath.GeneralPath, name)

    def general(self, req, *args, **kw):
        _notes.write(f"{{name}} {{getattr(req, 'panda_id', '-')}} "
                     f"{{getattr(req, 'state', '-')}}\\n")
        return original(self, req, *args, **kw)
    setattr(server.dispatchpath.GeneralPath, name, general)


_general("take_job")
_general("apply_update")
_build_state = server.app.build_state


def build_state(*args, **kw):
    state = _build_state(*args, **kw)
    hot = type(state.dispatcher.path).__name__ == "HotPath"
    _notes.write(f"hot path {{'on' if hot else 'off'}}\\n")
    return state


server.app.build_state = build_state
"""


def test_full_cycle_over_http_with_the_hot_path(taskbuffer, tmp_path):
    from testkit import REPO
    tb = taskbuffer
    add_site(tb, "SITE_A")
    task_id, ids = seed_jobs(tb, "SITE_A", 3, max_attempts=2)
    url = tb.engine.url.render_as_string(hide_password=False)
    hook = tmp_path / "hook"
    hook.mkdir()
    notes = tmp_path / "notes.txt"
    (hook / "sitecustomize.py").write_text(_PATH_NOTES.format(repo=str(REPO),
                                                              notes=str(notes)))
    server = start_server(tmp_path / "srv", db_url=url,
                          extra=["--threads", "4", "--watcher-interval", "0",
                                 "--archive-interval", "0"],
                          env={"PYTHONPATH": str(hook)})
    try:
        s = requests.Session()
        s.headers.update({"Accept": "application/json", "Authorization":
                          f"Bearer {server.token('pilot', 'pilot-h', site='SITE_A')}"})

        def call(method, **data):
            r = s.post(f"{server.url}/server/panda/{method}", data=data, timeout=30)
            r.raise_for_status()
            return r.json()

        ok = {"StatusCode": 0, "command": "NULL"}
        first = call("getJob", siteName="SITE_A", node="wn1", mem="4000")
        assert first["StatusCode"] == 0 and first["PandaID"] == ids[0]
        many = call("getJob", siteName="SITE_A", node="wn2", nJobs="5")
        assert [j["PandaID"] for j in many["jobs"]] == ids[1:]
        assert call("getJob", siteName="SITE_A")["StatusCode"] == 20
        pid = first["PandaID"]
        for state, extra in (("starting", {}), ("running", {"maxRSS": 99}), ("running", {}),
                             ("finished", {"transExitCode": 0,
                                           "xml": xml(first["outFiles"].split(","))})):
            assert call("updateJob", jobId=pid, state=state, siteName="SITE_A", attemptNr=1,
                        **extra) == ok
        # over: told to stop (the general path)
        assert call("updateJob", jobId=pid, state="running", siteName="SITE_A") == \
            {"StatusCode": 0, "command": "tobekilled"}
        # the second job fails (the general path, retried); the third finishes from sent
        second, third = many["jobs"]
        assert call("updateJob", jobId=second["PandaID"], state="failed", siteName="SITE_A",
                    pilotErrorCode=1301) == ok
        assert call("updateJob", jobId=third["PandaID"], state="finished", siteName="SITE_A",
                    xml=xml(third["outFiles"].split(","))) == ok
        retry = call("getJob", siteName="SITE_A")
        assert retry["attemptNr"] == 2
        assert call("updateJob", jobId=retry["PandaID"], state="finished", siteName="SITE_A",
                    attemptNr=2, xml=xml(retry["outFiles"].split(","))) == ok
        # a text reply (no JSON asked) too
        plain = requests.post(f"{server.url}/server/panda/getJob", data={"siteName": "SITE_A"},
                              headers={"Authorization": s.headers["Authorization"]},
                              timeout=30)
        assert "StatusCode=20" in plain.text
    finally:
        stop_server(server)
    log = server.log()
    assert HOT_FAILED not in log, log
    assert "Traceback" not in log, log
    assert notes.read_text().splitlines() == [
        "hot path on",
        f"apply_update {pid} running",                    # after the end: tobekilled
        f"apply_update {second['PandaID']} failed",
    ]
    rows = {j["panda_id"]: j for j in tb.jobs.find(task_id=task_id)}
    assert [rows[p]["status"] for p in ids] == ["finished", "failed", "finished"]
    assert rows[retry["PandaID"]]["status"] == "finished"
    assert rows[pid]["max_rss"] == 99 and rows[pid]["start_time"] is not None
    assert history(tb, pid) == [(None, "activated"), ("activated", "sent"),
                                ("sent", "starting"), ("starting", "running"),
                                ("running", "holding"), ("holding", "finished")]
    assert all(f["status"] == "ready" for f in tb.jobs.get(pid)["files"])
    assert tb.tasks.get(task_id)["status"] == "done"


def test_hot_updates_take_ended_jobs_off_the_cached_share_usage(env):
    """The hot statements report the share and cores of a job they take out of the running
    states (progress to holding, finished), as the general path does: the chooser's cached
    grid-wide usage follows the cores in use between two snapshots."""
    ShareStore(env.tb).save(parse_shares([{"name": "y", "value": 50},
                                          {"name": "x", "value": 50}]))
    _, ids = seed_jobs(env.tb, "SITE_A", 20)
    set_jobs(env.tb.engine, ids[:10], share="x")
    set_jobs(env.tb.engine, ids[10:], share="y")
    env.disp = env.dispatcher(env.hot, ShareChooser(env.tb, ttl_s=3600))
    specs = {}
    for _ in range(10):
        spec = env.get_job({"siteName": "SITE_A"})
        specs[spec["PandaID"]] = spec
    mine = {s: [p for p in specs if p in (ids[:10] if s == "x" else ids[10:])] for s in "xy"}
    assert [len(mine["x"]), len(mine["y"])] == [5, 5]
    chooser = env.disp.job_chooser
    assert chooser.share_plan("SITE_A")[0] == "y"            # a tie: the configured order
    env.calls.clear()

    def report(pid, state):
        form = {"jobId": pid, "state": state, "siteName": "SITE_A", "attemptNr": 1}
        if state == "finished":
            form["xml"] = xml(specs[pid]["outFiles"].split(","))
        assert env.update_job(form) == {"StatusCode": 0, "command": "NULL"}
    for pid in mine["x"][:2]:
        report(pid, "running")
    assert chooser.share_plan("SITE_A")[0] == "y"
    report(mine["x"][0], "holding")
    report(mine["x"][1], "finished")
    assert env.fallbacks() == []                              # every update was hot
    assert chooser.share_plan("SITE_A")[0] == "x"            # x 3 cores, y 5
    assert ShareChooser(env.tb, ttl_s=0).grid_running() == {"x": 3, "y": 5}
