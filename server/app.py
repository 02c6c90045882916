"""The server's composition: the state every handler shares, and the Tornado application.

``build_state`` makes the task buffer, the keys, the dispatcher with the dispatch path chosen
for the database (the PostgreSQL hot path or the general path), the submitter and the thread
pool; ``make_app`` routes the pilot protocol (``pilot_http``), the API (its methods from
:data:`API_MODULES`), the caches and the monitor to their handlers.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import tornado.web

from . import api, api_extra, api_panda, monitor
from .apibase import registry
from .monitor import api as monitor_api
from .auth import DNMatcher, KeyStore
from .brokerage import Brokerage
from .db import make_engine
from .dispatcher import Dispatcher
from .dispatchpath import DispatchPath, GeneralPath, in_pool
from .handlers import ApiHandler, MetricsHandler, PublicKeyHandler, QueuedataHandler, ServerState
from .hookspecs import plugin_manager
from .metrics import observe_request
from .pghot import HotPath
from .pilot_http import ServerApplication
from .shares import ShareChooser
from .submission import TaskSubmitter
from .taskbuffer import TaskBuffer, utcnow

MAX_BODY_BYTES = 16 * 1024 * 1024
#: the modules whose API methods ``/api/v1`` serves
API_MODULES = (api, api_panda, api_extra, monitor_api)


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
                       admin_dns=DNMatcher(admin_dns), pilot_dns=DNMatcher(pilot_dns),
                       hook=pm.hook)


def make_app(state: ServerState) -> tornado.web.Application:
    kw = {"state": state}
    routes = [
        *api_panda.routes(kw),     # PanDA client / pilot 3 extras, before the generic API route
        (r"/api/v1/(\w+)/(\w+)", ApiHandler, {**kw, "methods": registry(API_MODULES)}),
        (r"/cache/schedconfig/([A-Za-z0-9_.\-]+?)(?:\.all)?\.json", QueuedataHandler, kw),
        (r"/\.well-known/panda-jobspec-key\.pem", PublicKeyHandler, kw),
        (r"/metrics", MetricsHandler, kw),
        *monitor.routes(kw),
    ]
    return ServerApplication(state, routes, compress_response=True, log_function=observe_request)
