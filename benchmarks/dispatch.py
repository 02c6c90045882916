"""Dispatch throughput of the server on PostgreSQL, against a bare Tornado hello-world.

One run, same machine, same client:
  1. hello:  a bare Tornado app (same number of processes as the server) answering a form POST
     with a small JSON object; requests/s is the ceiling of this client and HTTP stack.
  2. cycles: full job cycles on 10,000 activated jobs: getJob, updateJob running, updateJob
     finished with the stored output files, as PanDA's pilot does.
  3. getJob: pilots only ask for jobs (``getJob``), draining the rest of the activated jobs.
The client is a separate process (asyncio, one keep-alive connection per simulated pilot,
raw HTTP/1.1, so that it costs little CPU beside the server and the database). The database is
a fresh PostgreSQL database, dropped afterwards. Targets on a 2-core machine: >= 460 cycles/s
and getJob >= 0.4x hello.

    python benchmarks/dispatch.py [--quick] [--jobs N] [--pilots N] [--processes N]

Prints jobs/s, requests/s, p50/p99 latency and the ratios; the last line is one JSON object
with jobs_per_s, getjob_req_per_s, hello_req_per_s, getjob_ratio_vs_hello, p99_ms.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PG_ADMIN = os.environ.get("PANDA_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
SITE = "BENCH_SITE"
SE_URL = "file:///nonexistent"

from panda_core.replicas import replica_url  # noqa: E402 - after the path insert above


# ---------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with every worker it forked."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
            time.sleep(0.2)          # forked workers leave after their parent
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name (state, ppid, ...); [] when it is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its direct children (forked server workers)."""
    kids = [pid] + [int(p) for p in os.listdir("/proc")
                    if p.isdigit() and _stat(p)[1:2] == [str(pid)]]
    return sum(_cpu_s(p) for p in kids)


@contextlib.contextmanager
def admin_connection():
    """An autocommit connection to the PostgreSQL server's ``postgres`` database."""
    from sqlalchemy import create_engine
    admin = create_engine(PG_ADMIN + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            yield conn
    finally:
        admin.dispose()


def cpu_snapshot(server: subprocess.Popen, url: str) -> dict[str, float]:
    """CPU seconds used so far by the server's processes and by the database's backends of
    the benchmark database: CPU per cycle moves less with other load on the machine than
    wall-clock rates do."""
    from sqlalchemy import text
    name = url.rsplit("/", 1)[1]
    with admin_connection() as conn:
        backends = list(conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :n "
                                          "AND pid <> pg_backend_pid()"), {"n": name}).scalars())
    return {"server": process_tree_cpu(server.pid),
            **{f"pg{p}": _cpu_s(p) for p in backends}}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(server, database) CPU seconds between two snapshots."""
    pg = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("pg"))
    return after["server"] - before["server"], pg


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------------- database
def create_db() -> str:
    from sqlalchemy import text
    name = f"panda_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin_connection() as conn:
        # databases of earlier runs that were killed before they could drop them
        for old in conn.execute(text("SELECT datname FROM pg_database "
                                     "WHERE datname LIKE 'panda_bench_%'")).scalars():
            pid = old.split("_")[2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return f"{PG_ADMIN}/{name}"


def drop_db(url: str) -> None:
    from sqlalchemy import text
    with admin_connection() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))


def seed(url: str, n_jobs: int) -> None:
    """Schema, one site, one task with ``n_jobs`` activated jobs (input, output, log file)."""
    from sqlalchemy import insert, select

    from server import db
    from server.taskbuffer import TaskBuffer, utcnow

    engine = db.make_engine(url, pool_size=1)
    db.upgrade_schema(engine)
    tb = TaskBuffer(engine)
    se = {"name": "BENCH_SE", "url": SE_URL}
    tb.sites.sync([{"name": SITE, "status": "online", "resources": {"cores": 8},
                    "storage": {"input": se, "output": se}}])
    now = utcnow()
    with engine.begin() as conn:
        task_id = tb.tasks.insert(conn, name="bench", owner="bench", params={"name": "bench"},
                                 priority=1000, share="production", site=SITE, max_attempts=1)
        tb.tasks.set_status(conn, task_id, "ready")
        conn.execute(insert(db.jobs), [{
            "task_id": task_id, "serial": i, "attempt_nr": 1, "max_attempts": 1,
            "status": "activated", "site": SITE, "owner": "bench",
            "prod_source_label": "managed", "share": "production", "priority": 1000,
            "current_priority": 1000, "transformation": "/bin/true", "job_pars": "",
            "cores": 1, "memory_mb": 1000, "walltime_s": 600, "disk_mb": 100,
            "creation_time": now, "modification_time": now, "state_changed": now,
            "pilot_error_code": 0, "exe_error_code": 0, "dispatcher_error_code": 0,
            "task_buffer_error_code": 0} for i in range(1, n_jobs + 1)])
        ids = [r[0] for r in conn.execute(select(db.jobs.c.panda_id).order_by(db.jobs.c.serial))]
        conn.execute(insert(db.job_history), [
            {"panda_id": p, "old_status": None, "new_status": "activated", "time": now,
             "actor": "bench"} for p in ids])
        files = []
        for n, p in enumerate(ids, 1):
            for ftype, lfn, status in (("input", f"in.{n:06d}", "ready"),
                                       ("output", f"out.{n:06d}", "defined"),
                                       ("log", f"log.{n:06d}.tgz", "defined")):
                files.append({"panda_id": p, "task_id": task_id, "type": ftype, "scope": "bench",
                              "lfn": lfn, "dataset": "bench.data", "guid": str(uuid.uuid4()),
                              "fsize": 10 if ftype == "input" else None,
                              "checksum": "ad:00000001" if ftype == "input" else None,
                              "status": status, "ddm_endpoint": None})
        conn.execute(insert(db.files), files)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


def set_async_commit(url: str) -> None:
    from sqlalchemy import text
    with admin_connection() as conn:
        conn.execute(text(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" '
                          "SET synchronous_commit = off"))


def count_states(url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from server import db
    engine = db.make_engine(url, pool_size=1)
    with engine.connect() as conn:
        out = dict(conn.execute(select(db.jobs.c.status, func.count())
                                .group_by(db.jobs.c.status)).all())
        sent = conn.execute(select(db.job_history.c.panda_id, func.count())
                            .where(db.job_history.c.new_status == "sent")
                            .group_by(db.job_history.c.panda_id)
                            .having(func.count() > 1)).all()
    engine.dispose()
    out["_dispatched_twice"] = len(sent)
    return out


# ---------------------------------------------------------------------- hello world
HELLO = """
import sys, tornado.web, tornado.httpserver, tornado.netutil, tornado.process
from tornado.ioloop import IOLoop
class Hello(tornado.web.RequestHandler):
    def post(self, method):
        self.set_header("Content-Type", "application/json")
        self.finish('{"StatusCode": 20, "errorDialog": "no jobs"}')
