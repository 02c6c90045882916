"""``panda factory``: the pilot factory as a daemon (clean stop on SIGTERM/SIGINT) or ``--once``."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="panda factory",
                                description="keep the online sites supplied with pilots")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:25080")
    p.add_argument("--site-configs", required=True, metavar="DIR", help="folder of site YAMLs")
    p.add_argument("--once", action="store_true", help="one cycle, then exit (for cron)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between cycles")
    p.add_argument("--state-dir", default=None,
                   help="where pilots are remembered (default: ./panda-factory)")
    p.add_argument("--factory-id", default=None, help="name reported to the server")
    p.add_argument("--token-file", help="the factory's bearer token (default: $PANDA_AUTH_TOKEN)")
    p.add_argument("--pilot-token-file",
                   help="token handed to pilots as PANDA_AUTH_TOKEN (default: the factory's)")
    p.add_argument("--pilot-args", default="", help="extra pilot arguments, one shell-quoted string")
    p.add_argument("--server-public-key", metavar="PEM",
                   help="the server's job-signing public key (`panda token public-key`), pinned "
                   "for every pilot by its fingerprint")
    p.add_argument("--server-key-fingerprint", metavar="sha256:HEX",
                   help="the same, as its fingerprint (`panda token public-key --fingerprint`)")
    p.add_argument("--ca-bundle", help="CA bundle (file) the server's https certificate is "
                   "verified against, for the factory and its pilots (default: the system's)")
    p.add_argument("--ca-dir", help="folder of hashed CA certificates, for https")
    p.add_argument("--max-failures", type=int, default=5,
                   help="failed pilots in a row that stop submission to a site")
    p.add_argument("--failure-backoff", type=float, default=600.0,
                   help="seconds before a stopped site gets one probe pilot")
    p.add_argument("--cancel-on-exit", action="store_true",
                   help="cancel queued and running pilots when the factory stops")
    p.add_argument("--pilot-launch", choices=["onefile", "installed"], default="onefile",
                   help="onefile (default): the batch job fetches the server's signed pilot "
                        "file and needs only python3 on the node; installed: it runs this "
                        "host's python -m panda_wms.cli pilot (panda-wms on every node)")
    p.add_argument("--node-python", metavar="PATH",
                   help="the worker nodes' python3 for one-file pilots (default: python3 "
                        "on the node's PATH, or the batch job's $PANDA_PYTHON)")
    p.add_argument("--log-level", default=None)
    return p.parse_args(argv)


def _read(path: str | None, env_var: str | None = None) -> str | None:
    if path:
        return Path(path).read_text().strip() or None
    return os.environ.get(env_var) if env_var else None


def server_key_fingerprint(args: argparse.Namespace) -> str | None:
    """The fingerprint of the key given by --server-public-key or --server-key-fingerprint
    (both: they must agree); ValueError naming the option otherwise."""
    from panda_core.trust import key_fingerprint, normalise_fingerprint

    given = normalise_fingerprint(args.server_key_fingerprint) \
        if args.server_key_fingerprint else None
    if args.server_public_key:
        try:
            of_file = key_fingerprint(Path(args.server_public_key).read_bytes())
        except ValueError as exc:
            raise ValueError(f"--server-public-key {args.server_public_key}: {exc}") from None
        if given and given != of_file:
            raise ValueError(f"--server-public-key has the fingerprint {of_file}, not the "
                             f"--server-key-fingerprint {given}")
        given = of_file
    return given


def _needs_token(args: argparse.Namespace) -> str | None:
    """Without a token of its own the factory can neither report its pilots nor be sure of
    the job counts: say so at start, unless the server takes anonymous callers (``--no-auth``)
    or cannot be asked now (the factory tries again every cycle)."""
    from panda_core.client import ApiClient, ClientError

    try:
        who = ApiClient(args.server, None, timeout=10, ca_file=args.ca_bundle,
                        ca_dir=args.ca_dir).call("system", "whoami")
    except ClientError:
        return None
    if who:
        return None
    return ("panda factory: an identity is required: the factory reports its pilots with a "
            "token of its own; give --token-file FILE or $PANDA_AUTH_TOKEN, e.g. from "
            "'panda token issue --role pilot --subject factory -o factory.token' "
            "(--pilot-token-file is the token handed to the pilots)")


def _print_cycle(report) -> None:
    for name, c in report.sites.items():
        line = (f"{name}: activated={c.activated if c.activated is not None else '?'} "
                f"queued={c.queued} running={c.running} submitted={c.submitted} "
                f"finished={c.finished} failed={c.failed}")
        if c.skipped:
            line += f" ({c.skipped})"
        sys.stdout.write(line + "\n")
        for err in c.errors:
            sys.stdout.write(f"  error: {err}\n")
    if report.report_error:
        sys.stdout.write(f"report: {report.report_error}\n")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from panda_core.logs import setup_logging
    setup_logging(args.log_level)

    from site_configs import load_dir

    from .factory import Factory

    try:
        token = _read(args.token_file, "PANDA_AUTH_TOKEN")
        pilot_token = _read(args.pilot_token_file) or token
    except OSError as exc:
        sys.stderr.write(f"panda factory: cannot read token file: {exc}\n")
        return 2
    try:
        pilot_args = shlex.split(args.pilot_args)
    except ValueError as exc:
        sys.stderr.write(f"panda factory: bad --pilot-args: {exc}\n")
        return 2
    try:
        fingerprint = server_key_fingerprint(args)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"panda factory: {exc}\n")
        return 2
    sites, errors = load_dir(args.site_configs)
    for err in errors:
        log.error("site config: %s", err)
    if not sites:
        sys.stderr.write(f"panda factory: no valid site config in {args.site_configs}\n")
        return 1
    unpinned = [s.name for s in sites
                if not (fingerprint or s.trust.server_key_fingerprint or s.trust.server_public_key)]
    if unpinned:
        sys.stderr.write("panda factory: no server key pinned for site(s) "
                         f"{', '.join(unpinned)}: give --server-public-key or "
                         "--server-key-fingerprint, or set trust.server_key_fingerprint in the "
                         "site config (pilots never trust a key only because the server sent "
                         "it)\n")
        return 2
    if token is None and (why := _needs_token(args)) is not None:
        sys.stderr.write(why + "\n")
        return 2
    try:
        factory = Factory(args.server, sites, factory_id=args.factory_id, token=token,
                          pilot_token=pilot_token, state_dir=args.state_dir,
                          pilot_args=pilot_args, max_failures=args.max_failures,
                          failure_backoff_s=args.failure_backoff,
                          server_key_fingerprint=fingerprint, ca_file=args.ca_bundle,
                          ca_dir=args.ca_dir, pilot_launch=args.pilot_launch,
                          node_python=args.node_python)
    except OSError as exc:
        sys.stderr.write(f"panda factory: cannot use state dir: {exc}\n")
        return 1

    if args.once:
        report = factory.run_once()
        _print_cycle(report)
        failed = bool(report.report_error or errors
                      or any(c.errors for c in report.sites.values()))
        return 1 if failed else 0

    stop = threading.Event()
    last_errors: list[str] = [str(e) for e in errors]

    def reload():
        """Re-read the site configs each cycle, so edits need no restart; keep the old ones if
        the folder has no valid site at all."""
        nonlocal last_errors
        new_sites, new_errors = load_dir(args.site_configs)
        texts = [str(e) for e in new_errors]
        if texts != last_errors:
            for text in texts:
                log.error("site config: %s", text)
            last_errors = texts
        return new_sites or None

    def on_signal(signum, frame):
        log.info("factory received %s: stopping after this cycle", signal.Signals(signum).name)
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    factory.run(stop, interval=args.interval, reload=reload)
    if args.cancel_on_exit:
        factory.cancel_all()
        factory.shutdown()
    return 0
