"""The PanDA pilot protocol: getJob, updateJob, getStatus and event ranges over form dicts.

The HTTP layer only decodes the request and encodes the reply; everything a pilot can ask is
checked and answered here, so it is tested without HTTP. The database work goes through the
:class:`~server.dispatchpath.DispatchPath` chosen at start-up (the general path in the thread
pool, or the PostgreSQL hot path); other blocking work runs in the thread pool (``run``).
Field names are PanDA's (docs/protocol.md).
"""
from __future__ import annotations

import calendar
import json
import logging
import math
import re
import time
from typing import Any

from panda_core import workernode
from panda_core.canonical import signed_bytes
from panda_core.debugview import clean_view
from panda_core.replicas import BadFileName, check_name
from panda_core.states import PILOT_REPORTED_STATES
from panda_core.wire import DISPATCH_KEY, Dispatch, encode_job, join_field

from . import db
from .auth import Identity, KeyStore
from .dispatchpath import DispatchPath, GeneralPath, JobRequest, Run, UpdateRequest, in_pool
from .eventranges import EventRangeError, protocol_get, protocol_update
from .jobholder import Claim, nonce_digest
from .nofit import NoFitExplainer, PilotFit, explain
from .taskbuffer import Conflict, NotFound, TaskBuffer

# PanDA's StatusCode values
SC_OK, SC_TIMEOUT, SC_NO_JOBS, SC_FAILED = 0, 10, 20, 30
SC_INVALID_TOKEN, SC_INVALID_ROLE, SC_DENIED, SC_KEY_MISSING = 50, 60, 70, 80

_INT = re.compile(r"^-?\d+$")
_NONCE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_REPORTED = frozenset(str(s) for s in PILOT_REPORTED_STATES)

log = logging.getLogger(__name__)


class ProtocolError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


def _int(form: dict, key: str, default: int | None = None) -> int | None:
    """An integer field; anything else (text, inf, nan, out of a BIGINT's range) is refused."""
    value = form.get(key)
    if value in (None, "", "NULL", "None"):
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        text = str(value).strip()
        number = int(text) if _INT.match(text) else int(float(text))
        if not -2**63 < number < 2**63:
            raise ValueError
        return number
    except (ValueError, OverflowError):
        raise ProtocolError(SC_FAILED, f"{key} must be a number, got {str(value)[:100]!r}"
                            ) from None


def _int32(form: dict, key: str, default: int | None = None) -> int | None:
    """An integer field stored in a 32-bit column: a bigger one is refused, not truncated."""
    value = _int(form, key, default)
    if value is not None and not -2**31 <= value < 2**31:
        raise ProtocolError(SC_FAILED, f"{key} must be a 32-bit integer, got {value}")
    return value


def _text(value: Any, column: str) -> str | None:
    """A free-text field cut to its column's length (node names, batch ids, diagnostics)."""
    if value in (None, ""):
        return None
    length = db.jobs.c[column].type.length or 4000
    return str(value)[:length]


def _clamp32(value: int | None) -> int | None:
    return None if value is None else max(-2**31, min(value, 2**31 - 1))


def _float(form: dict, key: str) -> float | None:
    value = form.get(key)
    if value in (None, "", "NULL", "None"):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    except (TypeError, ValueError):
        raise ProtocolError(SC_FAILED, f"{key} must be a number, got {str(value)[:100]!r}"
                            ) from None


def _version(form: dict) -> str | None:
    """The pilot's ``pilotVersion``: one text value (jobs may require one)."""
    value = form.get("pilotVersion")
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > 255:
        raise ProtocolError(SC_FAILED, "pilotVersion must be one text value of at most 255 "
                                       "characters")
    return value


def _require(form: dict, key: str) -> str:
    value = form.get(key)
    if value in (None, ""):
        raise ProtocolError(SC_KEY_MISSING, f"{key} is missing")
    return str(value)


class JsonReply(dict):
    """A reply that carries its own JSON encoding (``json_text``), equal to the dict's."""
    json_text: str = ""