# like the server: with several processes each listens on its own socket (SO_REUSEPORT), so the
# kernel spreads the connections and the baseline is not one busy process beside an idle one
if int(sys.argv[2]) > 1:
    tornado.process.fork_processes(int(sys.argv[2]))
socks = tornado.netutil.bind_sockets(int(sys.argv[1]), address="127.0.0.1", reuse_port=True)
srv = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/server/panda/(\\w+)", Hello)]))
srv.add_sockets(socks)
IOLoop.current().start()
"""


# ---------------------------------------------------------------------- the client
class Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol."""

    def __init__(self, port: int, token: str):
        self.port = port
        self.head = ("Host: 127.0.0.1\r\nAccept: application/json\r\n"
                     "Content-Type: application/x-www-form-urlencoded\r\n"
                     f"Authorization: Bearer {token}\r\n")
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, method: str, form: dict) -> dict:
        body = urllib.parse.urlencode(form).encode()
        self.writer.write(f"POST /server/panda/{method} HTTP/1.1\r\n{self.head}"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length)
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{method}: {status.decode().strip()} {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


async def _phase(mode: str, port: int, token: str, pilots: int, limit: int) -> dict:
    lat: dict[str, list[float]] = {"getJob": [], "updateJob": [], "hello": []}
    done = {"jobs": 0, "requests": 0, "errors": 0}
    conns = [Conn(port, token) for _ in range(pilots)]
    await asyncio.gather(*(c.open() for c in conns))
    form = {"siteName": SITE, "node": "bench-wn", "prodSourceLabel": "managed",
            "computingElement": "ce", "cpu": "2000", "mem": "4000", "diskSpace": "20000",
            "workingGroup": "", "jobType": "managed", "resourceType": "SCORE"}
    tp = time.perf_counter

    async def worker(c: Conn) -> None:
        while True:
            if mode == "hello":
                if done["requests"] >= limit:
                    return
                done["requests"] += 1
                t = tp()
                await c.post("getJob", form)
                lat["hello"].append(tp() - t)
                continue
            t = tp()
            job = await c.post("getJob", form)
            lat["getJob"].append(tp() - t)
            done["requests"] += 1
            if job.get("StatusCode") == 20:
                return
            if job.get("StatusCode") != 0:
                done["errors"] += 1
                return
            done["jobs"] += 1
            last = limit and done["jobs"] >= limit
            if mode == "getjob":
                if last:
                    return
                continue
            pid, attempt = job["PandaID"], job["attemptNr"]
            t = tp()
            r = await c.post("updateJob", {"jobId": pid, "state": "running", "attemptNr": attempt,
                                           "siteName": SITE, "node": "bench-wn"})
            lat["updateJob"].append(tp() - t)
            lfns = job["outFiles"].split(",")
            scopes = job["scopeOut"].split(",")[:len(lfns) - 1] + [job["scopeLog"]]
            stored = {lfn: {"guid": str(uuid.uuid4()), "fsize": 100,
                            "adler32": f"{zlib.adler32(lfn.encode()):08x}",
                            "surl": replica_url(SE_URL, scope, lfn)}   # where the server wants it
                      for lfn, scope in zip(lfns, scopes)}
            t = tp()
            r2 = await c.post("updateJob", {
                "jobId": pid, "state": "finished", "attemptNr": attempt, "siteName": SITE,
                "transExitCode": 0, "pilotErrorCode": 0, "cpuConsumptionTime": 1,
                "xml": json.dumps(stored)})
            lat["updateJob"].append(tp() - t)
            done["requests"] += 2
            if r.get("StatusCode") != 0 or r2.get("StatusCode") != 0:
                done["errors"] += 1
            if last:
                return

    t0 = tp()
    await asyncio.gather(*(worker(c) for c in conns))
    took = tp() - t0
    for c in conns:
        c.close()
    return {"took": took, **done, "lat": lat}


def _client_main(args: tuple, queue) -> None:
    queue.put(asyncio.run(_phase(*args)))


def run_phase(mode: str, port: int, token: str, pilots: int, limit: int = 0) -> dict:
    """Run one load phase in a separate client process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_main, args=((mode, port, token, pilots, limit), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def summarize(name: str, res: dict, keys: list[str]) -> tuple[float, float, float]:
    lat = [x for k in keys for x in res["lat"][k]]
    rps = res["requests"] / res["took"]
    p50, p99 = pct(lat, 0.50) * 1000, pct(lat, 0.99) * 1000
    print(f"{name:8s} {res['requests']:7d} requests in {res['took']:6.2f} s: {rps:7.0f} req/s, "
          f"p50 {p50:6.1f} ms, p99 {p99:6.1f} ms"
          + (f", {res['jobs'] / res['took']:6.0f} jobs/s" if res["jobs"] else "")
          + (f", {res['errors']} errors" if res["errors"] else ""), flush=True)
    return rps, p50, p99


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller load, under a minute")
    ap.add_argument("--jobs", type=int, help="jobs for full cycles (default 10000, quick 2000)")
    ap.add_argument("--getjob-jobs", type=int, help="jobs for the getJob phase (default 5000, "
                    "quick 3000: a shorter phase weighs its start and end too much)")
    ap.add_argument("--pilots", type=int, default=50, help="concurrent simulated pilots")
    ap.add_argument("--processes", type=int, default=2, help="server processes")
    ap.add_argument("--threads", type=int, default=16, help="database threads per process")
    ap.add_argument("--async-commit", action="store_true",
                    help="ALTER DATABASE ... SET synchronous_commit = off for the benchmark's "
                    "database (commits stop waiting for the WAL flush; shows what the disk's "
                    "fsync latency costs)")
    args = ap.parse_args()
    n_cycles = args.jobs or (2000 if args.quick else 10000)
    n_getjob = args.getjob_jobs or (3000 if args.quick else 5000)
    n_hello = 3 * n_getjob

    tmp = Path(tempfile.mkdtemp(prefix="panda-bench-"))
    url = create_db()
    procs: list[subprocess.Popen] = []
    try:
        t = time.perf_counter()
        seed(url, n_getjob + n_cycles)
        if args.async_commit:
            set_async_commit(url)
        print(f"seeded {n_getjob + n_cycles} activated jobs in {time.perf_counter() - t:.1f} s "
              f"(PostgreSQL, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})", flush=True)

        hello_port = free_port()
        hello = subprocess.Popen([sys.executable, "-c", HELLO, str(hello_port),
                                  str(args.processes)], start_new_session=True)
        procs.append(hello)
        wait_port(hello_port, hello)
        run_phase("hello", hello_port, "x", args.pilots, 500)          # warm-up
        hello_cpu0 = process_tree_cpu(hello.pid)
        res_hello = run_phase("hello", hello_port, "x", args.pilots, n_hello)
        hello_ms = (process_tree_cpu(hello.pid) - hello_cpu0) * 1000 / res_hello["requests"]
        stop(hello)
        hello_rps, _, _ = summarize("hello", res_hello, ["hello"])
        print(f"  CPU per hello request: server {hello_ms:.3f} ms")

        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(tmp / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "panda_wms.cli", "server", "--db", url, "--port", str(port),
             "--host", "127.0.0.1", "--key-dir", str(tmp / "keys"),
             "--processes", str(args.processes), "--threads", str(args.threads),
             "--archive-interval", "0", "--watcher-interval", "0", "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(server)
        wait_port(port, server)
        token = subprocess.run(
            [sys.executable, "-m", "panda_wms.cli", "token", "issue", "--key-dir",
             str(tmp / "keys"), "--role", "pilot", "--subject", "bench-pilot", "--site", SITE],
            check=True, capture_output=True, text=True, env=env).stdout.strip()

        # cycles first (the server's pools and prepared statements warm up), then getJob alone
        cpu0 = cpu_snapshot(server, url)
        res_cyc = run_phase("cycles", port, token, args.pilots, n_cycles)
        srv_cpu, pg_cpu = cpu_delta(cpu0, cpu_snapshot(server, url))
        cyc_rps, p50, p99 = summarize("cycles", res_cyc, ["getJob", "updateJob"])
        srv_ms = srv_cpu * 1000 / max(1, res_cyc["jobs"])
        pg_ms = pg_cpu * 1000 / max(1, res_cyc["jobs"])
        print(f"  CPU per cycle: server {srv_ms:.2f} ms, PostgreSQL backends {pg_ms:.2f} ms "
              "(less sensitive to other load than the rates)")
        cpu1 = cpu_snapshot(server, url)
        res_get = run_phase("getjob", port, token, args.pilots)
        get_srv, get_pg = cpu_delta(cpu1, cpu_snapshot(server, url))
        getjob_rps, _, _ = summarize("getJob", res_get, ["getJob"])
        get_srv_ms = get_srv * 1000 / max(1, res_get["requests"])
        get_pg_ms = get_pg * 1000 / max(1, res_get["requests"])
        print(f"  CPU per getJob: server {get_srv_ms:.3f} ms, PostgreSQL backends "
              f"{get_pg_ms:.3f} ms")
        stop(server)
        jobs_per_s = res_cyc["jobs"] / res_cyc["took"]
        for name, key in (("getJob", "getJob"), ("updateJob", "updateJob")):
            lat = res_cyc["lat"][key]
            print(f"  in cycles, {name:9s}: p50 {pct(lat, .5) * 1000:6.1f} ms, "
                  f"p99 {pct(lat, .99) * 1000:6.1f} ms, "
                  f"mean {statistics.fmean(lat or [0]) * 1000:6.1f} ms")
        states = count_states(url)
        # pilots in flight when the getJob phase reached its count take a few more jobs
        ok = (states.get("finished", 0) + states.get("sent", 0) == n_cycles + n_getjob
              and states.get("finished") == res_cyc["jobs"]
              and states.get("sent") == res_get["jobs"] and states["_dispatched_twice"] == 0
              and res_cyc["errors"] == 0 and res_get["errors"] == 0)
        print(f"final states: {states} -> {'consistent' if ok else 'INCONSISTENT'}")
        print(f"cycles: {jobs_per_s:.0f} jobs/s (target >= 460); getJob {getjob_rps:.0f} req/s = "
              f"{getjob_rps / hello_rps:.2f}x hello {hello_rps:.0f} req/s (target >= 0.4)")
        print(json.dumps({
            "jobs_per_s": round(jobs_per_s, 1), "cycle_req_per_s": round(cyc_rps, 1),
            "getjob_req_per_s": round(getjob_rps, 1), "hello_req_per_s": round(hello_rps, 1),
            "getjob_ratio_vs_hello": round(getjob_rps / hello_rps, 3),
            "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
            "server_cpu_ms_per_cycle": round(srv_ms, 3), "db_cpu_ms_per_cycle": round(pg_ms, 3),
            "server_cpu_ms_per_getjob": round(get_srv_ms, 3),
            "db_cpu_ms_per_getjob": round(get_pg_ms, 3),
            "server_cpu_ms_per_hello": round(hello_ms, 3),
            "jobs": n_cycles,
            "pilots": args.pilots, "server_processes": args.processes,
            "synchronous_commit": "off" if args.async_commit else "on",
            "consistent": ok, "load_avg": round(os.getloadavg()[0], 2)}))
        return 0 if ok else 1
    finally:
        for p in procs:
            stop(p)
        drop_db(url)


if __name__ == "__main__":
    sys.exit(main())
