"""``/server/panda/<method>``, PanDA's pilot protocol over HTTP, served by a plain Tornado
message delegate.

Why not a RequestHandler: pilots call getJob and updateJob millions of times a day, and for these
small form POSTs a RequestHandler's own machinery (header defaults, output transforms, the
coroutine wrapping of ``_execute``, flush and finish) cost about as much server CPU as the
dispatch itself. Tornado's routing lets an application hand a request to any
``HTTPMessageDelegate`` (``Application.find_handler``); this one collects the body, lets
:func:`pilot_call` answer (the same function whatever the method) and writes the reply with
one ``write_headers``. Everything else goes to the application's RequestHandlers as before.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse

import tornado.web
from tornado import httputil
from tornado.log import access_log

from .auth import AuthError
from .dispatcher import SC_FAILED, SC_TIMEOUT, ProtocolError
from .handlers import ServerState, bad_text, dumps, request_identity, request_params
from .metrics import DISPATCH_SECONDS, REQUEST_SECONDS, REQUESTS
from .ratelimit import Throttled
from .transient import (BAD_VALUE_MESSAGE, MESSAGE as TRANSIENT_MESSAGE, describe,
                        is_bad_value, is_transient)

log = logging.getLogger(__name__)

PREFIX = "/server/panda/"
_METHOD = re.compile(r"^\w+$")
#: protocol method -> the Dispatcher's coroutine answering it (None: known, not supported)
PILOT_METHODS = {"getJob": "get_job", "updateJob": "update_job", "getStatus": "get_status",
                 "updateJobsInBulk": None, "getKeyPair": None,
                 "getEventRanges": "get_event_ranges", "updateEventRanges": "update_event_ranges",
                 "updateEventRange": "update_event_ranges"}


async def pilot_call(state: ServerState, method: str, request) -> tuple[int, dict]:
    """``/server/panda/<method>``: (HTTP status, reply). Errors are replies with PanDA's
    StatusCode and an errorDialog; a pilot always gets one. A database failure that outlasted
    the server's retries is StatusCode 10: try again (the request may be sent again)."""
    try:
        identity = request_identity(request, state)
    except AuthError as exc:
        return 200, {"StatusCode": exc.status_code, "errorDialog": str(exc)}
    try:
        params = request_params(request)
    except tornado.web.HTTPError as exc:
        return 200, {"StatusCode": SC_FAILED, "errorDialog": exc.reason}
    reason = pilot_text(params)
    if reason:
        return 200, {"StatusCode": SC_FAILED, "errorDialog": reason}
    if method == "isAlive":
        return 200, {"StatusCode": 0, "alive": "yes"}
    target = PILOT_METHODS.get(method)
    if target is None:
        return (404 if method not in PILOT_METHODS else 501), {
            "StatusCode": SC_FAILED, "errorDialog": f"unknown or unsupported method {method!r}"}
    if method != "getStatus":
        if identity is None:
            return 200, {"StatusCode": 50, "errorDialog":
                         "an identity is required: send 'Authorization: Bearer <token>'"}
        if identity.role not in ("pilot", "admin"):
            return 200, {"StatusCode": 60, "errorDialog": f"role {identity.role} may not {method}"}
    REQUESTS.labels("pilot", method).inc()
    started = time.monotonic()
    try:
        result = await getattr(state.dispatcher, target)(params, identity)
    except ProtocolError as exc:
        result = {"StatusCode": exc.status_code, "errorDialog": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a pilot must get a reply, and the log the trace
        if is_transient(exc):    # the server's retries are used up: the pilot keeps its report
            log.warning("%s: %s; answered 'try again'", method, describe(exc))
            result = {"StatusCode": SC_TIMEOUT, "errorDialog": TRANSIENT_MESSAGE}
        elif is_bad_value(exc):  # a value the field checks let through, the database not
            log.info("%s: refused a value: %s", method, describe(exc))
            result = {"StatusCode": SC_FAILED, "errorDialog": BAD_VALUE_MESSAGE}
        else:
            log.exception("%s failed", method)
            result = {"StatusCode": SC_FAILED, "errorDialog": "internal server error"}
    seconds = time.monotonic() - started
    REQUEST_SECONDS.labels("pilot", method).observe(seconds)
    if method == "getJob":
        DISPATCH_SECONDS.labels("job" if result.get("StatusCode") == 0 else "nojob").observe(seconds)
    return 200, result


#: free-text fields of the pilot protocol: a NUL byte in them is dropped (a final report is
#: not refused for its diagnostics); anywhere else it refuses the request
FREE_TEXT = frozenset({"pilotErrorDiag", "exeErrorDiag", "jobMetrics", "node", "batchID",
                       "pilotID", "worker_id", "pilot_id", "cpuConsumptionUnit", "stdout"})


def pilot_text(params: dict) -> str | None:
    """Text no database stores (NUL bytes, lone surrogates): dropped from the free-text
    fields, a reason naming the field for any other (StatusCode 30)."""
    for key, value in params.items():
        if key in FREE_TEXT and isinstance(value, str) and "\x00" in value:
            params[key] = value = value.replace("\x00", "")
        if key in FREE_TEXT and isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                params[key] = value.encode("utf-8", "replace").decode("utf-8")
    reason = bad_text(params)
    return reason and reason.replace("parameter", "field", 1)


def encode_pilot_reply(data: dict, accept: str) -> tuple[str, str]:
    """(Content-Type, body): JSON when the caller's Accept asks for it, else PanDA's
    form encoding (nested values as JSON)."""
    if "json" in accept:
        return "application/json", getattr(data, "json_text", None) or dumps(data)
    return "text/plain; charset=utf-8", urllib.parse.urlencode(
        {k: (dumps(v) if isinstance(v, (dict, list)) else v) for k, v in data.items()})


class ServerApplication(tornado.web.Application):
    """The server's Tornado application: a request over its client's rate limit is answered
    429 (``ratelimit.Throttled``), the pilot protocol's paths go to :class:`PilotCall`."""

    def __init__(self, state, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pilot_state = state

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs):
        limiter = self.pilot_state.limiter
        if limiter is not None:          # every request, before its body and its handler
            try:
                identity = request_identity(request, self.pilot_state)
            except AuthError:            # its handler refuses it; its address is the client
                identity = None
            refusal = limiter.check(request.path, identity, request.remote_ip)
            if refusal is not None:
                return Throttled(request, refusal)
        if request.path.startswith(PREFIX):
            return PilotCall(self.pilot_state, request)
        return super().find_handler(request, **kwargs)


class _Date:
    """The Date header's value, formatted once a second."""
    second = 0
    text = ""

    @classmethod
    def now(cls) -> str:
        t = int(time.time())
        if t != cls.second:
            cls.second, cls.text = t, httputil.format_timestamp(t)
        return cls.text


class PilotCall(httputil.HTTPMessageDelegate):
    """One pilot protocol request: body in, one reply out."""

    _running: set[asyncio.Task] = set()     # strong references until each reply is written

    def __init__(self, state, request: httputil.HTTPServerRequest):
        self.state = state
        self.request = request
        self.chunks: list[bytes] = []
        self.started = time.monotonic()

    def headers_received(self, start_line, headers) -> None:
        return None

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.request.body = b"".join(self.chunks)
        self.chunks = []
        task = asyncio.ensure_future(self._respond())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def on_connection_close(self) -> None:
        self.chunks = []

    async def _respond(self) -> None:
        request = self.request
        method = request.path[len(PREFIX):]
        try:
            if request.method not in ("GET", "POST"):
                status, data = 405, {"StatusCode": 30, "errorDialog":
                                     f"{request.method} is not allowed here: use POST"}
            elif not _METHOD.match(method):
                status, data = 404, {"StatusCode": 30,
                                     "errorDialog": f"unknown method {method[:100]!r}"}
            else:
                if "multipart" in request.headers.get("Content-Type", ""):
                    try:
                        request._parse_body()   # multipart fields into body_arguments
                    except Exception:  # noqa: BLE001 - Tornado logs what it could not parse
                        pass
                status, data = await pilot_call(self.state, method, request)
            ctype, text = encode_pilot_reply(data, request.headers.get("Accept", ""))
        except Exception:  # noqa: BLE001 - a pilot must get a reply, and the log the trace
            log.exception("%s %s failed", request.method, request.path)
            status, ctype = 500, "application/json"
            text = '{"StatusCode": 30, "errorDialog": "internal server error"}'
        body = text.encode() if request.method != "HEAD" else b""
        headers = httputil.HTTPHeaders()
        headers["Content-Type"] = ctype
        headers["Content-Length"] = str(len(body))
        headers["Date"] = _Date.now()
        headers["Server"] = "panda-wms"
        conn = request.connection
        reason = httputil.responses.get(status, "")
        conn.write_headers(httputil.ResponseStartLine("", status, reason), headers, body)
        conn.finish()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%d %s %s (%s) %.2fms", status, request.method, request.uri,
                            request.remote_ip, 1000 * (time.monotonic() - self.started))
