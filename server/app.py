"""The Tornado application: thin handlers over the dispatcher, the API and the monitor.

Handlers decode requests, resolve the caller's identity, run the blocking database work in a
thread pool and encode replies. Nothing here decides anything.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import tornado.web

from .api import REGISTRY, ApiError, Context, Forbidden
from .auth import AuthError, Identity, KeyStore, dn_from_subject, identity_from_dn
from .brokerage import Brokerage
from .db import make_engine
from .dispatcher import SC_FAILED, Dispatcher, ProtocolError
from .dispatchpath import DispatchPath, GeneralPath, Run, in_pool
from .hookspecs import plugin_manager
from .metrics import REQUESTS
from .pghot import HotPath
from .queuedata import queuedata
from .shares import ShareChooser
from .submission import TaskSubmitter
from .taskbuffer import NotFound, TaskBuffer, utcnow

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class ServerState:
    """Everything the handlers share; built once per process."""
    tb: TaskBuffer
    keys: KeyStore
    dispatcher: Dispatcher
    submitter: TaskSubmitter
    executor: ThreadPoolExecutor
    run: Run                         # blocking (database) work in ``executor``, awaitable
    require_auth: bool = True
    admin_dns: frozenset[str] = frozenset()
    pilot_dns: frozenset[str] = frozenset()
    site_loader: Any = None
    started: dt.datetime = field(default_factory=utcnow)
    hook: Any = None                 # the panda.server plugin manager's hook relay


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state

    def run(self, func, *args):
        return self.state.run(func, *args)

    def identity(self) -> Identity | None:
        """The caller: a bearer token's subject, or a verified client certificate's DN."""
        return request_identity(self.request, self.state)

    def body_params(self) -> dict:
        """Form-encoded or JSON body, plus query arguments; last value wins for repeats."""
        return request_params(self.request)


def request_identity(request, state: ServerState) -> Identity | None:
    """The caller of ``request``: a bearer token's subject, or a verified client
    certificate's DN; None when it sent neither (anonymous admin with auth off)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        return state.keys.verify_token(token)
    cert = None
    try:
        cert = request.get_ssl_certificate()
    except Exception:  # noqa: BLE001 - plain http or no certificate
        cert = None
    if cert:
        dn = dn_from_subject(cert.get("subject", ()))
        return identity_from_dn(dn, state.admin_dns, state.pilot_dns)
    if not state.require_auth:
        return Identity("anonymous", "admin")
    return None


def request_params(request) -> dict:
    """Form-encoded or JSON body, plus query arguments; last value wins for repeats.
    Raises HTTPError(400) for a body that is not what its Content-Type says."""
    params: dict[str, Any] = {}
    for key, values in request.query_arguments.items():
        decoded = [v.decode("utf-8", "replace") for v in values]
        params[key] = decoded[-1] if len(decoded) == 1 else decoded
    ctype = request.headers.get("Content-Type", "")
    body = request.body
    if body:
        if "json" in ctype or (not ctype and body[:1] in (b"{", b"[")):
            try:
                data = json.loads(body)
            except ValueError:
                raise tornado.web.HTTPError(400, reason="request body is not valid JSON")
            if not isinstance(data, dict):
                raise tornado.web.HTTPError(400, reason="JSON body must be an object")
            params.update(data)
        elif not ctype or ctype.startswith("application/x-www-form-urlencoded"):
            # straight to text (Tornado's body_arguments are bytes, decoded once more here)
            form: dict[str, list[str]] = {}
            for key, value in urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                                     keep_blank_values=True,
                                                     encoding="utf-8", errors="replace"):
                form.setdefault(key, []).append(value)
            for key, values in form.items():
                params[key] = values[-1] if len(values) == 1 else values
        else:
            for key, values in request.body_arguments.items():
                decoded = [v.decode("utf-8", "replace") for v in values]
                params[key] = decoded[-1] if len(decoded) == 1 else decoded
    return params


PILOT_METHODS = {"getJob": "get_job", "updateJob": "update_job", "getStatus": "get_status",
                 "updateJobsInBulk": None, "getKeyPair": None,
                 "getEventRanges": "get_event_ranges", "updateEventRanges": "update_event_ranges",
                 "updateEventRange": "update_event_ranges"}


async def pilot_call(state: ServerState, method: str, request) -> tuple[int, dict]:
    """``/server/panda/<method>``, PanDA's pilot protocol: (HTTP status, reply). Errors are
    replies with PanDA's StatusCode and an errorDialog; a pilot always gets one."""
    try:
        identity = request_identity(request, state)
    except AuthError as exc:
        return 200, {"StatusCode": exc.status_code, "errorDialog": str(exc)}
    try:
        params = request_params(request)
    except tornado.web.HTTPError as exc:
        return 200, {"StatusCode": SC_FAILED, "errorDialog": exc.reason}
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
    try:
        result = await getattr(state.dispatcher, target)(params, identity)
    except ProtocolError as exc:
        result = {"StatusCode": exc.status_code, "errorDialog": str(exc)}
    except Exception:  # noqa: BLE001 - a pilot must get a reply, and the log the trace
        log.exception("%s failed", method)
        result = {"StatusCode": SC_FAILED, "errorDialog": "internal server error"}
    return 200, result


