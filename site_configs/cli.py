"""``panda sites check DIR`` and ``panda sites sync DIR --server URL``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from panda_core.client import ApiClient, ClientError, Refused, load_token
from panda_core.siteconfig import SiteConfig

from .errors import ConfigError
from .loader import check_file, load_dir

log = logging.getLogger(__name__)


def _load(paths: list[str]) -> tuple[list[SiteConfig], list[ConfigError]]:
    """Load folders and single files alike; duplicate names across all of them are errors."""
    configs: list[SiteConfig] = []
    errors: list[ConfigError] = []
    for item in paths:
        if Path(item).is_dir():
            got, errs = load_dir(item)
        elif Path(item).exists():
            cfg, errs = check_file(item)
            got = [cfg] if cfg else []
        else:
            got, errs = [], [ConfigError(item, "", "no such file or directory")]
        configs.extend(got)
        errors.extend(errs)
    seen: dict[str, str] = {}
    unique = []
    for cfg in configs:
        if cfg.name in seen:
            errors.append(ConfigError(cfg.source or "?", "name", f"duplicate site name "
                                      f"{cfg.name!r} (already defined in {seen[cfg.name]})"))
            continue
        seen[cfg.name] = cfg.source or "?"
        unique.append(cfg)
    return unique, errors


def _print_errors(errors: list[ConfigError]) -> None:
    for err in errors:
        sys.stdout.write(f"ERROR {err}\n")


def sync_sites(server: str, configs: list[SiteConfig], token: str | None,
               timeout: float = 30.0) -> str:
    """POST the configs to ``{server}/api/v1/site/sync``; return the server's message or raise
    ClientError naming the URL."""
    client = ApiClient(server, token, timeout=timeout)
    try:
        client.call("site", "sync", "POST", sites=[c.to_dict() for c in configs])
    except Refused as exc:
        raise ClientError(f"{exc.url} refused the sync (HTTP {exc.http_status}): "
                          f"{exc.reason}") from None
    return client.last_message


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="panda sites", description="check or sync site configs")
    sub = parser.add_subparsers(dest="action", required=True, metavar="check|show|sync",
                                title="actions")
    p_check = sub.add_parser("check", help="validate site config files; exit 1 on any error")
    p_check.add_argument("paths", nargs="+", metavar="DIR", help="folders or files")
    p_show = sub.add_parser("show", help="print the loaded configs as JSON")
    p_show.add_argument("paths", nargs="+", metavar="DIR")
    p_sync = sub.add_parser("sync", help="load the valid configs into the server")
    p_sync.add_argument("paths", nargs="+", metavar="DIR")
    p_sync.add_argument("--server", default=os.environ.get("PANDA_URL"),
                        help="server URL, e.g. http://127.0.0.1:25080 (default: $PANDA_URL)")
    p_sync.add_argument("--token-file", help="admin bearer token (default: $PANDA_AUTH_TOKEN, "
                        "then ~/.panda/token)")
    p_sync.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    configs, errors = _load(args.paths)
    _print_errors(errors)
    if args.action == "check":
        for cfg in configs:
            sys.stdout.write(f"OK    {cfg.source}: site {cfg.name} ({cfg.status}, "
                             f"{cfg.scheduler.backend})\n")
        sys.stdout.write(f"{len(configs)} valid site config(s), {len(errors)} error(s)\n")
        return 1 if errors else 0
    if args.action == "show":
        sys.stdout.write(json.dumps([c.to_dict() for c in configs], indent=2) + "\n")
        return 1 if errors else 0
    if not args.server:
        sys.stderr.write("panda sites sync: give --server URL (or set PANDA_URL)\n")
        return 2
    if not configs:
        sys.stderr.write("no valid site config to sync\n")
        return 1
    try:
        token = load_token(args.token_file)
    except (ClientError, OSError) as exc:
        sys.stderr.write(f"panda sites sync: {exc}\n")
        return 2
    try:
        message = sync_sites(args.server, configs, token, args.timeout)
    except ClientError as exc:
        sys.stderr.write(f"sync failed: {exc}\n")
        return 1
    sys.stdout.write(f"synced {len(configs)} site(s): {', '.join(c.name for c in configs)}"
                     f" ({message or 'ok'})\n")
    if errors:
        sys.stdout.write(f"{len(errors)} error(s): the broken files were not synced\n")
    return 1 if errors else 0