class Dispatcher:
    """``job_chooser``: the share-aware order (``shares.ShareChooser``), or None for the plain
    priority order; ``path``: how requests reach the database (default: the general path);
    ``run``: where blocking work runs (default: the event loop's thread pool)."""

    def __init__(self, tb: TaskBuffer, keys: KeyStore, job_chooser=None,
                 path: DispatchPath | None = None, run: Run | None = None):
        self.tb = tb
        self.keys = keys
        self.job_chooser = job_chooser
        self.run = run or in_pool()
        self.path = path or GeneralPath(tb, self.run)
        self.nofit = NoFitExplainer(tb.jobs)

    # ------------------------------------------------------------------ getJob
    async def get_job(self, form: dict, identity: Identity | None) -> dict:
        req = await self._job_request(form, identity)
        if isinstance(req, dict):
            return req
        steps = await self._share_plan(req.site)
        jobs = await self.path.get_jobs(req, steps)
        if not jobs:
            return {"StatusCode": SC_NO_JOBS, "errorDialog": await self._no_job_reason(req)}
        # noted even without steps (one share waiting here): the usage is grid-wide, so a
        # site with one share moves the order at the others
        note = getattr(self.job_chooser, "note_dispatched", None)
        if note is not None:
            note(req.site, jobs)
        return self._job_reply(req, jobs)

    async def _no_job_reason(self, req: JobRequest) -> str:
        """Why this pilot got nothing (``server.nofit``): from the cached shape of the site's
        activated jobs, read in the thread pool at most once per site every few seconds."""
        fit = PilotFit(walltime_s=req.fit.get("walltime_s"), memory_mb=req.fit.get("memory_mb"),
                       cores=req.fit.get("cores"), pilot_version=req.fit.get("pilot_version"))
        shape = self.nofit.cached(req.site)
        if shape is None:
            try:
                shape = await self.run(self.nofit.shape, req.site)
            except Exception:  # noqa: BLE001 - the reason is advice: "no jobs" stays the answer
                log.warning("cannot explain the empty getJob at %s", req.site, exc_info=True)
                return "no jobs"
        return explain(req.site, shape, fit)

    async def _job_request(self, form: dict, identity: Identity | None) -> JobRequest | dict:
        """A getJob's checked fields; or the reply itself when the site takes no jobs."""
        site = _require(form, "siteName")
        if identity is not None and not identity.may_act_for_site(site):
            raise ProtocolError(SC_DENIED, f"{identity.subject} may not take jobs of {site}")
        site_row = await self._site_row(site)
        if site_row["status"] == "offline":
            return {"StatusCode": SC_NO_JOBS, "errorDialog": f"site {site} is offline"}
        n_jobs = max(1, min(_int(form, "nJobs", 1) or 1, 100))
        # a resource beyond a 32-bit column fits any job: clamp instead of failing the query
        remaining = _clamp32(_int(form, "remainingWalltime") or _int(form, "maxWalltime"))
        mem = _clamp32(_int(form, "mem"))
        cores = _clamp32(_int(form, "cores") or _int(form, "coreCount"))
        label = form.get("prodSourceLabel")
        nonce = form.get("pilotNonce") or ""      # pilot 3 sends none: its specs bind no nonce
        if nonce and not (isinstance(nonce, str) and _NONCE.fullmatch(nonce)):
            raise ProtocolError(SC_FAILED, "pilotNonce must be 1-128 letters, digits, _ or -")
        return JobRequest(
            site=site, site_config=site_row["config"], n_jobs=n_jobs, many="nJobs" in form,
            fit=dict(cores=cores, memory_mb=mem, walltime_s=remaining,
                     pilot_version=_version(form),
                     prod_source_label=label if label in ("test", "ptest", "user") else None),
            who=dict(node=_text(form.get("node"), "node"),
                     actor=identity.subject if identity else None,
                     pilot_id=_text(form.get("pilotID") or form.get("pilot_id"), "pilot_id"),
                     batch_id=_text(form.get("batchID") or form.get("worker_id"), "batch_id"),
                     nonce=nonce_digest(nonce)),
            nonce=nonce)

    async def _site_row(self, site: str) -> dict:
        """The site's row: from the cache, else read in the thread pool (never on the loop)."""
        row = self.tb.sites.cached(site)
        if row is None:
            try:
                row = await self.run(self.tb.sites.get_cached, site)
            except NotFound:
                raise ProtocolError(SC_FAILED, f"unknown site {site!r}") from None
        return row

    async def _share_plan(self, site: str) -> list | None:
        """The chooser's share steps for the site (its database reads in the thread pool)."""
        chooser = self.job_chooser
        if chooser is None:
            return None
        if chooser.is_fresh(site):
            return chooser.share_plan(site)
        return await self.run(chooser.share_plan, site)

    def _job_reply(self, req: JobRequest, jobs: list[dict]) -> dict:
        if req.many:
            return {"StatusCode": SC_OK,
                    "jobs": [self.job_spec(job, req.site_config, req.nonce) for job in jobs]}
        spec, canonical = self._signed_spec(jobs[0], req.site_config, req.nonce)
        reply = JsonReply(StatusCode=SC_OK, **spec)
        # the reply's JSON reuses the canonical encoding the signature was made over
        reply.json_text = ('{"StatusCode":%d,%s,"specSignature":"%s"}'
                           % (SC_OK, canonical[1:-1].decode(), spec["specSignature"]))
        return reply

    def _unsigned_spec(self, job: dict, site_config: dict, nonce: str) -> dict:
        """A job row (just sent to a pilot) in PanDA's getJob shape (``panda_core.wire``),
        bound to that dispatch: the site, the pilot the row now names, the pilot's nonce and
        the dispatch time, all from the row but the nonce."""
        storage = site_config.get("storage") or {}
        spec = encode_job(job, storage.get("input", {}).get("name", ""),
                          storage.get("output", {}).get("name", ""))
        sent = job.get("state_changed")
        spec[DISPATCH_KEY] = Dispatch(
            site=job["site"] or "", pilot_id=job.get("pilot_id") or "", nonce=nonce,
            time=calendar.timegm(sent.utctimetuple()) if sent is not None else 0).to_wire()
        return spec

    def job_spec(self, job: dict, site_config: dict, nonce: str = "") -> dict:
        """A job row in PanDA's getJob shape, bound to its dispatch and signed
        (``specSignature``)."""
        return self._signed_spec(job, site_config, nonce)[0]

    def _signed_spec(self, job: dict, site_config: dict, nonce: str) -> tuple[dict, bytes]:
        spec = self._unsigned_spec(job, site_config, nonce)
        canonical = signed_bytes(spec)
        spec["specSignature"] = self.keys.sign_canonical(canonical)
        return spec, canonical

    # ------------------------------------------------------------------ updateJob
    def _update_request(self, form: dict) -> UpdateRequest:
        panda_id = _int(form, "jobId")
        if panda_id is None:
            raise ProtocolError(SC_KEY_MISSING, "jobId is missing")
        state = _require(form, "state")
        if state not in _REPORTED:
            raise ProtocolError(SC_FAILED, f"state {state!r} is not one a pilot may report")
        # the worker node's description first: the update's own fields (node) win over it
        fields: dict[str, Any] = workernode.parse(form.get(workernode.FIELD))
        for key, column, conv in _REPORT_NUMBERS:
            value = conv(form, key)
            if value is not None:
                fields[column] = value
        for key, column in _REPORT_TEXTS:
            if form.get(key) not in (None, ""):
                fields[column] = _text(form[key], column)
        if form.get("debugView") not in (None, ""):       # debug mode: bounded, known keys only
            fields["debug_view"] = clean_view(form["debugView"])
        stored = parse_stored_files(form["xml"]) if form.get("xml") else {}
        nonce = form.get("pilotNonce") or None
        if nonce is not None and not (isinstance(nonce, str) and _NONCE.fullmatch(nonce)):
            raise ProtocolError(SC_FAILED, "pilotNonce must be 1-128 letters, digits, _ or -")
        claim = Claim(pilot_id=_text(form.get("pilotID"), "pilot_id"),
                      node=fields.get("node"), nonce=nonce)
        return UpdateRequest(panda_id=panda_id, state=state, fields=fields, stored=stored,
                             attempt_nr=_int32(form, "attemptNr"),
                             site=str(form.get("siteName") or ""), claim=claim)

    async def update_job(self, form: dict, identity: Identity | None) -> dict:
        req = self._update_request(form)
        began = time.monotonic()
        try:
            command = await self.path.update(req, identity)
        except PermissionError as exc:
            raise ProtocolError(SC_DENIED, str(exc)) from None
        except Conflict as exc:
            raise ProtocolError(SC_FAILED, str(exc)) from None
        note = getattr(self.job_chooser, "note_released", None)
        if note is not None and req.released is not None:
            note(*req.released, began=began)
        reply = {"StatusCode": SC_OK, "command": command}
        if command == "debug":      # the view asked for (rare: one more read, debug jobs only)
            reply["debugView"] = await self.run(self.tb.jobs.debug_request, req.panda_id) \
                or "tail"
        return reply

    # ------------------------------------------------------------------ event ranges
    async def get_event_ranges(self, form: dict, identity: Identity | None) -> dict:
        for key in ("pandaID", "nRanges", "jediTaskID", "taskID"):   # ids beyond a BIGINT
            text = str(form.get(key, "")).strip()                      # would break the query
            if _INT.match(text) and not -2**63 < int(text) < 2**63:
                raise ProtocolError(SC_FAILED, f"{key} must be an integer within 64 bits, "
                                               f"got {text[:40]!r}")
        return await self._event_ranges(protocol_get, form, identity)

    async def update_event_ranges(self, form: dict, identity: Identity | None) -> dict:
        return await self._event_ranges(protocol_update, form, identity)

    async def _event_ranges(self, call, form: dict, identity: Identity | None) -> dict:
        try:
            return await self.run(call, self.tb, form, identity)
        except EventRangeError as exc:
            raise ProtocolError(exc.status_code, str(exc)) from None

    # ------------------------------------------------------------------ getStatus
    async def get_status(self, form: dict, identity: Identity | None = None) -> dict:
        return await self.run(self._statuses, form)

    def _statuses(self, form: dict) -> dict:
        ids = [i for i in str(form.get("ids", "")).split(",") if i.strip()]
        states, commands = [], []
        for raw in ids[:1000]:
            try:
                number = int(raw)
                job = self.tb.jobs.get(number) if -2**63 < number < 2**63 else None
            except ValueError:
                job = None
            states.append(job["status"] if job else "unknown")
            commands.append((job or {}).get("command") or "NULL")
        return {"StatusCode": SC_OK, "status": join_field(states), "command": join_field(commands)}


