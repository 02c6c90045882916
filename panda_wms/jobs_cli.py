"""``panda jobs``, ``panda tasks``, ``panda job ID``, ``panda retry``: the grid at a glance, for
people used to squeue, condor_q and pbook.

Every read command takes ``--json`` (the same objects the table shows, and more) and
``--watch [S]``. ``panda jobs --json`` prints a list of job objects with at least ``id``,
``task``, ``site``, ``state``, ``attempt``, ``error_code`` (docs/contracts.md, "Command line").
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from . import console
from .console import EXIT_FAILED, EXIT_OK

JOB_HEADERS = ("ID", "TASK", "SITE", "STATE", "ATT", "CREATED", "STARTED", "ENDED", "TIME",
               "ERR", "ERROR")


def job_object(view: dict) -> dict[str, Any]:
    """A job of ``job/list`` as the console shows it (the ``--json`` shape)."""
    start, end = console.parse_time(view.get("start_time")), console.parse_time(view.get("end_time"))
    seconds = None
    if start is not None:
        seconds = ((end or dt.datetime.now(dt.timezone.utc)) - start).total_seconds()
    return {"id": view.get("panda_id"), "task": view.get("task_id"), "site": view.get("site"),
            "state": view.get("status"), "attempt": view.get("attempt_nr"),
            "max_attempts": view.get("max_attempts"), "owner": view.get("owner"),
            "created": view.get("creation_time"), "started": view.get("start_time"),
            "ended": view.get("end_time"), "modified": view.get("modification_time"),
            "seconds": seconds, "node": view.get("node"),
            "error_code": view.get("error_code", 0), "error_text": view.get("error_text", "")}


def job_row(job: dict) -> list[Any]:
    return [job["id"], job["task"], job["site"] or "", job["state"],
            f"{job['attempt']}/{job['max_attempts']}", console.short_time(job["created"]),
            console.short_time(job["started"]), console.short_time(job["ended"]),
            console.duration(job["seconds"]), job["error_code"] or "",
            console.clip(job["error_text"], 60)]


# ---------------------------------------------------------------------- panda jobs
def jobs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="panda jobs", description="List jobs, newest last (like squeue / condor_q).",
        epilog="examples: panda jobs --task 3 --state failed; panda jobs --since 2h --watch")
    p.add_argument("--task", type=int, help="jobs of this task")
    p.add_argument("--site", help="jobs at this site")
    p.add_argument("--state", help="these states, comma-separated (activated,running,failed)")
    p.add_argument("--user", help="jobs of this owner (a token's subject or a DN)")
    p.add_argument("--since", help="modified within this long (30m, 2h, 1d) or since an ISO time")
    p.add_argument("--limit", type=int, default=200, help="at most this many, the newest "
                   "(default %(default)s)")
    console.server_options(p)
    console.watch_option(p)
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("--limit must be at least 1")

    def body() -> int:
        states = console.job_states(args.state) if args.state else None
        api = console.client(args)
        filters = {"task_id": args.task, "site": args.site, "status": states,
                   "owner": args.user, "limit": args.limit, "newest": "true",
                   "since": console.parse_since(args.since) if args.since else None}

        def show() -> int:
            jobs = sorted((job_object(v) for v in api.list_jobs(**filters)),
                          key=lambda j: j["id"])
            if args.json:
                console.print_json(jobs)
                return EXIT_OK
            if not jobs:
                sys.stdout.write("no jobs match\n")
                return EXIT_OK
            sys.stdout.write(console.table((job_row(j) for j in jobs), JOB_HEADERS) + "\n")
            states: dict[str, int] = {}
            for j in jobs:
                states[j["state"]] = states.get(j["state"], 0) + 1
            more = " (the newest; --limit shows more)" if len(jobs) >= args.limit else ""
            sys.stdout.write(f"{len(jobs)} job(s){more}: " + ", ".join(
                f"{n} {s}" for s, n in sorted(states.items())) + "\n")
            return EXIT_OK
        return console.watch(show, args.watch, machine=args.json)
    return console.run(body, "panda jobs")


# ---------------------------------------------------------------------- panda tasks
def task_object(view: dict) -> dict[str, Any]:
    jobs = view.get("jobs") or {}
    return {"id": view.get("task_id"), "name": view.get("taskName"), "state": view.get("status"),
            "owner": view.get("owner"), "site": view.get("site"),
            "priority": view.get("priority"), "share": view.get("share"),
            "created": view.get("creationDate"), "modified": view.get("modificationTime"),
            "jobs": jobs, "error_text": view.get("errorDialog") or ""}


def tasks_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda tasks",
                                description="List tasks with their jobs per state (like pbook).")
    p.add_argument("--user", help="tasks of this owner")
    p.add_argument("--state", help="these task states, comma-separated (running,done,failed)")
    p.add_argument("--since", help="modified within this long (30m, 2h, 1d) or since an ISO time")
    p.add_argument("--limit", type=int, default=50, help="the newest N (default %(default)s)")
    console.server_options(p)
    console.watch_option(p)
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("--limit must be at least 1")

    def body() -> int:
        wanted = set(console.task_states(args.state)) if args.state else set()
        api = console.client(args)
        since = console.parse_since(args.since) if args.since else None

        def show() -> int:
            views = api.call("task", "list", owner=args.user, limit=args.limit, since=since,
                             with_counts="true")
            tasks = [t for t in map(task_object, views) if not wanted or t["state"] in wanted]
            tasks.sort(key=lambda t: t["id"])
            if args.json:
                console.print_json(tasks)
                return EXIT_OK
            if not tasks:
                sys.stdout.write("no tasks match\n")
                return EXIT_OK
            rows = [[t["id"], console.clip(t["name"], 30), t["state"], t["owner"],
                     t["site"] or "", sum(t["jobs"].values()),
                     " ".join(f"{s}={n}" for s, n in sorted(t["jobs"].items())),
                     console.short_time(t["modified"]), console.clip(t["error_text"], 40)]
                    for t in tasks]
            sys.stdout.write(console.table(rows, ("ID", "NAME", "STATE", "OWNER", "SITE", "JOBS",
                                                  "BY STATE", "MODIFIED", "NOTE")) + "\n")
            return EXIT_OK
        return console.watch(show, args.watch, machine=args.json)
    return console.run(body, "panda tasks")


# ---------------------------------------------------------------------- panda job ID
def job_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda job", description="One job: details, files, state "
                                "history with the time in each state, error.")
    p.add_argument("job_id", type=int)
    console.server_options(p)
    console.watch_option(p)
    args = p.parse_args(argv)

    def body() -> int:
        api = console.client(args)

        def show() -> int:
            view = api.job_details(args.job_id)
            if args.json:
                console.print_json(view)
                return EXIT_OK
            sys.stdout.write(describe_job(view))
            return EXIT_OK
        return console.watch(show, args.watch, machine=args.json)
    return console.run(body, "panda job")


def describe_job(view: dict) -> str:
    job = job_object(view)
    lines = [f"job {job['id']}: {job['state']}, attempt {job['attempt']} of "
             f"{job['max_attempts']}" + (" (archived)" if view.get("archived") else "")]
    fields = [("task", job["task"]), ("site", job["site"]), ("owner", job["owner"]),
              ("created", console.short_time(job["created"], year=True)),
              ("started", console.short_time(job["started"], year=True)),
              ("ended", console.short_time(job["ended"], year=True)), ("run time", console.duration(job["seconds"])),
              ("node", job["node"]), ("pilot", view.get("pilot_id")),
              ("batch id", view.get("batch_id")),
              ("retry of", view.get("parent_id")),
              ("resources", f"{view.get('cores')} core(s), {view.get('memory_mb')} MB, "
                            f"walltime {view.get('walltime_s')} s"),
              ("transformation", view.get("transformation")),
              ("parameters", view.get("job_pars"))]
    if job["error_code"]:
        fields.insert(0, ("error", f"{job['error_code']}: {job['error_text']}"))
    width = max(len(k) for k, _ in fields)
    lines += [f"  {k:<{width}}  {v}" for k, v in fields if v not in (None, "")]
    files = view.get("Files") or []
    if files:
        lines += ["", "files:", console.table(
            [[f.get("type"), f.get("scope"), f.get("lfn"), f.get("dataset"), f.get("fsize") or "",
              f.get("checksum") or "", f.get("status")] for f in files],
            ("TYPE", "SCOPE", "LFN", "DATASET", "SIZE", "CHECKSUM", "STATUS"))]
    history = view.get("history") or []
    if history:
        lines += ["", "history:", console.table(
            [[console.short_time(h["time"]), h.get("from") or "", h["to"],
              console.duration(h.get("seconds")) if h.get("seconds") is not None else "",
              h.get("actor") or ""] for h in history],
            ("TIME", "FROM", "TO", "IN STATE", "BY"))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- panda retry
def retry_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="panda retry", description="Retry failed or cancelled jobs: a new attempt of each "
        "that has none yet, even past max_attempts; or every such job of an ended task (like "
        "pbook's retry).")
    p.add_argument("job_ids", type=int, nargs="*", help="PandaIDs")
    p.add_argument("--task", type=int, help="every failed or cancelled job of this ended task")
    console.server_options(p)
    args = p.parse_intermixed_args(argv)
    if bool(args.job_ids) == (args.task is not None):
        p.error("give job ids or --task N (one of the two)")

    def body() -> int:
        api = console.client(args)
        if args.task is not None:
            message = api.retry_task(args.task)
            if args.json:
                console.print_json({"task_id": args.task, "message": message})
            else:
                sys.stdout.write(f"task {args.task}: {message}\n")
            return EXIT_OK
        results = api.retry_jobs(args.job_ids)
        if args.json:
            console.print_json(results)
        else:
            for old in args.job_ids:
                new = results.get(str(old))
                sys.stdout.write(f"job {old}: " + (f"retried as job {new}" if isinstance(new, int)
                                                   else str(new)) + "\n")
        return EXIT_OK if all(isinstance(v, int) for v in results.values()) else EXIT_FAILED
    return console.run(body, "panda retry")
