"""One simulation: a fresh database, the real server on it, the workload's sites and pilots.

The server is ``panda server`` itself (a subprocess, ``--processes`` as asked) on SQLite,
PostgreSQL or MariaDB; tasks are submitted through its API, so its brokerage places them;
the pilots (``pilots.SimPilots``) speak the pilot protocol over HTTP. Meanwhile the job
counters are sampled for share usage. At the end ``report.build_report`` reads the outcome
from the database.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from panda_core.replicas import replica_path
from panda_core.states import FINAL_JOB_STATES

from .. import db
from ..taskbuffer import TaskBuffer
from .pilots import SimPilots
from .workload import SimSite, SimTask, Workload

log = logging.getLogger(__name__)

FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)
PROGRESS_EVERY_S = 5.0
#: real seconds a task's submission may take (queued behind others, its jobs made in batches)
SUBMIT_TIMEOUT_S = 3600.0


class SimulationError(RuntimeError):
    """The simulation could not run (database not empty, server did not start, ...)."""


@dataclass
class Sample:
    """The counters at one moment: simulated seconds, and per share running cores and
    activated jobs."""
    t: float
    running: dict[str, int]
    waiting: dict[str, int]
    ended: int
    live: int = 0                      # jobs not in a final state


@dataclass
class RunData:
    """What the run leaves for the report."""
    workload: Workload
    task_ids: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    completed: bool = False
    pilot_errors: list[str] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)
    dispatched: int = 0


def site_config(site: SimSite, se_root: Path) -> dict:
    """A site config (the shape of ``site_configs.SiteConfig.to_dict``) for a simulated site,
    its storage a folder of its own (``se_root`` may be relative: the URL is absolute)."""
    url = (se_root / site.name).resolve().as_uri()
    return {
        "name": site.name, "region": "simulated", "status": "online",
        "resources": {"cores": site.cores, "memory_mb": site.memory_mb,
                      "max_walltime_s": 7 * 86400, "max_disk_mb": 10**6},
        "scheduler": {"backend": "local", "options": {}},
        "pilots": {"max_queued": site.slots, "max_running": site.slots, "rate_per_minute": 60,
                   "walltime_s": 7 * 86400},
        "storage": {"input": {"name": f"SE_{site.name}", "url": url},
                    "output": {"name": f"SE_{site.name}", "url": url}},
        "copytools": {"input": {"name": "cp", "options": {}},
                      "output": {"name": "cp", "options": {}}},
        "direct_read": False, "transfer": {"timeout_s": 60, "retries": 1},
        "limits": {"looping_s": 7 * 86400, "min_free_disk_mb": 0, "max_workdir_mb": 10**6,
                   "heartbeat_s": 7 * 86400},
    }


def prepare_database(tb: TaskBuffer, w: Workload, work: Path) -> None:
    """Schema, sites, shares and input datasets; refuses a database that already has jobs."""
    db.upgrade_schema(tb.engine)
    with db.read(tb.engine) as conn:
        n = conn.execute(select(func.count()).select_from(db.jobs)).scalar_one()
    if n:
        raise SimulationError(f"the database already holds {n} job(s): a simulation needs an "
                              "empty one (it would mix its jobs with them)")
    se_root = work / "storage"
    tb.sites.sync([site_config(s, se_root) for s in w.sites])
    if w.shares is not None:
        from ..shares import ShareStore, parse_shares
        ShareStore(tb).save(parse_shares(w.shares))
    for t in w.tasks:
        if t.inputs is None:
            continue
        files = []
        for i in range(t.inputs.files):
            lfn = f"{t.name}.in.{i:06d}"
            data = lfn.encode()
            files.append({"lfn": lfn, "fsize": len(data),
                          "checksum": f"ad:{zlib.adler32(data):08x}"})
            for site in t.inputs.at:
                path = se_root / site / replica_path("sim", lfn)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        for site in t.inputs.at:
            tb.data.add_dataset_files(f"{t.name}.in", "sim", files, f"SE_{site}")


def task_parameters(t: SimTask) -> dict:
    params = {"name": t.name, "transformation": "/bin/true", "scope": "sim",
              "job_parameters": "simulated", "priority": t.priority, "max_attempts": 3,
              "resources": {"cores": t.cores, "memory_mb": t.memory_mb,
                            "walltime_s": 7 * 86400}}
    if t.share:
        params["share"] = t.share
    if t.inputs is not None:
        params.update(input_dataset=f"{t.name}.in", files_per_job=1)
    else:
        params["n_jobs"] = t.n_jobs
    return params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: simulated seconds the share ranking's counter snapshot may be old (``--share-counts-s``): a
#: real server's 2 s are nothing beside jobs of hours, but at ``speed`` 600 they would be 1,200
#: simulated seconds, four lifetimes of a 300 s job, and the shares would be steered by a
#: picture older than the jobs it counts. The simulation keeps the real grid's proportion.
SHARE_COUNTS_SIM_S = 120.0


def share_counts_s(speed: float) -> float:
    """The server's ``--share-counts-s`` for a run at ``speed``: 120 simulated seconds, within
    the option's 0.05 .. 2 s (never longer than a real server's)."""
    return min(2.0, max(0.05, SHARE_COUNTS_SIM_S / speed))


def start_server(db_url: str, work: Path, processes: int, speed: float = 1.0
                 ) -> tuple[subprocess.Popen, str, Path]:
    """``panda server`` on a free loopback port; returns (process, URL, key folder)."""
    port = _free_port()
    keys = work / "keys"
    logf = open(work / "server.log", "w")
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "--db", db_url, "--host", "127.0.0.1",
           "--port", str(port), "--key-dir", str(keys), "--processes", str(processes),
           "--watcher-interval", "1", "--ops-interval", "0", "--archive-interval", "0",
           "--share-counts-s", f"{share_counts_s(speed):g}",
           "--log-level", os.environ.get("PANDA_SIMULATE_SERVER_LOG", "INFO")]
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    import urllib.request
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"the server stopped at start (exit {proc.returncode}); "
                                  f"see {work / 'server.log'}")
        try:
            with urllib.request.urlopen(url + "/api/v1/system/is_alive", timeout=2):
                return proc, url, keys
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SimulationError(f"the server did not answer within 60 s; see {work / 'server.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    import signal
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Simulation:
    """Runs a workload against a server at ``url`` over the database of ``tb``."""

    def __init__(self, tb: TaskBuffer, w: Workload, url: str, keys: Path):
        from ..auth import KeyStore

        self.tb, self.w, self.url = tb, w, url
        store = KeyStore(keys)
        self.admin = store.issue_token("simulate", "admin")
        self.tokens = {s.name: store.issue_token(f"sim-pilot-{s.name}", "pilot", s.name)
                       for s in w.sites}
        self.data = RunData(w)
        self.durations: dict[int, float] = {}
        self.submit_client = None            # made in ``run``, on its event loop

    async def submit(self, t: SimTask, start: float) -> None:
        await asyncio.sleep(max(0.0, start + t.submit_at_s / self.w.speed - time.monotonic()))
        try:
            reply = await self.submit_client.fetch(
                f"{self.url}/api/v1/task/submit", method="POST", raise_error=False,
                body=json.dumps({"task_parameters": task_parameters(t)}),
                headers={"Authorization": f"Bearer {self.admin}",
                         "Content-Type": "application/json", "Accept": "application/json"},
                request_timeout=SUBMIT_TIMEOUT_S, connect_timeout=SUBMIT_TIMEOUT_S)
            body = json.loads(reply.body) if reply.body else \
                {"success": False, "message": f"HTTP {reply.code}: {reply.error}"}
        except (ValueError, OSError) as exc:
            body = {"success": False, "message": f"{type(exc).__name__}: {exc}"}
        if not body.get("success"):
            self.data.submit_errors.append(f"{t.name}: {body.get('message')}")
            log.error("task %s was not accepted: %s", t.name, body.get("message"))
            return
        self.durations[int(body["data"])] = t.duration_s
        self.data.task_ids[t.name] = int(body["data"])
        log.info("task %s submitted: %s", t.name, body.get("message", ""))

    def sample(self, start: float) -> Sample:
        """The counters summed per share by the database (a few rows however many sites)."""
        running: dict[str, int] = {}
        waiting: dict[str, int] = {}
        ended = live = 0
        for (share, status), (n, cores) in self.tb.counts.by_share().items():
            if status in ("sent", "starting", "running"):
                running[share] = running.get(share, 0) + cores
            elif status == "activated":
                waiting[share] = waiting.get(share, 0) + n
            if status in FINAL:
                ended += n
            else:
                live += n
        return Sample((time.monotonic() - start) * self.w.speed, running, waiting, ended, live)

    async def run(self) -> RunData:
        from tornado.httpclient import AsyncHTTPClient

        w = self.w
        # a connection for each task that may be in flight at once: Tornado queues the rest
        # and fails a queued request after its connect timeout (20 s by default), while the
        # server may take minutes over a big task's jobs as later tasks arrive
        self.submit_client = AsyncHTTPClient(force_instance=True,
                                             max_clients=min(len(w.tasks), 64))
        start = time.monotonic()
        pilots = SimPilots(self.url, self.tokens, w.sites, w.speed, self.durations, seed=w.seed)
        pilot_task = asyncio.create_task(pilots.run())
        submits = [asyncio.create_task(self.submit(t, start)) for t in w.tasks]
        loop = asyncio.get_running_loop()
        next_progress = start + PROGRESS_EVERY_S
        cpu_mark, real_mark = time.process_time(), start
        deadline = start + w.timeout_s
        try:
            while True:
                await asyncio.sleep(max(0.01, min(1.0, w.sample_s / w.speed)))
                # every task submitted (or refused) before the sample: then no live job left
                # in it means the run is over
                submitted = all(s.done() for s in submits) and \
                    len(self.data.task_ids) + len(self.data.submit_errors) == len(w.tasks)
                sample = await loop.run_in_executor(None, self.sample, start)
                self.data.samples.append(sample)
                now = time.monotonic()
                if now >= next_progress:
                    next_progress = now + PROGRESS_EVERY_S
                    # the simulator's own CPU: near 100 % it, not the server, sets the pace
                    cpu = (time.process_time() - cpu_mark) / max(now - real_mark, 1e-9)
                    cpu_mark, real_mark = time.process_time(), now
                    log.info("simulated %.0f s (real %.0f s): %d job(s) ended, %d running, "
                             "%d waiting, %d dispatched, %d empty polls; simulator CPU %.0f %%",
                             sample.t, now - start, sample.ended, pilots.stats.busy,
                             sum(sample.waiting.values()), pilots.stats.dispatched,
                             pilots.stats.empty_polls, 100 * cpu)
                if submitted and sample.live == 0:
                    self.data.completed = True
                    break
                if now >= deadline:
                    log.warning("simulation timed out after %.0f s with jobs left", w.timeout_s)
                    break
        finally:
            pilots.stop.set()
            await pilot_task
            for s in submits:
                s.cancel()
            await asyncio.gather(*submits, return_exceptions=True)
            self.submit_client.close()
        self.data.wall_s = time.monotonic() - start
        self.data.pilot_errors = pilots.stats.errors
        self.data.dispatched = pilots.stats.dispatched
        return self.data


def simulate(w: Workload, db_url: str, work: Path, processes: int = 1) -> RunData:
    """Prepare the database, start the server, replay the workload, stop the server."""
    work.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(db_url, pool_size=4)
    try:
        tb = TaskBuffer(engine)
        prepare_database(tb, w, work)
        log.info("simulating %s: %d site(s), %d slot(s), %d task(s), %d job(s), speed %gx",
                 w.name, len(w.sites), sum(s.slots for s in w.sites), len(w.tasks), w.n_jobs,
                 w.speed)
        proc, url, keys = start_server(db_url, work, processes, w.speed)
        try:
            return asyncio.run(Simulation(tb, w, url, keys).run())
        finally:
            stop_server(proc)
    finally:
        engine.dispose()