# what an updateJob may set on the job: (form key, column[, converter])
_REPORT_NUMBERS = (("pilotErrorCode", "pilot_error_code", _int32),
                   ("transExitCode", "trans_exit_code", _int32),
                   ("exeErrorCode", "exe_error_code", _int32),
                   ("nEvents", "n_events", _int),
                   ("maxRSS", "max_rss", _int),
                   ("cpuConsumptionTime", "cpu_consumption_time", _float))
_REPORT_TEXTS = (("pilotErrorDiag", "pilot_error_diag"), ("exeErrorDiag", "exe_error_diag"),
                 ("node", "node"), ("batchID", "batch_id"), ("jobMetrics", "job_metrics"))
#: the job columns an updateJob may set (the hot path's statements set exactly these)
REPORT_COLUMNS = tuple(c for _, c, *_ in _REPORT_NUMBERS + _REPORT_TEXTS) + tuple(
    c for c, *_ in workernode.COLUMNS.values() if c != "node") + ("debug_view",)


_HEX = re.compile(r"[0-9a-fA-F]+")
_GUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_STORED_FILES = 10000


def _stored_size(lfn: str, value: Any) -> int | None:
    """A stored file's size: a whole number of bytes, 0 to 2**63-1 (JSON integer or digits);
    ``-5``, ``1e30``, ``Infinity``, ``true`` or ``"12abc"`` are refused."""
    if value in (None, ""):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ProtocolError(SC_FAILED, f"xml: fsize of {lfn} must be a whole number of bytes "
                                       f"(0 to 2**63-1), got {str(value)[:40]!r}")
    return value


