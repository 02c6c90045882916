"""``panda server``, ``panda db`` and ``panda token``."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: how long a stopping server waits for requests in flight before it exits anyway
SHUTDOWN_GRACE_S = 10.0
REVOCATION_REFRESH_S = 5.0

DEFAULT_HOME = Path(os.environ.get("PANDA_HOME", Path.home() / ".panda"))
DEFAULT_DB = f"sqlite:///{DEFAULT_HOME / 'panda.db'}"
DEFAULT_KEYS = DEFAULT_HOME / "keys"


def _shown(db_url: str) -> str:
    """A database URL as it may be printed: no user name or password."""
    if "@" not in db_url:
        return db_url
    scheme, sep, rest = db_url.partition("://")
    return f"{scheme}://{rest.split('@')[-1]}" if sep else db_url.split("@")[-1]


def _share_counts_s(text: str) -> float:
    """argparse type: the share ranking's counter snapshot lifetime, 0.05 .. 60 seconds."""
    value = float(text)
    if not 0.05 <= value <= 60:          # also refuses nan
        raise argparse.ArgumentTypeError(f"must be from 0.05 to 60 seconds, not {text}")
    return value


#: the bounds of the rate limit options (server/ratelimit.py)
MAX_RATE = 1e6
MAX_BURST = 10_000_000
CLIENTS_RANGE = (100, 10_000_000)


def _rate(text: str) -> float:
    """argparse type: requests per second, 0 (no limit) or 0.01 .. MAX_RATE."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value == 0 or 0.01 <= value <= MAX_RATE):      # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be requests per second from 0.01 to "
                                         f"{MAX_RATE:.0f}, or 0 for no limit, not {text[:40]!r}")
    return value


def _int_in(low: int, high: int, what: str):
    """argparse type: a whole number from ``low`` to ``high`` (``what`` it counts)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number of {what} from {low} to "
                                             f"{high}, not {text[:40]!r}")
        return value
    return parse


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the ValueError into exit code 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _pilot_version(text: str) -> str:
    from .pilotfile import VERSION_RE
    if not VERSION_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a pilot file version: {text[:80]!r}")
    return text


