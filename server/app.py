"""The server's composition: the state every handler shares, and the Tornado application.

``build_state`` makes the task buffer, the keys, the dispatcher with the dispatch path chosen
for the database (the PostgreSQL hot path or the general path), the submitter and the thread
pool; ``make_app`` routes the pilot protocol (``pilot_http``), the API (its methods from
:data:`API_MODULES`), the caches and the monitor to their handlers.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tornado.web

from . import api, api_auth, api_console, api_extra, api_panda, monitor, rucio_api
from .apibase import registry
from .monitor import api as monitor_api
from .auth import DNMatcher, KeyStore
from .tokens import RevocationList, TrustedIssuer
from .brokerage import Brokerage
from .db import make_engine
from .dispatcher import Dispatcher
from .dispatchpath import DispatchPath, GeneralPath, in_pool
from .handlers import (ApiHandler, AuthConfigHandler, MetricsHandler, OpenApiHandler,
                       PilotFilesHandler, PublicKeyHandler, QueuedataHandler, ServerState,
                       TokenKeysHandler, dumps)
from .openapi import openapi_document
from .hookspecs import plugin_manager
from .metrics import observe_request
from .pilot_http import ServerApplication
from .pilotstore import RECORDS_DIR, PilotFiles, Signer
from .ratelimit import RateLimiter, RateLimits
from .shares import ShareChooser
from .submission import TaskSubmitter
from .taskbuffer import TaskBuffer, utcnow

MAX_BODY_BYTES = 16 * 1024 * 1024
#: the modules whose API methods ``/api/v1`` serves
API_MODULES = (api, api_panda, api_extra, api_auth, api_console, monitor_api)
#: threads per process for the bulk API methods (``ServerState.bulk_run``); their database
#: connections come from the engine's overflow, beyond the ``threads`` of the pilots' requests
BULK_THREADS = 2


def build_state(db_url: str, key_dir: str, require_auth: bool = True, threads: int = 8,
                clock=utcnow, site_loader=None, admin_dns=(), pilot_dns=(),
                hot_path: bool = True, token_issuer: str | None = None,
                trusted_issuers: tuple[TrustedIssuer, ...] = (), pilot_dir: str | None = None,
                pilot_version: str | None = None,
                pilot_wheels: tuple[str, ...] = (),
                share_counts_s: float = 2.0,
                rate_limits: RateLimits | None = None) -> ServerState:
    """``hot_path``: on PostgreSQL, take getJob and common updateJobs on the event loop
    (``server.pghot``); ``threads`` is then also its number of connections per process.
    ``token_issuer``: the ``iss`` of this server's tokens (kept in the key dir);
    ``trusted_issuers``: external OIDC providers whose tokens are accepted (their keys are
    fetched here, once; ``panda server`` refreshes them and the revocation list).
    ``pilot_dir``: where the one-file pilot's versions are kept (default ``<key_dir>/pilot``,
    beside the key that signs them; their build records are kept in ``<key_dir>/pilot-built``);
    ``pilot_version`` the one factories run by default; ``pilot_wheels``: psutil's wheels for
    the other platforms the file serves (server/pilotfile.py); ``share_counts_s``: how old the
    counter snapshot the share ranking orders by may be (``ShareChooser``'s ``ttl_s``);
    ``rate_limits``: the per-client request rate limits of this process (None: none)."""
    engine = make_engine(db_url, pool_size=threads)
    tb = TaskBuffer(engine, clock=clock)
    revoked = RevocationList(tb.revoked_tokens.active)
    keys = KeyStore(key_dir, issuer=token_issuer, trusted=trusted_issuers, revoked=revoked)
    revoked.refresh()
    keys.tokens.refresh_all()
    pm = plugin_manager()
    from .quotas import QuotaPolicy      # over-quota users' waiting jobs yield at dispatch
    pm.register(QuotaPolicy(tb), name="quotas")
    executor = ThreadPoolExecutor(threads, thread_name_prefix="db")
    run = in_pool(executor)
    bulk = ThreadPoolExecutor(BULK_THREADS, thread_name_prefix="bulk")
    path: DispatchPath = GeneralPath(tb, run)
    if hot_path and tb.dialect == "postgresql":
        from .pghot import HotPath     # psycopg (the 'postgres' extra): only on PostgreSQL
        path = HotPath(path, size=threads)
    return ServerState(tb=tb, keys=keys,
                       dispatcher=Dispatcher(tb, keys, ShareChooser(tb, ttl_s=share_counts_s),
                                             path, run),
                       submitter=TaskSubmitter(tb, Brokerage(pm.hook)),
                       executor=executor, run=run, bulk_run=in_pool(bulk),
                       require_auth=require_auth, site_loader=site_loader,
                       admin_dns=DNMatcher(admin_dns), pilot_dns=DNMatcher(pilot_dns),
                       hook=pm.hook,
                       limiter=RateLimiter(rate_limits) if rate_limits is not None else None,
                       pilot_files=PilotFiles(pilot_dir or Path(key_dir) / "pilot",
                                              Signer(keys.signing_key), pilot_version,
                                              records=Path(key_dir) / RECORDS_DIR,
                                              wheels=pilot_wheels))


def make_app(state: ServerState) -> tornado.web.Application:
    kw = {"state": state}
    methods = registry(API_MODULES)
    routes = [
        *api_panda.routes(kw),     # PanDA client / pilot 3 extras, before the generic API route
        (r"/api/v1/openapi\.json", OpenApiHandler,
         {**kw, "document": dumps(openapi_document(methods))}),
        (r"/api/v1/(\w+)/(\w+)", ApiHandler, {**kw, "methods": methods}),
        (r"/cache/schedconfig/([A-Za-z0-9_.\-]+?)(?:\.all)?\.json", QueuedataHandler, kw),
        (r"/\.well-known/panda-jobspec-key\.pem", PublicKeyHandler, kw),
        (r"/\.well-known/(jwks\.json|openid-configuration)", TokenKeysHandler, kw),
        (r"/auth/([A-Za-z0-9_.\-]{1,64})_auth_config\.json", AuthConfigHandler, kw),
        (r"/metrics", MetricsHandler, kw),
        (r"/pilot/?", PilotFilesHandler, kw),
        (r"/pilot/([0-9A-Za-z][0-9A-Za-z._-]{0,63})/(panda-pilot\.pyz(?:\.sig)?)",
         PilotFilesHandler, kw),
        *monitor.routes(kw),
        *rucio_api.routes(kw),     # Rucio's REST API for pilot 3's replica look-ups
    ]
    return ServerApplication(state, routes, compress_response=True, log_function=observe_request)
