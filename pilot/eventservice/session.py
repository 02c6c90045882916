"""One event-service job's conversation: ranges from the server to the payload, outputs back.

A thread next to the job's monitor loop reads the payload's messages (``protocol``), fetches
ranges from the server in batches (``getEventRanges``) when the payload is ready for more and
wall time is left, stages in the file a range names the first time one does, stores each
range's output under ``range_output_lfn`` and reports it (``updateEventRanges``, PanDA's
version-1 shape with one ``zipFile`` per range). What the pilot holds when the payload ends is
given back: ranges handed to the payload and never reported are ``failed`` if the payload
crashed (it may be their fault) and ``cancelled`` otherwise (a kill, the wall time), ranges
fetched and never handed out are ``cancelled``; both go back to the task's pool at once. A
pilot killed outright loses only the ranges in flight, which the server takes back once their
lease runs out (docs/eventranges.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from panda_core.client import ClientError, PilotClient, try_again
from panda_core.replicas import BadFileName, check_name
from panda_core.retry import RetryPolicy
from panda_core.siteconfig import SiteConfig
from panda_core.wire import FileSpec, JobSpec, range_output_lfn

from ..errors import PilotError, StageError
from ..report import KILL_COMMANDS
from . import EventServiceSettings
from . import protocol as proto

log = logging.getLogger(__name__)

REPORT_RETRY = RetryPolicy(attempts=3, backoff_s=1, timeout_s=20)
FINAL_REPORT_RETRY = RetryPolicy(attempts=6, backoff_s=2, timeout_s=30)


@dataclass
class SessionContext:
    """What the session needs of its job run (kept narrow so the session is testable alone)."""
    client: PilotClient
    site: SiteConfig
    job: JobSpec
    workdir: Path
    outdir: Path                                   # the pilot's (not the payload's) folder
    stage_settings: Any                            # pilot.stage.StageSettings
    remaining_s: Callable[[], float | None]        # wall time left, None = unlimited
    reserve_s: float
    stop_requested: Callable[[], bool]             # a kill or a signal: hand out no more
    on_command: Callable[[set[str]], None]         # the server's commands for this job
    on_contact: Callable[[], None] = lambda: None  # a call reached the server
    report_deadline: Callable[[], float | None] = lambda: None   # no report reaches past it


@dataclass
class Held:
    rng: dict[str, Any]
    since: float = field(default_factory=time.monotonic)


class EventServiceSession:
    def __init__(self, ctx: SessionContext, settings: EventServiceSettings | None = None):
        self.ctx = ctx
        self.settings = settings or EventServiceSettings()
        self.buffer: deque[dict[str, Any]] = deque()     # fetched, not yet handed out
        self.in_flight: dict[str, Held] = {}             # handed to the payload
        self.staged: dict[str, str] = {}                 # lfn -> path or URL for the payload
        self.unsent: list[dict[str, Any]] = []           # reports the server has not taken yet
        self.wanted = 0                                  # ready messages not yet answered
        self.pool_empty = False
        self.next_fetch = 0.0
        self.durations: list[float] = []
        self.started = 0.0
        self.done = self.failed = self.refused = self.protocol_errors = 0
        self.events = 0
        self.error: PilotError | None = None             # a reason to fail the whole job
        self._payload_ended = threading.Event()
        self._thread: threading.Thread | None = None
        self._rfd = self._wfd = -1
        self._lines = proto.LineBuffer()

    # --- set-up and tear-down -----------------------------------------------------------------
    def prepare(self) -> dict[str, str]:
        """Make the two pipes (before the payload starts); the payload's environment names them."""
        wd = self.ctx.workdir
        self.ctx.outdir.mkdir(parents=True, exist_ok=True)
        paths = {proto.RANGES_ENV: wd / proto.RANGES_PIPE, proto.REPORTS_ENV: wd / proto.REPORTS_PIPE}
        for p in paths.values():
            p.unlink(missing_ok=True)
            os.mkfifo(p, 0o600)
        # O_RDWR: neither open blocks waiting for the payload, and the pilot never reads an
        # end-of-file while no payload process has the pipe open (Linux FIFO semantics)
        self._rfd = os.open(paths[proto.REPORTS_ENV], os.O_RDWR | os.O_NONBLOCK)
        self._wfd = os.open(paths[proto.RANGES_ENV], os.O_RDWR | os.O_NONBLOCK)
        return {k: str(v) for k, v in paths.items()}

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"es-{self.ctx.job.job_id}",
                                        daemon=True)
        self._thread.start()

    def finish(self, payload_crashed: bool) -> None:
        """The payload ended: read its last messages, give back what it did not finish, send
        every report still unsent, remove the pipes."""
        self._payload_ended.set()
        if self._thread is not None:
            self._thread.join(timeout=600)
        else:
            self._drain()
        back = []
        status = "failed" if payload_crashed and not self.ctx.stop_requested() else "cancelled"
        for rid, held in self.in_flight.items():
            log.warning("range %s handed to the payload was never reported: %s", rid, status)
            back.append({"eventRangeID": rid, "eventStatus": status})
        back += [{"eventRangeID": r["eventRangeID"], "eventStatus": "cancelled"}
                 for r in self.buffer]
        self.in_flight.clear()
        self.buffer.clear()
        self._report(back, FINAL_REPORT_RETRY)
        if self.unsent:
            log.error("job %s: %d event range report(s) not delivered; the server takes those "
                      "ranges back when their lease ends", self.ctx.job.job_id, len(self.unsent))
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        for name in (proto.RANGES_PIPE, proto.REPORTS_PIPE):
            (self.ctx.workdir / name).unlink(missing_ok=True)
        log.info("job %s: event service: %d range(s) done (%d events), %d failed, %d report(s) "
                 "not taken, %d bad line(s) from the payload", self.ctx.job.job_id, self.done,
                 self.events, self.failed, self.refused, self.protocol_errors)

    def summary(self) -> dict[str, int]:
        return {"esRangesDone": self.done, "esRangesFailed": self.failed, "nEvents": self.events}

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._payload_ended.is_set():
                self._read(timeout=0.2)
                self._serve()
            self._drain()
        except Exception:   # the job goes on to its end and reports; the pool takes ranges back
            log.exception("job %s: event service failed", self.ctx.job.job_id)

    def _drain(self) -> None:
        """The payload is gone: its last messages (a ``done`` just before it exited)."""
        for _ in range(1000):
            if not self._read(timeout=0):
                break

    def _read(self, timeout: float) -> bool:
        if self._rfd < 0:
            return False
        ready, _, _ = select.select([self._rfd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return False
        if not data:
            return False
        for item in self._lines.feed(data):
            if isinstance(item, proto.ProtocolLine):
                self._bad_line(item)
                continue
            try:
                msg = proto.parse(item)
            except proto.ProtocolLine as exc:
                self._bad_line(exc)
                continue
            if isinstance(msg, proto.Ready):
                if self.wanted + len(self.in_flight) >= self._max_in_flight():
                    # a payload asking far more than it has workers would hoard the pool
                    self._bad_line(proto.ProtocolLine(
                        f"'ready' with {len(self.in_flight)} range(s) in flight already (at "
                        f"most {self._max_in_flight()}): answered with 'end'"))
                    self._send(proto.END + "\n")
                    continue
                self.wanted += 1
            elif isinstance(msg, proto.Done):
                self._done(msg)
            elif isinstance(msg, proto.Failed):
                self._failed(msg)
        return True

    def _max_in_flight(self) -> int:
        return max(16, 4 * max(self.settings.batch, self.ctx.job.core_count))

    def _bad_line(self, exc: Exception) -> None:
        self.protocol_errors += 1
        if self.protocol_errors <= 20:
            log.warning("job %s: payload sent a bad event-service line: %s", self.ctx.job.job_id,
                        exc)

    def _send(self, line: str) -> None:
        try:
            os.write(self._wfd, line.encode())
        except (BlockingIOError, BrokenPipeError, OSError) as exc:
            log.error("job %s: cannot write to the payload's range pipe: %s",
                      self.ctx.job.job_id, exc)

    # --- handing out ranges -------------------------------------------------------------------
    def _serve(self) -> None:
        while self.wanted > 0:
            if not self.buffer and not self.pool_empty:
                if time.monotonic() < self.next_fetch:
                    return
                self._fetch()
                continue
            if not self.buffer or self.error is not None or self.ctx.stop_requested():
                self._send(proto.END + "\n")
                self.wanted -= 1
                continue
            rng = self.buffer.popleft()
            path = self._input(rng)
            if path is None:        # cannot stage its file: the job fails, the range goes back
                self.buffer.appendleft(rng)
                continue
            self.in_flight[rng["eventRangeID"]] = Held(rng)
            self._send(proto.range_line(rng["eventRangeID"], rng["LFN"], rng["startEvent"],
                                        rng["lastEvent"], path))
            self.wanted -= 1
            self._report([{"eventRangeID": rng["eventRangeID"], "eventStatus": "running"}])

    def _time_left(self) -> bool:
        """Is there time for one more range (as long as the longest so far), both in the batch
        slot (minus the reserve kept for the end of the job) and in the job's own wall time
        (``maxWalltime``, which the walltime monitor enforces from the payload's start)?"""
        per_range = max(self.durations) if self.durations else 0.0
        remaining = self.ctx.remaining_s()
        if remaining is not None and remaining - self.ctx.reserve_s <= per_range:
            return False
        limit = self.ctx.job.max_walltime_s
        if limit and self.started:
            job_left = limit - (time.monotonic() - self.started)
            if job_left <= 1.5 * per_range + 1.0:     # + storing and reporting its output
                return False
        return True

    def _fetch(self) -> None:
        if self.ctx.stop_requested():
            self.pool_empty = True
            return
        if not self._time_left():
            log.info("job %s: not enough wall time left for another event range (%d done)",
                     self.ctx.job.job_id, self.done)
            self.pool_empty = True
            return
        job = self.ctx.job
        n = self.settings.batch or max(1, job.core_count)
        form = {"pandaID": job.job_id, "jobsetID": job.raw.get("jobsetID", ""),
                "taskID": job.raw.get("taskID", ""), "nRanges": str(n)}
        try:
            reply = self.ctx.client.post("getEventRanges", form, REPORT_RETRY)
        except ClientError as exc:
            log.error("job %s: getEventRanges failed, no more ranges: %s", job.job_id, exc)
            self.pool_empty = True
            return
        self.ctx.on_contact()
        if try_again(reply.get("StatusCode")):
            self.next_fetch = time.monotonic() + self.settings.poll_s
            return
        if str(reply.get("StatusCode")) != "0":
            log.error("job %s: getEventRanges refused (StatusCode %s): %s", job.job_id,
                      reply.get("StatusCode"), str(reply.get("errorDialog", ""))[:200])
            self.pool_empty = True
            return
        ranges = reply.get("eventRanges") or []
        if isinstance(ranges, str):
            try:
                ranges = json.loads(ranges)
            except ValueError:
                ranges = None
        if not isinstance(ranges, list):
            log.error("job %s: getEventRanges sent no list of ranges", job.job_id)
            self.pool_empty = True
            return
        good = [r for r in (self._checked(r) for r in ranges) if r is not None]
        if good:
            self.buffer.extend(good)
            return
        if ranges:             # all of them unusable: given back, and no more asked for
            self.pool_empty = True
            return
        try:
            pending = int(reply.get("eventRangesPending") or 0)
        except (TypeError, ValueError):
            pending = 0
        if pending > 0:        # others hold ranges that may come back if they die
            log.info("job %s: no range ready, %d held by other jobs: asking again in %.0f s",
                     job.job_id, pending, self.settings.poll_s)
            self.next_fetch = time.monotonic() + self.settings.poll_s
        else:
            self.pool_empty = True

    def _checked(self, r: Any) -> dict[str, Any] | None:
        """A range as the server sent it, or None (reported failed) when it is unusable: the
        payload must never see a hostile name or a malformed number."""
        try:
            rid = proto._range_id(str(r["eventRangeID"]))
        except (KeyError, TypeError, proto.ProtocolLine) as exc:
            log.error("unusable event range %s: %s", str(r)[:200], exc)
            return None
        try:
            first, last = int(r["startEvent"]), int(r["lastEvent"])
            if not 0 <= first <= last:
                raise ValueError("bad event numbers")
            check_name(str(r["LFN"]), "event range file")
            check_name(str(r.get("scope") or self._scope()), "event range scope")
        except (KeyError, TypeError, ValueError, BadFileName) as exc:
            log.error("unusable event range %s: %s", rid, exc)
            self._report([{"eventRangeID": rid, "eventStatus": "failed"}])
            return None
        return {"eventRangeID": rid, "startEvent": first, "lastEvent": last,
                "LFN": str(r["LFN"]), "GUID": str(r.get("GUID") or ""),
                "scope": str(r.get("scope") or self._scope())}

    def _scope(self) -> str:
        job = self.ctx.job
        return job.log.scope if job.log else (job.inputs[0].scope if job.inputs else "")

    def _input(self, rng: dict[str, Any]) -> str | None:
        """The range's file for the payload, staged in the first time a range names it."""
        lfn = rng["LFN"]
        if lfn in self.staged:
            return self.staged[lfn]
        from ..stage import stage_in

        job = self.ctx.job
        spec = next((f for f in job.inputs if f.lfn == lfn), None) or \
            FileSpec(lfn=lfn, scope=rng["scope"], guid=rng["GUID"])
        try:
            files = stage_in(dataclasses.replace(job, inputs=[spec]), self.ctx.site,
                             self.ctx.workdir, self.ctx.stage_settings)
        except StageError as exc:
            log.error("job %s: stage-in of %s for its event ranges failed: %s", job.job_id, lfn,
                      exc)
            self.error = exc
            return None
        path = files[lfn]
        self.staged[lfn] = lfn if "://" not in path else path     # relative to the work dir
        return self.staged[lfn]

    # --- what the payload reports ---------------------------------------------------------------
    def _done(self, msg: proto.Done) -> None:
        held = self.in_flight.get(msg.range_id)
        if held is None:
            self._bad_line(proto.ProtocolLine(f"'done' for range {msg.range_id}, which the "
                                              "payload does not hold"))
            return
        src = self.ctx.workdir / msg.output
        try:
            st = os.lstat(src)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):     # missing, a link, a pipe, a folder
            log.error("range %s: output %s is not a regular file in the work dir", msg.range_id,
                      msg.output)
            self._give_back(msg.range_id, "failed")
            return
        lfn = range_output_lfn(msg.range_id)
        local = self.ctx.outdir / lfn
        from ..stage import stage_out

        try:
            os.replace(src, local)
            stored = stage_out([FileSpec(lfn=lfn, scope=self._scope())], self.ctx.outdir,
                               self.ctx.site, self.ctx.stage_settings)
        except (OSError, StageError) as exc:
            log.error("range %s: output not stored: %s", msg.range_id, exc)
            local.unlink(missing_ok=True)
            self._give_back(msg.range_id, "failed")
            return
        local.unlink(missing_ok=True)
        info = stored[lfn]
        del self.in_flight[msg.range_id]
        self.durations.append(time.monotonic() - held.since)
        self.done += 1
        self.events += held.rng["lastEvent"] - held.rng["startEvent"] + 1
        self._report([{"eventRangeID": msg.range_id, "eventStatus": "finished"}],
                     zip_file={"lfn": lfn, "fsize": info["fsize"], "adler32": info["adler32"],
                               "scope": info.get("scope") or self._scope()})

    def _failed(self, msg: proto.Failed) -> None:
        if msg.range_id not in self.in_flight:
            self._bad_line(proto.ProtocolLine(f"'failed' for range {msg.range_id}, which the "
                                              "payload does not hold"))
            return
        log.warning("range %s failed in the payload: %s", msg.range_id, msg.reason or "-")
        self._give_back(msg.range_id, "failed")

    def _give_back(self, range_id: str, status: str) -> None:
        self.in_flight.pop(range_id, None)
        self.failed += status == "failed"
        self._report([{"eventRangeID": range_id, "eventStatus": status}])

    # --- reports --------------------------------------------------------------------------------
    def _report(self, items: list[dict[str, Any]], policy: RetryPolicy = REPORT_RETRY,
                zip_file: dict[str, Any] | None = None) -> None:
        """Send ``items`` (one zipFile group) with every report not yet taken before them."""
        if items:
            self.unsent.append({"zipFile": zip_file, "eventRanges": items})
        if not self.unsent:
            return
        batch, self.unsent = self.unsent, []
        form = {"eventRanges": json.dumps(batch), "version": "1",
                "pandaID": self.ctx.job.job_id}
        try:
            reply = self.ctx.client.post("updateEventRanges", form, policy,
                                         self.ctx.report_deadline())
        except ClientError as exc:
            log.warning("job %s: event range report not delivered (kept): %s",
                        self.ctx.job.job_id, exc)
            self.unsent = batch + self.unsent
            return
        if try_again(reply.get("StatusCode")):
            self.unsent = batch + self.unsent
            return
        self.ctx.on_contact()
        if str(reply.get("StatusCode")) != "0":
            # refused as a whole (a malformed report): resending it gets the same answer
            log.error("job %s: event range report refused (StatusCode %s): %s",
                      self.ctx.job.job_id, reply.get("StatusCode"),
                      str(reply.get("errorDialog", ""))[:200])
            self.refused += sum(len(g["eventRanges"]) for g in batch)
            return
        taken = reply.get("Returns") or []
        flat = [i for g in batch for i in g["eventRanges"]]
        for item, ok in zip(flat, taken):
            if ok is False:
                self.refused += 1
                log.warning("job %s: the server did not take %s for range %s (it is no longer "
                            "this job's)", self.ctx.job.job_id, item["eventStatus"],
                            item["eventRangeID"])
        command = (reply.get("Command") or {}).get(self.ctx.job.job_id) \
            if isinstance(reply.get("Command"), dict) else None
        if command:
            commands = {c.strip().lower() for c in str(command).split(",") if c.strip()}
            if commands & KILL_COMMANDS:
                self.pool_empty = True
            self.ctx.on_command(commands)
