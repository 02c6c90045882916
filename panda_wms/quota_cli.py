"""``panda quota``: see your usage against your quotas, list them, and (admins) set them.

    panda quota                         # my usage: running jobs, jobs submitted in 24 h, limits
    panda quota --user bob --group higgs
    panda quota list
    panda quota set --user alice --max-running 500 --max-per-day 10000   (admin)
    panda quota set --group higgs --max-per-day 50000                    (admin)
    panda quota set --user '*' --max-per-day 5000                        (the default, admin)
"""
from __future__ import annotations

import argparse
import sys

from . import console
from .console import EXIT_OK, UsageError


def _limit(text: str) -> int | None:
    if text.lower() in ("", "none", "-"):
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, or 'none' for no limit")
    return int(text)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda quota", description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", default="usage", choices=("usage", "list", "set"))
    p.add_argument("--user", help="a user (token subject); '*' is the default quota (set)")
    p.add_argument("--group", help="a group (a task's working_group)")
    p.add_argument("--max-running", type=_limit, default=None, metavar="N|none")
    p.add_argument("--max-per-day", type=_limit, default=None, metavar="N|none")
    console.server_options(p)
    args = p.parse_args(argv)

    def body() -> int:
        api = console.client(args)
        if args.action == "list":
            rows = api.call("quota", "list")
            if args.json:
                console.print_json(rows)
            else:
                sys.stdout.write(console.table(
                    [(q["kind"], q["name"], _show(q["max_running"]), _show(q["max_per_day"]))
                     for q in rows], ["kind", "name", "max running", "max per day"]) + "\n")
            return EXIT_OK
        if args.action == "set":
            if bool(args.user) == bool(args.group):
                raise UsageError("panda quota set: name one --user or one --group")
            kind, name = ("user", args.user) if args.user else ("group", args.group)
            row = api.call("quota", "set", "POST", kind=kind, name=name,
                           max_running=args.max_running, max_per_day=args.max_per_day)
            if args.json:
                console.print_json(row)
            else:
                sys.stdout.write(f"{kind} {name}: at most {_show(row['max_running'])} running, "
                                 f"{_show(row['max_per_day'])} submitted per day\n")
            return EXIT_OK
        usage = api.call("quota", "usage", user=args.user, group=args.group)
        if args.json:
            console.print_json(usage)
            return EXIT_OK
        rows = [(kind, u["name"], f"{u['running']} / {_show(u['max_running'])}",
                 f"{u['submitted_24h']} / {_show(u['max_per_day'])}")
                for kind, u in usage.items()]
        sys.stdout.write(console.table(rows, ["kind", "name", "running / quota",
                                              "submitted in 24 h / quota"]) + "\n")
        return EXIT_OK

    return console.run(body, "panda quota")


def _show(value) -> str:
    return "no limit" if value is None else str(value)