def _server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panda server", description="Run the PanDA server.")
    p.add_argument("--db", default=os.environ.get("PANDA_DB", DEFAULT_DB),
                   help="SQLAlchemy database URL (default: %(default)s; env PANDA_DB)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=25080)
    p.add_argument("--processes", type=int, default=1,
                   help="server processes sharing the port (0: one per core)")
    p.add_argument("--threads", type=int, default=8,
                   help="database threads per process; on PostgreSQL also the event loop's "
                   "connections for the pilots' hot path")
    p.add_argument("--behind-proxy", action="store_true",
                   help="trust X-Real-Ip / X-Forwarded-For and X-Scheme from a reverse proxy in "
                   "front of the server (off: the peer's address is the client's)")
    p.add_argument("--idle-timeout", type=float, default=60, metavar="S",
                   help="close a connection that has not sent a whole request head within S "
                   "seconds of its accept or its last reply (slow or silent clients)")
    p.add_argument("--body-timeout", type=float, default=300, metavar="S",
                   help="close a connection whose request body took longer than S seconds")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="client connections per process (default and upper bound: the "
                   "open-file limit, raised to the hard limit at start, less a reserve)")
    p.add_argument("--share-counts-s", type=_share_counts_s, default=2.0, metavar="S",
                   help="how old the job counters the share ranking orders by may be, in "
                   "seconds (default %(default)s: one read per process every S s for every site; "
                   "docs/shares.md)")
    burst = _int_in(1, MAX_BURST, "requests")
    p.add_argument("--rate-limit-pilot", type=_rate, default=5000.0, metavar="R",
                   help="requests/s each pilot identity (token subject and site, or DN) may "
                   "send to one server process on average; also each address reading what "
                   "pilots read without a token, /cache/, /pilot, /rucio/ (default %(default)g: "
                   "above what a process dispatches; 0: no limit; docs/server.md)")
    p.add_argument("--rate-limit-pilot-burst", type=burst, default=10000, metavar="N",
                   help="requests a pilot identity may send at once (default %(default)s)")
    p.add_argument("--rate-limit-api", type=_rate, default=20.0, metavar="R",
                   help="requests/s each user identity, or each address without one (IPv6: "
                   "its /64), may send to one server process: the API, the monitor, the "
                   "rest (default %(default)g; 0: no limit)")
    p.add_argument("--rate-limit-api-burst", type=burst, default=200, metavar="N",
                   help="requests a user or an address may send at once (default %(default)s)")
    p.add_argument("--rate-limit-exempt", action="append", default=[], metavar="SUBJECT",
                   help="a token subject or certificate DN (as the server writes it, "
                   "/O=org/CN=name) never rate limited (repeatable)")
    p.add_argument("--rate-limit-admins", action="store_true",
                   help="hold admins to the API's limit too (default: admins are not limited)")
    p.add_argument("--rate-limit-clients", type=_int_in(*CLIENTS_RANGE, "clients"),
                   default=20000, metavar="N",
                   help="clients each kind of limit remembers per process (default %(default)s, "
                   "about 6 MB; past it the least recently seen is forgotten)")
    p.add_argument("--no-hot-path", dest="hot_path", action="store_false",
                   help="PostgreSQL: run getJob and updateJob through the thread pool like "
                   "everything else (docs/server.md, 'A hot path for the pilots on PostgreSQL')")
    p.add_argument("--key-dir", default=str(DEFAULT_KEYS),
                   help="token secret and job-spec signing key (created if missing)")
    p.add_argument("--site-configs", metavar="DIR",
                   help="load the site configs of DIR at start (as 'panda sites sync' does)")
    p.add_argument("--pilot-dir", metavar="DIR",
                   help="where the one-file pilot's versions are kept (default: KEY_DIR/pilot)")
    p.add_argument("--pilot-version", metavar="VERSION", type=_pilot_version,
                   help="the pilot file version factories run by default (default: the one "
                        "this server builds from its own code)")
    p.add_argument("--pilot-wheel", action="append", default=[], metavar="PATH",
                   help="psutil's abi3 wheel for another platform the pilot file serves (a "
                        ".whl, or a folder of them; repeatable): 'pip download --no-deps "
                        "--only-binary=:all: --platform manylinux2014_aarch64 psutil==<the "
                        "server's psutil>' (docs/pilot.md)")
    p.add_argument("--no-auth", action="store_true",
                   help="development only: treat anonymous callers as admin")
    p.add_argument("--certfile", help="TLS certificate (enables https and X.509 client auth)")
    p.add_argument("--keyfile", help="TLS private key")
    p.add_argument("--ca", help="CA bundle or directory to verify client certificates")
    p.add_argument("--scope-policy", choices=("claim", "registered"), default="claim",
                   help="who may write a scope that is not registered (scope/add): 'claim' (the "
                   "first account that writes it owns it), 'registered' (nobody but admins); "
                   "user.<name> is always the account <name>'s")
    p.add_argument("--admin-dn", action="append", default=[], help="certificate DN with admin role: RFC 4514 (CN=x,O=org) or the grid's "
                   "/O=org/CN=x (a '/' inside a value escaped as '\\/'); compared as a structured "
                   "name")
    p.add_argument("--pilot-dn", action="append", default=[], help="certificate DN with pilot role (as --admin-dn)")
    p.add_argument("--token-issuer", metavar="URL",
                   help="the 'iss' of this server's tokens, best its public https URL (kept in "
                        "the key dir for 'panda token'; default: what the key dir says, else "
                        "'panda-wms')")
    p.add_argument("--token-issuers", metavar="FILE",
                   help="YAML/JSON file of external OIDC token issuers to trust, their groups "
                        "mapped to roles (docs/security.md)")
    p.add_argument("--archive-after", type=float, default=3 * 24 * 3600, metavar="S",
                   help="archive finished/failed/cancelled jobs S seconds after they ended")
    p.add_argument("--archive-interval", type=float, default=600, metavar="S",
                   help="how often the first server process archives (0: never)")
    p.add_argument("--archive-retention-months", type=_positive_int, default=None, metavar="N",
                   help="drop archived jobs (with files and history) a whole month at a time "
                        "once the month is more than N months old (default: keep all)")
    p.add_argument("--watcher-interval", type=float, default=60, metavar="S",
                   help="run the watcher, data service and priority recompute every S seconds "
                        "in each process (0: never)")
    p.add_argument("--heartbeat-timeout", type=float, default=6 * 3600, metavar="S",
                   help="fail a starting/running job silent for S seconds (code 100)")
    p.add_argument("--sent-timeout", type=float, default=3600, metavar="S",
                   help="fail a job sent to a pilot that never reported for S seconds (102)")
    p.add_argument("--holding-timeout", type=float, default=6 * 3600, metavar="S",
                   help="release a job stuck in holding for S seconds (103)")
    p.add_argument("--transferring-timeout", type=float, default=12 * 3600, metavar="S",
                   help="release a job stuck in transferring for S seconds (104)")
    p.add_argument("--walltime-overrun", type=float, default=2.0, metavar="FACTOR",
                   help="fail a running job after FACTOR x its wall time + 1 h although its "
                        "pilot still beats (code 105; 0: never)")
    p.add_argument("--site-test-threshold", type=float, default=0.5, metavar="SHARE",
                   help="set a site to 'test' when this share of its jobs ended in the last "
                        "--site-test-window failed for site reasons (0: never; docs/watcher.md)")
    p.add_argument("--site-test-window", type=float, default=3600, metavar="S")
    p.add_argument("--site-test-min-jobs", type=int, default=5, metavar="N",
                   help="judge a site only once it ended at least N jobs in the window")
    p.add_argument("--data-mover", default="local,http,xrootd",
                   help="data movers in order of preference, entry points of panda.datamovers, "
                        "comma-separated ('none': no data service)")
    p.add_argument("--data-mover-option", action="append", default=[], metavar="MOVER.KEY=VALUE",
                   help="an option of one data mover, e.g. http.token_file=/etc/panda/se.token, "
                        "http.ca_bundle=..., xrootd.tpc=only (repeatable; docs/dataservice.md)")
    p.add_argument("--transfer-timeout", type=float, default=600, metavar="S",
                   help="deadline of one copy by the data service (a hung transfer is killed)")
    p.add_argument("--transfer-give-up", type=float, default=12 * 3600, metavar="S",
                   help="fail a job whose inputs (or aggregated outputs) could not be placed "
                        "within S seconds (ddm error 100 / 200)")
    p.add_argument("--ops-interval", type=float, default=60, metavar="S",
                   help="how often the first server process runs the monitor's operations: "
                        "history snapshot, job duration alarms, alarm notifications (0: never)")
    p.add_argument("--snapshot-interval", type=float, default=900, metavar="S",
                   help="one operations-history snapshot every S seconds")
    p.add_argument("--duration-limit", action="append", default=[], metavar="STATE=HOURS",
                   help="alarm on jobs longer than HOURS in STATE (repeatable; 0: no alarm; "
                        "docs/monitor.md has the defaults)")
    p.add_argument("--alarm-smtp", metavar="HOST[:PORT]",
                   help="send alarm e-mails through this SMTP server")
    p.add_argument("--alarm-mail-from", default="panda-monitor@localhost")
    p.add_argument("--alarm-mail-to", action="append", default=[], metavar="ADDRESS",
                   help="who gets alarm e-mails (repeatable)")
    p.add_argument("--alarm-webhook", metavar="URL", help="POST each new alarm as JSON here")
    p.add_argument("--notify-smtp", metavar="HOST[:PORT]",
                   help="send users' task notifications (a task's 'notify') through this SMTP "
                        "server (default: --alarm-smtp)")
    p.add_argument("--notify-mail-from", default="panda@localhost")
    p.add_argument("--notify-webhook-allow", action="append", default=[], metavar="HOST[:PORT]",
                   help="hosts users' task webhooks may call (repeatable; default: none)")
    p.add_argument("--monitor-url", metavar="URL",
                   help="the monitor's public base URL, for links in alarm messages")
    p.add_argument("--shares", metavar="FILE",
                   help="global shares tree (YAML/JSON) to install at start")
    p.add_argument("--log-level", default=None)
    return p


