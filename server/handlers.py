"""The server's HTTP handlers, over one base that knows who calls, with which role and which
parameters, and how a refusal or a failure becomes the reply.

:class:`BaseHandler` is written once for every handler: ``caller(roles, what)`` resolves the
identity (a bearer token's subject or a verified certificate's DN) and checks its role,
``params`` reads the body and query, and ``write_error`` turns what a handler raises into the
reply (``refusal``): an ``ApiError`` says why with its status, a bad credential is a 403, an
unknown object a 404 (success=false for the API), a bad body a 400, a transient database
failure (``server.transient``) a 503 with Retry-After, anything else a 500 whose trace goes to
the log. Handlers with ``json_errors`` reply the API's
``{"success": false, "message", "data"}``; the others Tornado's error page.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from tornado import httputil

from .apibase import ApiError, Context, Forbidden, Method
from .auth import AuthError, DNMatcher, Identity, KeyStore, identity_from_certificate
from .dispatcher import Dispatcher
from .dispatchpath import Run
from .metrics import REQUESTS
from .pilotfile import FILE_NAME, PilotFileError
from .pilotstore import PilotFiles, PilotFileUnvouched
from .queuedata import signed_queuedata
from .ratelimit import RateLimiter
from .submission import TaskSubmitter
from .taskbuffer import NotFound, TaskBuffer, utcnow
from .transient import (BAD_VALUE_MESSAGE, MESSAGE as TRANSIENT_MESSAGE, RETRY_AFTER_S,
                        describe, is_bad_value, is_transient)

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything the handlers share; built once per process (``app.build_state``)."""
    tb: TaskBuffer
    keys: KeyStore
    dispatcher: Dispatcher
    submitter: TaskSubmitter
    executor: ThreadPoolExecutor
    run: Run                         # blocking (database) work in ``executor``, awaitable
    require_auth: bool = True
    admin_dns: DNMatcher = field(default_factory=DNMatcher)
    pilot_dns: DNMatcher = field(default_factory=DNMatcher)
    site_loader: Any = None
    started: dt.datetime = field(default_factory=utcnow)
    hook: Any = None                 # the panda.server plugin manager's hook relay
    pilot_files: PilotFiles | None = None   # the one-file pilot's versions (server/pilotfile.py)
    # bulk API methods (task submission: thousands of rows, minutes under load) run here, on
    # a few threads of their own: on ``run`` twenty 5,000-job tasks took every thread and
    # the pilots' updateJobs waited behind them (panda simulate, docs/simulate.md)
    bulk_run: Run | None = None
    limiter: RateLimiter | None = None   # the per-client rate limit (server/ratelimit.py)


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


def request_identity(request, state: ServerState) -> Identity | None:
    """The caller of ``request``: a bearer token's subject, or a verified client
    certificate's DN; None when it sent neither (anonymous admin with auth off). Found once
    per request (the rate limit asks before the handler does); AuthError for a bad credential,
    every time it is asked."""
    found = getattr(request, "_panda_identity", _UNKNOWN)
    if found is _UNKNOWN:
        try:
            found = _identity(request, state)
        except AuthError as exc:
            found = exc
        request._panda_identity = found
    if isinstance(found, AuthError):
        raise AuthError(str(found), found.status_code)
    return found


_UNKNOWN = object()


def _identity(request, state: ServerState) -> Identity | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        return state.keys.verify_token(token)
    der = None
    try:
        der = request.get_ssl_certificate(binary_form=True)
    except Exception:  # noqa: BLE001 - plain http or no certificate
        der = None
    if der:     # verified by the TLS handshake against --ca; its subject as a structured name
        return identity_from_certificate(der, state.admin_dns, state.pilot_dns)
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
            except RecursionError:
                data = None
            if data is None or json_depth(data) > MAX_JSON_DEPTH:
                raise tornado.web.HTTPError(400, reason=f"JSON body nested deeper than "
                                            f"{MAX_JSON_DEPTH} levels")
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


#: how deep a JSON body may nest (a task description needs about 6 levels); deeper bodies
#: are refused before anything walks them recursively
MAX_JSON_DEPTH = 64


