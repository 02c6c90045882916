"""``panda se``: serve a folder as an HTTP/WebDAV storage element (HTTPS with --cert/--key)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from panda_core.netguard import FloodGuard, connection_cap, raise_fd_limit

from .app import make_app
from .body import BODY_TIMEOUT_S, MIN_PROGRESS
from .tpc import TpcConfig

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="panda se", description="A storage element: a folder "
                                     "served over HTTP/1.1 with the WebDAV verbs grid clients use.")
    parser.add_argument("--root", required=True, help="folder to serve (created if missing)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--token-file", help="file holding the bearer token writes need "
                        "(default: $PANDA_SE_TOKEN; none = writes open)")
    parser.add_argument("--cert", help="PEM certificate (chain) to serve HTTPS with")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument("--idle-timeout", type=float, default=60, metavar="S",
                        help="close a connection that has not sent a whole request head within "
                        "S seconds of its accept or its last reply (slow or silent clients)")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, metavar="S",
                        help=f"end a request whose body brings less than {MIN_PROGRESS // 1024} "
                        "KiB in S seconds (a stalled or trickling upload) with 408 and remove "
                        "its partial file; a whole body may take as long as it needs "
                        f"(default {BODY_TIMEOUT_S:g})")
    parser.add_argument("--max-connections", type=int, metavar="N",
                        help="client connections (default and upper bound: the open-file "
                        "limit, raised to the hard limit at start, less a reserve)")
    parser.add_argument("--strict-webdav", action="store_true",
                        help="answer PUT into a missing folder with 409, as RFC 4918 says, instead "
                        "of creating the parents")
    parser.add_argument("--tpc-allow", action="append", default=[], metavar="HOST:PORT",
                        help="accept third-party COPY (pull) from this source storage element "
                        "(repeatable; '*': any source this host can reach); default: COPY refused")
    parser.add_argument("--tpc-ca-bundle", help="PEM CA bundle verifying https sources of COPY")
    parser.add_argument("--tpc-timeout", type=float, default=3600.0, metavar="S",
                        help="longest one third-party pull may take")
    args = parser.parse_args(argv)
    from panda_core.logs import setup_logging

    setup_logging()
    if not args.idle_timeout > 0 or (args.max_connections is not None
                                     and args.max_connections < 1):
        sys.stderr.write("panda se: --idle-timeout must be > 0 and --max-connections >= 1\n")
        return 2
    if not 0 < args.body_timeout < 1e7:      # also refuses nan and inf
        sys.stderr.write("panda se: --body-timeout must be a number of seconds > 0\n")
        return 2
    token = os.environ.get("PANDA_SE_TOKEN") or None
    try:
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip() or None
        os.makedirs(args.root, exist_ok=True)
        if not os.path.isdir(args.root):
            raise NotADirectoryError(f"--root {args.root} is not a folder")
    except OSError as exc:
        sys.stderr.write(f"panda se: {exc}\n")
        return 2
    ssl_ctx = None
    if args.cert or args.key:
        import ssl

        if not (args.cert and args.key):
            sys.stderr.write("panda se: --cert and --key go together\n")
            return 2
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_ctx.load_cert_chain(args.cert, args.key)
        except (OSError, ssl.SSLError) as exc:
            sys.stderr.write(f"panda se: cannot load --cert/--key: {exc}\n")
            return 2
    tpc = TpcConfig(allow=tuple(args.tpc_allow), ca_bundle=args.tpc_ca_bundle,
                    timeout_s=args.tpc_timeout)
    app = make_app(args.root, token, create_parents=not args.strict_webdav, tpc=tpc,
                   body_timeout_s=args.body_timeout)

    fd_limit = raise_fd_limit()

    async def serve() -> None:
        # no total body timeout: an upload of many GB takes as long as it takes; one that
        # stalls or trickles is ended by the handler (--body-timeout, storage_element/body.py)
        server = HTTPServer(app, max_body_size=1 << 50,
                            idle_connection_timeout=args.idle_timeout, ssl_options=ssl_ctx)
        guard = FloodGuard(connection_cap(fd_limit, args.max_connections), "panda se")
        guard.install(server, bind_sockets(args.port, address=args.host))
        log.info("storage element serving %s on %s://%s:%d (writes %s)", args.root,
                 "https" if ssl_ctx else "http", args.host, args.port,
                 "need a token" if token else "open")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()

    try:
        asyncio.run(serve())
    except OSError as exc:
        sys.stderr.write(f"panda se: {exc}\n")
        return 1
    return 0