def _stored_digest(lfn: str, kind: str, value: Any, digits: int) -> str:
    text = str(value).strip().lower() if isinstance(value, (str, int)) else ""
    if kind == "adler32":
        text = text.zfill(8)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or len(text) != digits \
            or not _HEX.fullmatch(text):
        raise ProtocolError(SC_FAILED, f"xml: {kind} of {lfn} must be {digits} hex digits, "
                                       f"got {str(value)[:80]!r}")
    return text


def parse_stored_files(xml: str) -> dict[str, dict]:
    """The final updateJob's ``xml``: a JSON object {lfn: {guid, fsize, adler32|md5sum, surl}}.

    Every value is checked (a pilot is not trusted to report what it stored): names pass the
    name check, sizes are non-negative 64-bit integers, checksums hex of their length, GUIDs
    short tokens, SURLs text without NUL or '..' (whether a SURL is where the server puts that
    file is checked against the job's own files when it is registered)."""
    try:
        data = json.loads(xml)
    except (TypeError, ValueError, RecursionError):
        raise ProtocolError(SC_FAILED, "xml must be a JSON object of stored files") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ProtocolError(SC_FAILED, "xml must be a JSON object {lfn: {...}}")
    if len(data) > MAX_STORED_FILES:
        raise ProtocolError(SC_FAILED, f"xml: at most {MAX_STORED_FILES} files")
    out = {}
    for lfn, info in data.items():
        try:
            check_name(lfn, "lfn")
        except BadFileName as exc:
            raise ProtocolError(SC_FAILED, f"xml: {exc}") from None
        guid, surl = info.get("guid"), info.get("surl")
        if guid not in (None, "") and not (isinstance(guid, str) and _GUID.fullmatch(guid)):
            raise ProtocolError(SC_FAILED, f"xml: guid of {lfn} must be up to 64 letters, "
                                           f"digits and ._:-, got {str(guid)[:80]!r}")
        if surl not in (None, ""):
            if not isinstance(surl, str) or len(surl) > 4000 or "\0" in surl \
                    or ".." in surl.split("?")[0].split("/"):
                raise ProtocolError(SC_FAILED, f"xml: surl of {lfn} must be a URL on the "
                                               f"site's storage element, got {str(surl)[:200]!r}")
        entry = {"guid": guid or None, "surl": surl or None,
                 "fsize": _stored_size(lfn, info.get("fsize"))}
        if info.get("adler32") not in (None, ""):
            entry["adler32"] = _stored_digest(lfn, "adler32", info["adler32"], 8)
        if info.get("md5sum") not in (None, ""):
            entry["md5sum"] = _stored_digest(lfn, "md5sum", info["md5sum"], 32)
        out[lfn] = entry
    return out