def _rate_limits(args):
    """The per-client rate limits of each process from the command line (the values were
    checked by argparse)."""
    from .ratelimit import Limit, RateLimits
    limits = RateLimits(pilot=Limit(args.rate_limit_pilot, args.rate_limit_pilot_burst),
                        api=Limit(args.rate_limit_api, args.rate_limit_api_burst),
                        exempt=frozenset(args.rate_limit_exempt),
                        limit_admins=args.rate_limit_admins,
                        max_clients=args.rate_limit_clients)
    log.info("rate limits per client and process: pilots %s, API %s",
             limits.pilot.describe(), limits.api.describe())
    return limits


def _ops_config(args):
    """The monitor's operations settings from the command line (ValueError: a bad one)."""
    from .mail import SmtpServer
    from .monitor.notify import NotifyConfig
    from .monitor.operations import DurationLimits, OpsConfig

    smtp = SmtpServer.parse(args.alarm_smtp, "--alarm-smtp") if args.alarm_smtp else None
    if args.notify_smtp:
        SmtpServer.parse(args.notify_smtp, "--notify-smtp")     # refused at start, not per mail
    if args.snapshot_interval <= 0:
        raise ValueError("--snapshot-interval must be > 0")
    limits = DurationLimits.parse(args.duration_limit)
    return OpsConfig(interval_s=args.ops_interval, snapshot_interval_s=args.snapshot_interval,
                     limits=limits,
                     notify=NotifyConfig(smtp=smtp, mail_from=args.alarm_mail_from,
                                         mail_to=tuple(args.alarm_mail_to),
                                         webhook_url=args.alarm_webhook,
                                         monitor_url=args.monitor_url))