def encode_pilot_reply(data: dict, accept: str) -> tuple[str, str]:
    """(Content-Type, body): JSON when the caller's Accept asks for it, else PanDA's
    form encoding (nested values as JSON)."""
    if "json" in accept:
        return "application/json", getattr(data, "json_text", None) or dumps(data)
    return "text/plain; charset=utf-8", urllib.parse.urlencode(
        {k: (dumps(v) if isinstance(v, (dict, list)) else v) for k, v in data.items()})


class ApiHandler(BaseHandler):
    """``/api/v1/<module>/<method>``: replies ``{"success", "message", "data"}``."""

    def respond(self, success: bool, message: str = "", data: Any = None) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(dumps({"success": success, "message": message, "data": data}))

    async def get(self, module: str, name: str) -> None:
        await self.handle("GET", module, name)

    async def post(self, module: str, name: str) -> None:
        await self.handle("POST", module, name)

    async def handle(self, http: str, module: str, name: str) -> None:
        method = REGISTRY.get((module, name))
        if method is None:
            self.set_status(403)
            return self.respond(False, f"unknown API method {module}/{name}")
        if http not in method.http:
            self.set_status(405)
            return self.respond(False, f"{module}/{name} takes {' or '.join(method.http)}")
        try:
            identity = self.identity()
        except AuthError as exc:
            self.set_status(403)
            return self.respond(False, str(exc))
        if method.roles is not None:
            if identity is None:
                return self.respond(False, "secure connection required: send "
                                           "'Authorization: Bearer <token>' or a client certificate")
            if identity.role not in method.roles:
                self.set_status(403)
                return self.respond(False, f"role {identity.role} may not call {module}/{name}")
        try:
            params = self.body_params()
        except tornado.web.HTTPError as exc:
            self.set_status(400)
            return self.respond(False, exc.reason)
        REQUESTS.labels("api", f"{module}/{name}").inc()
        st = self.state
        ctx = Context(tb=st.tb, keys=st.keys, submitter=st.submitter, identity=identity,
                      clock=st.tb.clock, site_loader=st.site_loader)
        try:
            data = await self.run(method.func, ctx, params)
        except ApiError as exc:
            return self.respond(False, str(exc))
        except Forbidden as exc:
            self.set_status(403)
            return self.respond(False, str(exc))
        except NotFound as exc:
            return self.respond(False, str(exc))
        except Exception:  # noqa: BLE001
            log.exception("api %s/%s failed", module, name)
            self.set_status(500)
            return self.respond(False, "internal server error")
        self.respond(True, ctx.message, data)


class QueuedataHandler(BaseHandler):
    """``/cache/schedconfig/<site>.all.json``: the queue description pilot 3 reads."""

    async def get(self, site: str) -> None:
        try:
            row = await self.run(self.state.tb.sites.get, site)
        except NotFound:
            raise tornado.web.HTTPError(404, reason=f"unknown site {site}")
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(queuedata(row["config"])))


class MetricsHandler(BaseHandler):
    """``/metrics`` in Prometheus' text format."""

    async def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        from .metrics import render
        body = await self.run(render, self.state.tb)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)


class PublicKeyHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/x-pem-file")
        self.finish(self.state.keys.public_key_pem)


def build_state(db_url: str, key_dir: str, require_auth: bool = True, threads: int = 8,
                clock=utcnow, site_loader=None, admin_dns=(), pilot_dns=(),
                hot_path: bool = True) -> ServerState:
    """``hot_path``: on PostgreSQL, take getJob and common updateJobs on the event loop
    (``server.pghot``); ``threads`` is then also its number of connections per process."""
    engine = make_engine(db_url, pool_size=threads)
    tb = TaskBuffer(engine, clock=clock)
    keys = KeyStore(key_dir)
    pm = plugin_manager()
    executor = ThreadPoolExecutor(threads, thread_name_prefix="db")
    run = in_pool(executor)
    path: DispatchPath = GeneralPath(tb, run)
    if hot_path and tb.dialect == "postgresql":
        path = HotPath(path, size=threads)
    return ServerState(tb=tb, keys=keys,
                       dispatcher=Dispatcher(tb, keys, ShareChooser(tb), path, run),
                       submitter=TaskSubmitter(tb, Brokerage(pm.hook)),
                       executor=executor, run=run,
                       require_auth=require_auth, site_loader=site_loader,
                       admin_dns=frozenset(admin_dns), pilot_dns=frozenset(pilot_dns),
                       hook=pm.hook)


def make_app(state: ServerState) -> tornado.web.Application:
    from . import api_extra, monitor  # noqa: F401 - api_extra registers its API methods

    kw = {"state": state}
    routes = [
        (r"/api/v1/(\w+)/(\w+)", ApiHandler, kw),
        (r"/cache/schedconfig/([A-Za-z0-9_.\-]+?)(?:\.all)?\.json", QueuedataHandler, kw),
        (r"/\.well-known/panda-jobspec-key\.pem", PublicKeyHandler, kw),
        (r"/metrics", MetricsHandler, kw),
    ] + monitor.routes(kw)
    from . import api_panda   # PanDA client / pilot 3 extras: API methods, routes matched first
    routes = api_panda.routes(kw) + routes
    from .pilot_http import ServerApplication
    return ServerApplication(state, routes, compress_response=True)
