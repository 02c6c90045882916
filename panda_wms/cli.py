"""The ``panda`` command: one entry point, each subcommand owned by the package it belongs to.

Subcommands are imported lazily so that ``panda pilot`` never pays for tornado or sqlalchemy.
Each target is ``module:function`` taking the remaining argv and returning an exit code.
A subcommand whose extra is not installed says which one to install, once, here (``EXTRAS``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "server": ("server.cli:main", "run the PanDA server (Tornado over a database)"),
    "db": ("server.cli:db_main", "database schema: upgrade, current"),
    "token": ("server.cli:token_main", "issue a signed bearer token"),
    "pilotfile": ("server.pilotcli:main", "the one-file pilot's versions: list, re-sign, build"),
    "pilot": ("pilot.cli:main", "run a pilot: get jobs from the server and run them"),
    "factory": ("schedulers.cli:main", "keep sites supplied with pilots"),
    "sites": ("site_configs.cli:main", "check or sync site configs"),
    "submit": ("panda_wms.client_cli:submit_main", "submit a task file (JSON or YAML)"),
    "status": ("panda_wms.client_cli:status_main", "show a task's status (--wait: until it ends)"),
    "ping": ("panda_wms.client_cli:ping_main", "is the server up, who am I (--wait S)"),
    "kill": ("panda_wms.client_cli:kill_main", "kill jobs, or a task (--task N)"),
    "finish": ("panda_wms.client_cli:finish_main", "end a task without more jobs (--soft: "
                                                   "let the running ones end)"),
    "pause": ("panda_wms.client_cli:pause_main", "hold a task's queued jobs back from pilots"),
    "resume": ("panda_wms.client_cli:resume_main", "let a paused task's jobs go to pilots"),
    "jobs": ("panda_wms.jobs_cli:jobs_main", "list jobs (filters, --json, --watch)"),
    "tasks": ("panda_wms.jobs_cli:tasks_main", "list tasks with their jobs per state"),
    "job": ("panda_wms.jobs_cli:job_main", "one job: details, files, state history"),
    "retry": ("panda_wms.jobs_cli:retry_main", "retry failed jobs, or a task's (--task N)"),
    "data": ("panda_wms.data_cli:main", "register input files of a dataset, list them"),
    "quota": ("panda_wms.quota_cli:main", "my usage against my quotas; list; set (admin)"),
    "debug": ("panda_wms.client_cli:debug_main", "debug mode of a running job: set, clear, show"),
    "se": ("storage_element.cli:main", "serve a folder as an HTTP/WebDAV storage element"),
    "demo": ("panda_wms.demo:main", "run a server, a site and pilots; process a task end to end"),
    "simulate": ("server.simulate.cli:main", "replay a workload against the server with "
                                             "simulated sites and pilots"),
}

#: the top-level modules each role extra of setup.py installs (the drivers: see EXTRAS)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "server": ("tornado", "sqlalchemy", "alembic", "prometheus_client", "jsonschema", "yaml"),
    "factory": ("yaml", "jsonschema"),
    "se": ("tornado",),
    "client": ("yaml", "tabulate"),
}
#: per subcommand: the extras it cannot start without (checked before it runs), and those it needs
#: only for some inputs or actions (named when their import fails: a YAML task file, ...). The
#: database drivers are not here: ``panda server`` and ``panda db`` report a missing one themselves.
EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "server": (("server",), ()),
    "db": (("server",), ()),
    "token": ((), ("server",)),
    "pilotfile": (("server",), ()),
    "factory": (("factory",), ()),
    "sites": (("factory",), ()),
    "se": (("se",), ()),
    "submit": ((), ("client",)),
    "jobs": (("client",), ()),
    "tasks": (("client",), ()),
    "job": (("client",), ()),
    "data": (("client",), ()),
    "quota": (("client",), ()),
    "demo": (("server", "factory"), ()),
    "simulate": (("server",), ()),
}


def missing_extra(command: str, module: str | None = None) -> str | None:
    """What to tell the user when ``command`` lacks an extra: for ``module`` (a failed import),
    or else the first module of a required extra that is not installed; None when nothing is."""
    required, optional = EXTRAS.get(command, ((), ()))
    if module is None:
        module = next((m for e in required for m in EXTRA_MODULES[e]
                       if importlib.util.find_spec(m) is None), None)
    extras = [e for e in required + optional if module in EXTRA_MODULES[e]]
    if module is None or not extras:
        return None
    names = " and ".join(f"'{e}'" for e in extras)
    return (f"panda {command} needs the {names} extra{'s' if len(extras) > 1 else ''} "
            f"(module {module!r} is not installed): pip install 'panda-wms[{','.join(extras)}]'")


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
    if (missing := missing_extra(name)) is not None:
        sys.stderr.write(missing + "\n")
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    try:
        return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)
    except ModuleNotFoundError as exc:
        missing = missing_extra(name, (exc.name or "").split(".")[0])
        if missing is None:
            raise
        sys.stderr.write(missing + "\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