def _notify_config(args):
    """Users' task notifications from the command line (the SMTP host checked by _ops_config)."""
    from .mail import SmtpServer
    from .notifications import NotificationConfig

    option, value = ("--notify-smtp", args.notify_smtp) if args.notify_smtp else \
        ("--alarm-smtp", args.alarm_smtp)
    return NotificationConfig(smtp=SmtpServer.parse(value, option) if value else None,
                              mail_from=args.notify_mail_from,
                              webhook_allow=tuple(args.notify_webhook_allow),
                              monitor_url=args.monitor_url)


def load_site_dir(path: str) -> list[dict]:
    """Load and validate a site-config folder; broken files are logged and skipped."""
    from site_configs import load_dir

    configs, errors = load_dir(path)
    for err in errors:
        log.error("site config: %s", err)
    return [c.to_dict() for c in configs]


def validate_site_dicts(configs: list[dict]) -> tuple[list[dict], list[str]]:
    """For site/sync: check posted configs against the schema; returns (valid, errors)."""
    try:
        from site_configs import validate_dict
    except ImportError:   # schema module not available: accept as posted
        return configs, []
    good, errors = [], []
    for cfg in configs:
        try:
            good.append(validate_dict(cfg, source=f"posted site {cfg.get('name', '?')!r}"))
        except Exception as exc:  # noqa: BLE001 - ConfigError and friends: report, keep going
            errors.append(str(exc))
    return good, errors


def _ssl_options(args):
    if not args.certfile:
        return None
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.certfile, args.keyfile)
    if args.ca:
        if os.path.isdir(args.ca):
            ctx.load_verify_locations(capath=args.ca)
        else:
            ctx.load_verify_locations(cafile=args.ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _check_pilot_files(files) -> None:
    try:
        files.check_all()
    except Exception:  # noqa: BLE001 - a background task: log it, the server runs on
        log.exception("checking the stored pilot files")


def _stop_children_with_parent() -> None:
    """In the parent of ``--processes N``: pass SIGTERM/SIGINT on to the worker processes.

    Tornado's fork_processes parent only waits for its children; killed by default it would
    leave them running, still bound to the port. The children install their own handlers
    after the fork.
    """
    def _forward(signum, _frame):
        import psutil

        children = psutil.Process().children()
        for child in children:
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=15)
        os._exit(0)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)