def json_depth(data: Any) -> int:
    """How deep ``data`` (decoded JSON) nests, counted without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return depth
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict)
                                                  else value))
    return deepest


def bad_text(params: dict) -> str | None:
    """The first parameter whose text (at any depth) holds a NUL byte, which no database
    column stores (PostgreSQL refuses it), or a lone surrogate, which is no Unicode text and
    cannot be stored or encoded: its reason, or None."""
    stack = [(k, v) for k, v in params.items()]
    while stack:
        key, value = stack.pop()
        if isinstance(key, str) and not _clean(key):
            return f"a parameter name holds a NUL byte or a lone surrogate: {key[:40]!r}"
        if isinstance(value, str):
            if not _clean(value):
                return (f"parameter {key!r} holds a NUL byte or a lone surrogate (not "
                        "storable text)")
        elif isinstance(value, dict):
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
    return None


def _clean(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class BaseHandler(tornado.web.RequestHandler):
    json_errors = False      # errors as the API's JSON reply, not Tornado's error page

    def initialize(self, state: ServerState) -> None:
        self.state = state

    def run(self, func, *args):
        """Blocking (database) work in the thread pool; awaitable."""
        return self.state.run(func, *args)

    def caller(self, roles: tuple[str, ...] | None, what: str) -> Identity | None:
        """The caller, who must have one of ``roles`` (None: anyone, even without an
        identity) to ``what`` (for the refusal's message)."""
        identity = request_identity(self.request, self.state)
        if roles is not None:
            if identity is None:
                raise ApiError(f"an identity is required to {what}: the request carried "
                               "no bearer token and no client certificate (secure connection "
                               "required: send 'Authorization: Bearer <token>', a token from "
                               "'panda token issue', or a client certificate)")
            if identity.role not in roles:
                raise Forbidden(f"role {identity.role} may not {what}")
        return identity

    @functools.cached_property
    def params(self) -> dict:
        """Form-encoded or JSON body, plus query arguments (:func:`request_params`); text
        that no database stores (NUL, lone surrogates) is refused here (400)."""
        params = request_params(self.request)
        reason = bad_text(params)
        if reason:
            raise ApiError(reason, 400)
        return params

    def reply(self, success: bool, message: str = "", data: Any = None,
              status: int = 200) -> None:
        """The API's reply: ``{"success", "message", "data"}``."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(dumps({"success": success, "message": message, "data": data}))

    def refusal(self, exc: BaseException | None) -> tuple[int, str] | None:
        """(HTTP status, message) when ``exc`` refuses the request; None for a failure."""
        if isinstance(exc, ApiError):
            return exc.status, str(exc)
        if isinstance(exc, AuthError):
            return 403, str(exc)
        if isinstance(exc, NotFound):
            return (200 if self.json_errors else 404), str(exc)
        if isinstance(exc, tornado.web.HTTPError):
            return exc.status_code, exc.reason or httputil.responses.get(exc.status_code, "")
        if is_transient(exc):       # the server's own retries are used up: later, not never
            return 503, TRANSIENT_MESSAGE
        if is_bad_value(exc):       # what the parameter checks let through, the database not
            return 400, BAD_VALUE_MESSAGE
        return None

    def log_exception(self, typ, value, tb) -> None:
        """Refusals are the caller's business, not the log's; failures keep their trace; a
        transient database failure is one line (its tries were logged already)."""
        if is_transient(value):
            log.warning("%s %s: %s; answered 503", self.request.method, self.request.path,
                        describe(value))
        elif is_bad_value(value):
            log.info("%s %s: refused a value: %s", self.request.method, self.request.path,
                     describe(value))
        elif isinstance(value, tornado.web.HTTPError) or self.refusal(value) is None:
            super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        refusal = self.refusal(exc)
        if refusal is None:       # a failure (logged with its trace), or Tornado's own error
            refusal = (status_code, "internal server error" if status_code >= 500
                       else self._reason or "bad request")
        status, message = refusal
        if status == 503:
            self.set_header("Retry-After", str(RETRY_AFTER_S))
        if self.json_errors:
            self.reply(False, message, data=getattr(exc, "data", None), status=status)
            return
        if status != self.get_status():
            self.set_status(status)
        super().write_error(status, **kwargs)


class ApiHandler(BaseHandler):
    """``/api/v1/<module>/<method>``: the registry's methods (``methods``)."""
    json_errors = True
    metrics_kind = "api"

    def initialize(self, state: ServerState, methods: dict[tuple[str, str], Method]) -> None:
        super().initialize(state)
        self.methods = methods

    async def get(self, module: str, name: str) -> None:
        await self.call("GET", module, name)

    async def post(self, module: str, name: str) -> None:
        await self.call("POST", module, name)

    async def call(self, http: str, module: str, name: str) -> None:
        method = self.methods.get((module, name))
        if method is None:
            raise Forbidden(f"unknown API method {module}/{name}")
        if http not in method.http:
            raise ApiError(f"{module}/{name} takes {' or '.join(method.http)}", 405)
        self.endpoint = f"{module}/{name}"           # the latency histogram's label
        identity = self.caller(method.roles, f"call {module}/{name}")
        params = method.checked(self.params)        # the declared parameters (400 if not)
        REQUESTS.labels("api", f"{module}/{name}").inc()
        st = self.state
        ctx = Context(tb=st.tb, keys=st.keys, submitter=st.submitter, identity=identity,
                      clock=st.tb.clock, site_loader=st.site_loader)
        run = st.bulk_run if method.bulk and st.bulk_run is not None else self.run
        data = await run(method.func, ctx, params)
        self.reply(True, ctx.message, data)


class QueuedataHandler(BaseHandler):
    """``/cache/schedconfig/<site>.all.json``: the queue description pilot 3 reads."""

    async def get(self, site: str) -> None:
        try:
            row = await self.run(self.state.tb.sites.get, site)
        except NotFound:
            raise tornado.web.HTTPError(404, reason=f"unknown site {site}")
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(signed_queuedata(row["config"], self.state.keys.sign_canonical)))


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


