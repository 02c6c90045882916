"""The ``panda`` command: one entry point, each subcommand owned by the package it belongs to.

Subcommands are imported lazily so that ``panda pilot`` never pays for tornado or sqlalchemy.
Each target is ``module:function`` taking the remaining argv and returning an exit code.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "server": ("server.cli:main", "run the PanDA server (Tornado over a database)"),
    "db": ("server.cli:db_main", "database schema: upgrade, current"),
    "token": ("server.cli:token_main", "issue a signed bearer token"),
    "pilot": ("pilot.cli:main", "run a pilot: get jobs from the server and run them"),
    "factory": ("schedulers.cli:main", "keep sites supplied with pilots"),
    "sites": ("site_configs.cli:main", "check or sync site configs"),
    "submit": ("panda_wms.client_cli:submit_main", "submit a task file (JSON or YAML)"),
    "status": ("panda_wms.client_cli:status_main", "show a task's status"),
    "kill": ("panda_wms.client_cli:kill_main", "kill jobs"),
    "se": ("storage_element.cli:main", "serve a folder as an HTTP/WebDAV storage element"),
    "demo": ("panda_wms.demo:main", "run a server, a site and pilots; process a task end to end"),
}


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once for command-line use (library code only gets loggers)."""
    level = (level or os.environ.get("PANDA_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def usage() -> str:
    lines = ["usage: panda COMMAND [options]", "", "commands:"]
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<9} {text}")
    lines += ["", "'panda COMMAND --help' shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage() + "\n")
        return 0
    if argv[0] == "--version":
        from panda_wms import __version__
        sys.stdout.write(f"panda-wms {__version__}\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"panda: unknown command {name!r}\n\n{usage()}\n")
        return 2
    target = SUBCOMMANDS[name][0]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