def main(argv: list[str]) -> int:
    from panda_core.logs import setup_logging

    args = _server_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.max_connections is not None and args.max_connections < 1:
        sys.stderr.write("panda server: --max-connections must be >= 1\n")
        return 1
    for opt in ("idle_timeout", "body_timeout"):
        if not getattr(args, opt) > 0:
            sys.stderr.write(f"panda server: --{opt.replace('_', '-')} must be > 0\n")
            return 1
    import tornado.httpserver
    import tornado.netutil
    import tornado.process
    from tornado.ioloop import IOLoop

    from .app import MAX_BODY_BYTES, build_state, make_app
    from .db import MissingDriver, create_schema, make_engine

    if args.db.startswith("sqlite:///"):
        Path(args.db[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = make_engine(args.db, pool_size=1)
        create_schema(engine)
    except MissingDriver as exc:
        sys.stderr.write(f"panda server: {exc}\n")
        return 2
    except Exception as exc:  # noqa: BLE001 - say which database and why, then stop
        sys.stderr.write(f"panda server: cannot use database {_shown(args.db)}: {exc}\n")
        return 1
    try:
        ops = _ops_config(args)
    except ValueError as exc:
        sys.stderr.write(f"panda server: {exc}\n")
        return 1
    from .auth import DNMatcher
    for opt in ("admin_dn", "pilot_dn"):
        try:
            DNMatcher(getattr(args, opt))
        except ValueError as exc:
            sys.stderr.write(f"panda server: --{opt.replace('_', '-')}: {exc}\n")
            return 2
    for opt in ("watcher_interval", "heartbeat_timeout", "sent_timeout", "holding_timeout",
                "transferring_timeout", "ops_interval"):
        if getattr(args, opt) < 0:
            sys.stderr.write(f"panda server: --{opt.replace('_', '-')} must be >= 0\n")
            return 1
    mover_options: dict[str, dict] = {}
    for opt in args.data_mover_option:
        name, dot, rest = opt.partition(".")
        key, eq, value = rest.partition("=")
        if not (dot and eq and name and key):
            sys.stderr.write(f"panda server: --data-mover-option {opt!r}: expected "
                             "MOVER.KEY=VALUE, e.g. http.token_file=/etc/panda/se.token\n")
            return 1
        mover_options.setdefault(name, {})[key] = value
    if args.watcher_interval > 0 and args.data_mover != "none":
        from .datamovers import load_movers
        try:
            load_movers(args.data_mover, mover_options)
        except (ValueError, TypeError, OSError) as exc:
            sys.stderr.write(f"panda server: --data-mover: {exc}\n")
            return 1
    if args.shares:
        from .shares import ShareError, ShareStore, load_shares_file
        from .taskbuffer import TaskBuffer
        try:
            ShareStore(TaskBuffer(engine)).save(load_shares_file(args.shares))
        except ShareError as exc:
            sys.stderr.write(f"panda server: --shares: {exc}\n")
            return 1
    trusted = ()
    if args.token_issuers:
        from .tokens import load_issuers
        try:
            trusted = tuple(load_issuers(args.token_issuers))
        except ValueError as exc:
            sys.stderr.write(f"panda server: --token-issuers: {exc}\n")
            return 1
    if args.pilot_wheel:
        from .pilotfile import PilotFileError, platform_wheels
        try:
            wheels = platform_wheels(args.pilot_wheel)
        except PilotFileError as exc:
            sys.stderr.write(f"panda server: --pilot-wheel: {exc}\n")
            return 1
        log.info("the pilot file serves %s besides this server's platform",
                 ", ".join(wheels) or "nothing")
    sites = load_site_dir(args.site_configs) if args.site_configs else []
    if sites:
        from .taskbuffer import TaskBuffer
        TaskBuffer(engine).sites.sync(sites)
        log.info("loaded %d site config(s) from %s", len(sites), args.site_configs)
    engine.dispose()

    from panda_core.netguard import raise_fd_limit
    fd_limit = raise_fd_limit()       # before any child process: they inherit it
    sockets = tornado.netutil.bind_sockets(args.port, address=args.host,
                                           reuse_port=args.processes != 1)
    if args.processes != 1:
        # Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new
        # connections over them. With one shared socket the worker that happened to be in
        # accept() took them: pilots keep their connections open, and one worker was seen
        # serving all 50 of them while the other idled. The parent's socket only reserved the
        # port (and resolved port 0); it is closed before the fork, or connections handed to it
        # would wait for an accept() that never comes.
        port = sockets[0].getsockname()[1]
        for sock in sockets:
            sock.close()
        _stop_children_with_parent()
        tornado.process.fork_processes(args.processes or None)
        sockets = tornado.netutil.bind_sockets(port, address=args.host, reuse_port=True)
    state = build_state(args.db, args.key_dir, require_auth=not args.no_auth,
                        threads=args.threads, site_loader=validate_site_dicts,
                        hot_path=args.hot_path, pilot_dir=args.pilot_dir,
                        share_counts_s=args.share_counts_s,
                        pilot_version=args.pilot_version,
                        pilot_wheels=tuple(args.pilot_wheel),
                        admin_dns=args.admin_dn, pilot_dns=args.pilot_dn,
                        token_issuer=args.token_issuer, trusted_issuers=trusted,
                        rate_limits=_rate_limits(args))
    from .watcher import start_periodic
    # every process: other processes' revocations reach this one within REVOCATION_REFRESH_S
    token_tasks = [("revoked tokens", state.keys.tokens.revoked.refresh)]
    start_periodic(state.executor, REVOCATION_REFRESH_S, token_tasks)
    if (tornado.process.task_id() or 0) == 0:    # expired tokens need no revocation row
        start_periodic(state.executor, 3600, [("expired revocations",
                                               state.tb.revoked_tokens.purge)])
    if trusted:
        from .tokens import JWKS_REFRESH_S
        start_periodic(state.executor, JWKS_REFRESH_S,
                       [("token issuers' keys", state.keys.tokens.refresh_all)])
    state.tb.owners.policy = args.scope_policy
    app = make_app(state)
    from .monitor.incidents import install as install_incident_logger
    install_incident_logger(state.tb.engine)      # every process records its incidents
    if (tornado.process.task_id() or 0) == 0:    # one process archives and runs operations
        from .archive import start_archiver
        start_archiver(state.tb, state.executor, args.archive_after, args.archive_interval,
                       args.archive_retention_months)
        # stored pilot versions signed by a replaced key: re-signed where this server can
        # vouch for them, refused (and logged) where it cannot (server/pilotstore.py)
        state.executor.submit(_check_pilot_files, state.pilot_files)
        if args.ops_interval > 0:
            from .monitor.operations import ops_tasks
            from .watcher import start_periodic
            from .notifications import Notifications
            notifications = Notifications(state.tb, _notify_config(args))
            start_periodic(state.executor, args.ops_interval, ops_tasks(state.tb, ops)
                           + [("notifications", notifications.process)])
    if args.watcher_interval > 0:       # every process: the guarded updates make it safe
        from .watcher import WatcherLimits, server_tasks, start_periodic
        from .failurepolicy import HealthLimits
        health = HealthLimits(window_s=args.site_test_window, min_jobs=args.site_test_min_jobs,
                              threshold=args.site_test_threshold or 2.0)
        limits = WatcherLimits(args.heartbeat_timeout, args.sent_timeout, args.holding_timeout,
                               args.transferring_timeout,
                               overrun_factor=args.walltime_overrun)
        mover = None if args.data_mover == "none" else args.data_mover
        start_periodic(state.executor, args.watcher_interval, server_tasks(
            state, limits, mover, mover_options,
            first_process=(tornado.process.task_id() or 0) == 0,
            transfer_timeout_s=args.transfer_timeout, transfer_give_up_s=args.transfer_give_up,
            health=health))
    from panda_core.netguard import FloodGuard, connection_cap

    from .bodylimit import BodyLimit   # oversized bodies: 413 with a reason, body never read
    server = tornado.httpserver.HTTPServer(BodyLimit(app, MAX_BODY_BYTES),
                                           ssl_options=_ssl_options(args),
                                           max_body_size=MAX_BODY_BYTES,
                                           xheaders=args.behind_proxy,
                                           idle_connection_timeout=args.idle_timeout,
                                           body_timeout=args.body_timeout)
    # floods: connections capped below the fd limit, the longest idle evicted, accept errors
    # logged at a bounded rate (panda_core/netguard.py)
    loop = IOLoop.current()           # the loop the guard's accept handler is added to
    guard = FloodGuard(connection_cap(fd_limit, args.max_connections), "panda server")
    guard.install(server, sockets)
    log.info("at most %d connections per process (open-file limit %d)", guard.cap, fd_limit)
    scheme = "https" if args.certfile else "http"
    port = sockets[0].getsockname()[1]
    log.info("panda server listening on %s://%s:%d (database %s)", scheme, args.host, port,
             engine.url.render_as_string(hide_password=True))
    # everything loaded so far lives as long as the process: keep it out of the collector's
    # scans, and collect the young generation less often (a request allocates a few hundred
    # short-lived objects; the default threshold of 700 ran a collection every few requests)
    gc.freeze()
    gc.set_threshold(20000, 20, 20)

    stopping: list[int] = []

    def _stop(signum, _frame):
        if stopping:                       # asked again: stop waiting for anything
            os._exit(1)
        stopping.append(signum)
        log.info("signal %d: stopping", signum)
        # a clean stop waits for requests in flight; it must not wait forever (a client that
        # never closes, a database call that never returns)
        timer = threading.Timer(SHUTDOWN_GRACE_S, lambda: os._exit(0))
        timer.daemon = True
        timer.start()
        loop.add_callback_from_signal(_shutdown)

    async def _shutdown():
        server.stop()
        await server.close_all_connections()
        state.executor.shutdown(wait=True)
        await state.dispatcher.path.close()
        state.tb.engine.dispose()
        loop.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    loop.start()
    return 0


def db_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda db", description="Manage the database: schema "
                                "migrations and the archive of old jobs.")
    p.add_argument("--db", default=os.environ.get("PANDA_DB", DEFAULT_DB),
                   help="SQLAlchemy database URL (default: %(default)s; env PANDA_DB)")
    sub = p.add_subparsers(dest="action", required=True, metavar="upgrade|current|archive",
                           title="actions")
    up = sub.add_parser("upgrade", help="run the schema migrations (creates an empty database)")
    up.add_argument("revision", nargs="?", default="head")
    sub.add_parser("current", help="print the schema revision of the database")
    ar = sub.add_parser("archive", help="move finished/failed/cancelled jobs older than S "
                        "seconds to jobs_archive")
    ar.add_argument("--older-than", type=float, required=True, metavar="S",
                    help="age in seconds since the job reached its final state")
    ar.add_argument("--batch", type=_positive_int, default=1000,
                    help="jobs moved per transaction")
    ar.add_argument("--retention-months", type=_positive_int, default=None, metavar="N",
                    help="then drop archive months more than N months old (default: keep all)")
    p.add_argument("--log-level", default=None,
                   help="debug shows alembic's own lines too (default: $PANDA_LOG_LEVEL, INFO)")
    # accept --db and --log-level after the action too
    for sp in (up, sub.choices["current"], ar):
        sp.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from panda_core.logs import setup_logging

    setup_logging(args.log_level)
    from .db import MissingDriver, current_revision, head_revision, make_engine, upgrade_schema

    if args.db.startswith("sqlite:///") and args.action == "upgrade":
        Path(args.db[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    shown = _shown(args.db)
    try:
        engine = make_engine(args.db, pool_size=1)
        if args.action == "upgrade":
            before, after = upgrade_schema(engine, args.revision)
            sys.stdout.write(f"{shown}: schema at {after} (was {before or 'empty'})\n")
        elif args.action == "current":
            rev, head = current_revision(engine), head_revision()
            state = "head" if rev == head else ("empty: run 'panda db upgrade'" if rev is None
                                                else f"behind {head}: run 'panda db upgrade'")
            sys.stdout.write(f"{rev or 'none'} ({state})\n")
            if rev != head:
                return 3
        else:
            from .archive import archive_jobs, prune_archive
            from .taskbuffer import TaskBuffer

            if args.older_than < 0:
                sys.stderr.write("panda db archive: --older-than must be >= 0\n")
                return 2
            tb = TaskBuffer(engine)
            moved = archive_jobs(tb, args.older_than, batch=args.batch)
            sys.stdout.write(f"archived {moved} job(s) older than {args.older_than:g} s\n")
            if args.retention_months is not None:
                gone = prune_archive(tb, args.retention_months)
                what = "row(s)" if engine.dialect.name == "sqlite" else "month partition(s)"
                sys.stdout.write(f"dropped {gone} archive {what} older than "
                                 f"{args.retention_months} month(s)\n")
    except MissingDriver as exc:
        sys.stderr.write(f"panda db {args.action}: {exc}\n")
        return 2
    except Exception as exc:  # noqa: BLE001 - say which database and why
        sys.stderr.write(f"panda db {args.action}: database {shown}: {exc}\n")
        return 1
    finally:
        if "engine" in locals():
            engine.dispose()
    return 0


TOKEN_USAGE = ("say what to do: 'panda token issue --role pilot|user|admin --subject NAME "
               "[-o FILE]', 'panda token public-key [--fingerprint]', 'panda token show "
               "--token-file FILE' or 'panda token revoke --token-file FILE|--jti ID'")


def token_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="panda token", description="Issue a signed bearer token (issue), show the "
        "job-signing public key that pilots pin at deployment (public-key), show a token's "
        "claims (show), or revoke a token in the server's database (revoke).",
        epilog="examples: panda token issue --role pilot --subject factory -o factory.token; "
        "panda token public-key --fingerprint")
    p.add_argument("action", nargs="?", choices=["issue", "public-key", "show", "revoke"],
                   help="issue: a new token; public-key: the server's job-signing key; "
                   "show: a token's claims; revoke: refuse a token from now on")
    p.add_argument("--role", choices=["pilot", "user", "admin"], help="issue: the token's role")
    p.add_argument("--subject", help="issue: who the token speaks for")
    p.add_argument("--site", help="bind a pilot token to one site")
    p.add_argument("--group", action="append", default=[], metavar="GROUP",
                   help="issue: a group the token carries, e.g. atlas or atlas/phys-higgs "
                        "(repeatable): the VOs and working groups its tasks may name")
    p.add_argument("--lifetime", type=int, default=30 * 24 * 3600, help="seconds")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="issue, public-key: write to FILE (a token: mode 0600, no trailing "
                   "newline: pilot 3 sends a token file's content as it is)")
    p.add_argument("--fingerprint", action="store_true",
                   help="public-key: print the key's fingerprint (sha256:...) instead of the PEM")
    p.add_argument("--token-file", help="show/revoke: the token (a file; '-': standard input)")
    p.add_argument("--jti", help="revoke: the token's id, when you do not have the token")
    p.add_argument("--reason", help="revoke: why (recorded)")
    p.add_argument("--db", default=os.environ.get("PANDA_DB", DEFAULT_DB),
                   help="revoke: the server's database URL")
    p.add_argument("--key-dir", default=str(DEFAULT_KEYS),
                   help="the server's --key-dir (default: %(default)s)")
    args = p.parse_args(argv)
    if args.action is None:
        p.error(TOKEN_USAGE)
    from .auth import KeyStore
    if args.action == "public-key":
        from panda_core.trust import key_fingerprint
        try:
            pem = KeyStore(args.key_dir).public_key_pem
        except OSError as exc:
            sys.stderr.write(f"panda token: cannot use key dir {args.key_dir}: {exc}\n")
            return 2
        text = key_fingerprint(pem) + "\n" if args.fingerprint else pem
        return _write_out(args.output, text, "public key")
    if args.action == "issue":
        if not args.role or not args.subject:
            p.error("issue needs --role and --subject, e.g. 'panda token issue --role user "
                    "--subject alice'")
        if args.lifetime <= 0:
            p.error("--lifetime must be a positive number of seconds")
        try:
            token = KeyStore(args.key_dir).issue_token(args.subject, args.role, args.site,
                                                       args.lifetime, tuple(args.group))
        except OSError as exc:
            sys.stderr.write(f"panda token: cannot use key dir {args.key_dir}: {exc}\n")
            return 2
        except ValueError as exc:
            p.error(str(exc))
        # no newline into a file or a pipe (``> pilot.token``): pilot 3 puts a token file's
        # content into its Authorization header as it is; a terminal gets one, for the prompt
        return _write_out(args.output, token + ("\n" if sys.stdout.isatty() and not args.output
                                                else ""), "token", secret=True)
    return _token_show_or_revoke(p, args)


def _write_out(path: str | None, text: str, what: str, secret: bool = False) -> int:
    """``text`` to ``path`` (a secret: created with mode 0600) or to stdout."""
    if not path:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    try:
        if secret:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)             # an existing file keeps its mode otherwise
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        else:
            Path(path).write_text(text)
    except OSError as exc:
        sys.stderr.write(f"panda token: cannot write the {what} to {path}: {exc.strerror}\n")
        return 2
    return 0