class PilotFilesHandler(BaseHandler):
    """``/pilot/``: the one-file pilot's versions (JSON: ``default``, ``versions``), and
    ``/pilot/<version>/panda-pilot.pyz[.sig]``: the file and its detached signature. Public,
    like the queue description: what protects a node is the signature, not secrecy."""

    def _files(self) -> PilotFiles:
        if self.state.pilot_files is None:
            raise tornado.web.HTTPError(404, reason="this server serves no pilot file")
        return self.state.pilot_files

    async def get(self, version: str | None = None, name: str | None = None) -> None:
        files = self._files()
        try:
            if version is None:
                default = await self.run(files.default)
                infos = await self.run(files.versions)
                self.set_header("Content-Type", "application/json")
                self.finish(dumps({"default": default,
                                   "versions": [i.to_dict() for i in infos]}))
                return
            data = await self.run(files.read, version, name != FILE_NAME)
        except PilotFileUnvouched as exc:      # stored, but not signed by the current key
            raise tornado.web.HTTPError(409, reason=_one_line(exc)) from None
        except PilotFileError as exc:
            raise tornado.web.HTTPError(404, reason=_one_line(exc)) from None
        except OSError as exc:       # the pilot dir cannot be written or read: the operator's
            log.error("pilot file: %s", exc)
            raise tornado.web.HTTPError(503, reason="the pilot file is not available here: "
                                        f"{exc.strerror or exc}"[:200]) from None
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Cache-Control", "public, max-age=31536000, immutable")
        self.finish(data)


def _one_line(exc: BaseException) -> str:
    """An error as an HTTP reason phrase: one line, at most 400 characters."""
    return " ".join(str(exc).split())[:400]


class TokenKeysHandler(BaseHandler):
    """``/.well-known/jwks.json`` (the keys that verify this server's tokens) and
    ``/.well-known/openid-configuration`` (where a relying party finds them)."""

    def get(self, what: str) -> None:
        tokens = self.state.keys.tokens
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "max-age=300")
        if what == "jwks.json":
            self.finish(dumps(tokens.jwks()))
        else:
            # an issuer that is a URL is where this server is published; else the request's
            # own address (never a Host header's idea of it for an https issuer)
            base = tokens.issuer if tokens.issuer.startswith("https://") else \
                f"{self.request.protocol}://{self.request.host}"
            self.finish(dumps(tokens.openid_configuration(base)))


class AuthConfigHandler(BaseHandler):
    """``/auth/<vo>_auth_config.json``: panda-client's login document, pointing its device-code
    flow at the OIDC provider the server's ``--token-issuers`` file names for that VO."""

    def get(self, vo: str) -> None:
        doc = self.state.keys.tokens.auth_config(vo)
        if doc is None:
            self.set_status(404)
            self.set_header("Content-Type", "application/json")
            self.finish(dumps({"error": f"no login configured for VO {vo!r} (the server's "
                                        "--token-issuers file names none with this vo)"}))
            return
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(doc))


class OpenApiHandler(BaseHandler):
    """``/api/v1/openapi.json``: the API's OpenAPI 3 document, made once (``app.make_app``)
    from the declarations the API handler checks (``server/openapi.py``)."""

    def initialize(self, state: ServerState, document: str) -> None:
        super().initialize(state)
        self.document = document

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(self.document)
