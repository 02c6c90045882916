"""Simulated pilots: asyncio coroutines that speak PanDA's pilot protocol to the real server.

Each slot of a site is one coroutine: getJob, updateJob ``running``, a payload that "runs" for
its simulated duration (asleep for duration / speed real seconds), then updateJob ``finished``
with its outputs reported as stored, or ``failed`` with a pilot error code at the site's
failure rate. Thousands of them share one event loop and one pool of keep-alive connections
(``httppool``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
import zlib
from dataclasses import dataclass, field

from .httppool import ConnectionPool, HTTPError
from .workload import SimSite

log = logging.getLogger(__name__)

#: what a simulated payload failure reports (PanDA's pilot error 1305: payload failed)
FAILURE_CODE = 1305
#: real seconds an idle pilot waits before asking again
IDLE_WAIT_S = 0.2


@dataclass
class PilotStats:
    """What the pilots saw, for the report."""
    dispatched: int = 0
    finished: int = 0
    failed: int = 0
    empty_polls: int = 0
    errors: list[str] = field(default_factory=list)
    busy: int = 0                      # slots with a job right now


def stored_xml(out_files: str) -> str:
    """The final updateJob's ``xml``: every output (and the log) as stored."""
    out = {}
    for lfn in filter(None, out_files.split(",")):
        data = lfn.encode()
        out[lfn] = {"guid": str(uuid.uuid4()), "fsize": len(data),
                    "adler32": f"{zlib.adler32(data):08x}", "surl": f"file:///sim/{lfn}"}
    return json.dumps(out)


class SimPilots:
    """Every slot of every site, as coroutines, until ``stop`` is set."""

    def __init__(self, url: str, tokens: dict[str, str], sites: list[SimSite], speed: float,
                 durations: dict[int, float], seed: int = 1, max_clients: int = 100):
        self.url = url
        self.tokens = tokens
        self.sites = sites
        self.speed = speed
        self.durations = durations         # task id -> mean simulated payload seconds
        self.rng = random.Random(seed)
        self.stats = PilotStats()
        self.stop = asyncio.Event()
        self.client = ConnectionPool(url, size=max_clients)
        self.headers = {site: {"Authorization": f"Bearer {token}", "Accept": "application/json"}
                        for site, token in tokens.items()}

    async def _post(self, site: str, method: str, form: dict) -> dict:
        for attempt in range(5):
            try:
                return json.loads(await self.client.post(f"/server/panda/{method}", form,
                                                         self.headers[site]))
            except (HTTPError, OSError, EOFError, ValueError, asyncio.TimeoutError) as exc:
                if attempt == 4:
                    raise
                log.debug("%s %s: %s; again", site, method, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def slot(self, site: SimSite, k: int) -> None:
        node = f"{site.name}-wn{k:03d}"
        while not self.stop.is_set():
            try:
                job = await self._post(site.name, "getJob", {"siteName": site.name,
                                                             "node": node})
                if job.get("StatusCode") == 20:
                    self.stats.empty_polls += 1
                    await self._wait(IDLE_WAIT_S * (0.5 + self.rng.random()))
                    continue
                if job.get("StatusCode") != 0:
                    self.stats.errors.append(f"{site.name} getJob: {job}")
                    await self._wait(1.0)
                    continue
                self.stats.dispatched += 1
                self.stats.busy += 1
                try:
                    await self.run_job(site, job)
                finally:
                    self.stats.busy -= 1
            except Exception as exc:  # noqa: BLE001 - counted and reported; the slot goes on
                self.stats.errors.append(f"{site.name}: {type(exc).__name__}: {exc}")
                await self._wait(1.0)

    async def run_job(self, site: SimSite, job: dict) -> None:
        pid, attempt = job["PandaID"], job["attemptNr"]
        base = {"jobId": pid, "attemptNr": attempt, "siteName": site.name}
        await self._post(site.name, "updateJob", {**base, "state": "running"})
        mean = self.durations.get(int(job.get("taskID") or job.get("jediTaskID") or 0), 600.0)
        simulated = self.rng.expovariate(1.0 / mean) if mean > 0 else 0.0
        await self._wait(simulated * site.speed_factor / self.speed)
        if self.rng.random() < site.failure_rate:
            reply = await self._post(site.name, "updateJob", {
                **base, "state": "failed", "pilotErrorCode": FAILURE_CODE,
                "pilotErrorDiag": "simulated payload failure", "transExitCode": 1})
            self.stats.failed += 1
        else:
            reply = await self._post(site.name, "updateJob", {
                **base, "state": "finished", "transExitCode": 0,
                "xml": stored_xml(job.get("outFiles", ""))})
            self.stats.finished += 1
        if reply.get("StatusCode") != 0:
            self.stats.errors.append(f"{site.name} updateJob {pid}: {reply}")

    async def _wait(self, seconds: float) -> None:
        # a plain sleep: ``run`` cancels every slot once ``stop`` is set (a wait_for on the
        # event made a task and a timer per idle poll, thousands a second at 4,000 slots)
        await asyncio.sleep(max(seconds, 0.0))

    async def run(self) -> None:
        slots = [asyncio.create_task(self.slot(site, k))
                 for site in self.sites for k in range(site.slots)]
        await self.stop.wait()
        for t in slots:
            t.cancel()
        await asyncio.gather(*slots, return_exceptions=True)
        self.client.close()