def _token_show_or_revoke(p: argparse.ArgumentParser, args) -> int:
    import time

    from .auth import KeyStore
    from .tokens import TokenError

    keys = KeyStore(args.key_dir)
    claims = None
    if args.token_file:
        try:
            text = sys.stdin.read() if args.token_file == "-" else Path(args.token_file).read_text()
        except OSError as exc:
            p.error(f"cannot read {args.token_file}: {exc.strerror}")
        try:
            claims = keys.tokens.verify(text.strip())
        except TokenError as exc:
            sys.stderr.write(f"panda token {args.action}: {exc}\n")
            return 2
    if args.action == "show":
        if claims is None:
            p.error("show needs --token-file")
        sys.stdout.write(json.dumps({"subject": claims.subject, "role": claims.role,
                                     "site": claims.site, "jti": claims.jti,
                                     "issuer": claims.issuer, "expires": claims.expires}) + "\n")
        return 0
    if bool(claims) == bool(args.jti):
        p.error("revoke needs --token-file or --jti (one of them)")
    if claims is not None and claims.jti is None:
        sys.stderr.write("panda token revoke: this token has no jti\n")
        return 2
    from .db import make_engine
    from .taskbuffer import TaskBuffer

    jti = claims.jti if claims else args.jti
    expires = claims.expires if claims else time.time() + 400 * 24 * 3600
    try:
        engine = make_engine(args.db, pool_size=1)
        new = TaskBuffer(engine).revoked_tokens.revoke(
            jti, expires, f"panda token revoke ({os.environ.get('USER', '?')})",
            claims.subject if claims else None, args.reason)
    except Exception as exc:  # noqa: BLE001 - say which database and why
        sys.stderr.write(f"panda token revoke: database {_shown(args.db)}: {exc}\n")
        return 1
    sys.stdout.write(f"revoked {jti}{'' if new else ' (it already was)'}; every server "
                     f"refuses it within {REVOCATION_REFRESH_S:.0f} s\n")
    return 0
