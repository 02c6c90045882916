"""``panda submit``, ``panda status``, ``panda kill``, ``panda finish``, ``panda pause``,
``panda resume``, ``panda debug``: the user's commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from panda_core.client import ApiClient, ClientError, ServerUnreachable, default_url, load_token


class TaskFileError(ValueError):
    """A task file that cannot be read or parsed; the message names the file and why."""


def read_task_file(path: str) -> dict:
    """Parse a JSON or YAML task file into a dict (the server validates the fields)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read: {exc.strerror}") from None
    if p.suffix.lower() != ".json":
        import yaml  # the 'client' extra; a missing one is named by panda_wms.cli, not as bad YAML
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid "
                                f"JSON: {exc.msg}") from None
    else:
        try:
            data = yaml.load(text, Loader=_yaml12_loader(yaml))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            context = getattr(exc, "context", None)
            raise TaskFileError(f"{path}{where}: not valid YAML: {problem}"
                                + (f" ({context})" if context else "")) from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: a task file must hold a mapping of field -> value, "
                            f"not {type(data).__name__}")
    return data


def _yaml12_loader(yaml):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false. YAML 1.1 also reads
    on/off/yes/no as booleans, so a task's ``notify: {on: [task_end]}`` arrived as ``{true:
    ...}`` and was refused."""
    import re

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    TaskLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                     re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))
    return TaskLoader


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help=f"server URL (default $PANDA_URL or {default_url()})")
    p.add_argument("--token-file", help="bearer token file (default $PANDA_AUTH_TOKEN)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _client(args) -> ApiClient:
    return ApiClient(args.server, load_token(args.token_file))


def _fail(exc: Exception) -> int:
    """The message on stderr; exit 2 for input to fix (a task file, a server URL), else 1."""
    from .console import fail
    return fail(exc)


def submit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda submit", description="Submit a task file.")
    p.add_argument("taskfile")
    _common(p)
    args = p.parse_args(argv)
    try:
        params = read_task_file(args.taskfile)
        client = _client(args)
        task_id = client.submit_task(params)
    except TaskFileError as exc:
        sys.stderr.write(f"panda: {exc}\n")
        return 2
    except ClientError as exc:
        return _fail(exc)
    if args.json:
        sys.stdout.write(json.dumps({"task_id": task_id, "message": client.last_message}) + "\n")
    else:
        sys.stdout.write(f"task {task_id} submitted: {client.last_message}\n")
    return 0


#: task states after which nothing more happens (panda_core.states.FINAL_TASK_STATES)
_TASK_ENDED = ("done", "finished", "failed", "aborted")


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda status", description="Show a task's status.")
    p.add_argument("task_id", type=int)
    p.add_argument("--wait", nargs="?", type=float, const=3600.0, default=None, metavar="S",
                   help="wait up to S seconds (default 3600) for the task to end, showing "
                   "progress; exit 0 only if every job finished (done)")
    _common(p)
    args = p.parse_args(argv)
    try:
        client = _client(args)
        details = client.task_details(args.task_id)
        if args.wait is not None:
            details = _wait_for_task(client, details, args.wait)
    except ClientError as exc:
        return _fail(exc)
    if args.json:
        sys.stdout.write(json.dumps(details, default=str) + "\n")
    else:
        jobs = details.get("jobs", {})
        sys.stdout.write(f"task {details['task_id']} {details['taskName']}: "
                         f"{details['status']}\n")
        for state, n in sorted(jobs.items()):
            sys.stdout.write(f"  {state:<13} {n}\n")
        if details.get("errorDialog"):
            sys.stdout.write(f"  note: {details['errorDialog']}\n")
    if args.wait is None:
        return 0
    return 0 if details["status"] == "done" else 1


def _wait_for_task(client: ApiClient, details: dict, timeout: float) -> dict:
    """Poll until the task ends or ``timeout`` passes; one progress line on stderr per
    change."""
    import time

    deadline = time.monotonic() + timeout
    last = ""
    while details["status"] not in _TASK_ENDED and time.monotonic() < deadline:
        line = f"task {details['task_id']}: {details['status']} " + " ".join(
            f"{k}={v}" for k, v in sorted(details.get("jobs", {}).items()))
        if line != last:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            last = line
        time.sleep(1.0)
        details = client.task_details(details["task_id"])
    if details["status"] not in _TASK_ENDED:
        sys.stderr.write(f"panda status: task {details['task_id']} did not end within "
                         f"{timeout:g} s\n")
    return details


def ping_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda ping", description="Is the server up? Who am I "
                                "to it? (--wait: wait for it to come up, for scripts)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="keep trying for up to S seconds")
    _common(p)
    args = p.parse_args(argv)
    import time

    try:
        client = _client(args)
        deadline = time.monotonic() + max(0.0, args.wait)
        while True:
            try:
                client.is_alive()
                break
            except ServerUnreachable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        who = client.call("system", "whoami")
    except ClientError as exc:
        return _fail(exc)
    if args.json:
        sys.stdout.write(json.dumps({"url": client.url, "alive": True, "identity": who}) + "\n")
    else:
        sys.stdout.write(f"{client.url}: up; you are "
                         + (f"{who['subject']} (role {who['role']})" if who else
                            "anonymous (no token: reads only)") + "\n")
    return 0


def kill_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda kill", description="Kill jobs by PandaID, or a "
                                "whole task (its jobs are killed and it is aborted).")
    p.add_argument("job_ids", type=int, nargs="*", help="PandaIDs")
    p.add_argument("--task", type=int, help="kill this task and every job of it")
    _common(p)
    args = p.parse_intermixed_args(argv)
    if bool(args.job_ids) == (args.task is not None):
        p.error("give job ids or --task N (one of the two)")
    if args.task is not None:
        try:
            message = _client(args).kill_task(args.task)
        except ClientError as exc:
            return _fail(exc)
        if args.json:
            sys.stdout.write(json.dumps({"task_id": args.task, "message": message}) + "\n")
        else:
            sys.stdout.write(f"task {args.task}: aborted, {message}\n")
        return 0
    try:
        results = _client(args).kill_jobs(args.job_ids)
    except ClientError as exc:
        return _fail(exc)
    if args.json:
        sys.stdout.write(json.dumps(dict(zip(map(str, args.job_ids), results))) + "\n")
    else:
        for job_id, ok in zip(args.job_ids, results):
            sys.stdout.write(f"job {job_id}: {'killed' if ok else 'not killed (unknown, not yours, or already ended)'}\n")
    return 0 if all(results) else 1


#: the task commands: what each does, for its --help
TASK_COMMANDS = {
    "finish": "End a task without more jobs: its jobs that have not started are cancelled, "
              "the running ones are killed (--soft: they may end); the task then ends done, "
              "finished or failed by what ran (PanDA's finishTask).",
    "pause": "Pause a task: its queued jobs are held back from pilots, the running ones go "
             "on (PanDA's pauseTask).",
    "resume": "Resume a paused task: its held jobs go to pilots again (PanDA's resumeTask).",
}


def _task_command(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"panda {command}", description=TASK_COMMANDS[command])
    p.add_argument("task_id", type=int, help="the task (jediTaskID)")
    if command == "finish":
        p.add_argument("--soft", action="store_true", help="let the running jobs end")
    _common(p)
    args = p.parse_args(argv)
    options = {"soft": True} if getattr(args, "soft", False) else {}
    try:
        message = _client(args).task_command(command, args.task_id, **options)
    except ClientError as exc:
        return _fail(exc)
    if args.json:
        sys.stdout.write(json.dumps({"task_id": args.task_id, "message": message}) + "\n")
    else:
        sys.stdout.write(f"task {args.task_id}: {message}\n")
    return 0


def finish_main(argv: list[str]) -> int:
    return _task_command("finish", argv)


def pause_main(argv: list[str]) -> int:
    return _task_command("pause", argv)


def resume_main(argv: list[str]) -> int:
    return _task_command("resume", argv)


def debug_main(argv: list[str]) -> int:
    from panda_core.debugview import VIEWS, BadDebugRequest, parse_request, render

    p = argparse.ArgumentParser(
        prog="panda debug", description="Debug mode of a running job: its pilot sends the "
        "asked-for view (tail of the payload's stdout or of a work-dir file, ls, ps, du) in "
        "its updates; show the latest.")
    sub = p.add_subparsers(dest="action", required=True)
    on = sub.add_parser("on", help="ask the job's pilot for a view")
    on.add_argument("job_id", type=int)
    on.add_argument("view", nargs="?", default="tail", choices=VIEWS)
    on.add_argument("name", nargs="?", help="tail: a file of the work dir (default: the "
                    "payload's stdout)")
    off = sub.add_parser("off", help="stop debug mode")
    off.add_argument("job_id", type=int)
    show = sub.add_parser("show", help="print the latest view the pilot sent")
    show.add_argument("job_id", type=int)
    for sp in (on, off, show):
        _common(sp)
    args = p.parse_args(argv)
    try:
        client = _client(args)
        if args.action == "on":
            try:
                request = parse_request(" ".join(x for x in (args.view, args.name) if x))
            except BadDebugRequest as exc:
                p.error(str(exc))          # exit 2: a usage error, nothing was sent
            out = client.set_debug_mode(args.job_id, request.to_wire())
        elif args.action == "off":
            out = client.set_debug_mode(args.job_id, None)
        else:
            out = client.debug_view(args.job_id)
    except ClientError as exc:
        return _fail(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
    elif args.action == "show":
        state = f"debug mode on ({out['debug']})" if out.get("debug") else "debug mode off"
        sys.stdout.write(f"job {out['job_id']} ({out['status']}): {state}\n")
        sys.stdout.write((render(out["view"]) if out.get("view")
                          else "no view received from the pilot yet") + "\n")
    else:
        sys.stdout.write(f"{client.last_message}\n")
    return 0
