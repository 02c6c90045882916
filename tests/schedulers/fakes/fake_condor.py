#!/usr/bin/env python3
"""A faithful fake of HTCondor's condor_submit, condor_q, condor_history and condor_rm.

HTCondor's daemons cannot run here, so the tests put small wrappers named like the real tools on
PATH; each runs ``fake_condor.py TOOL ARGS...``. The fake keeps a job queue in
``$FAKE_CONDOR_DIR`` (one JSON job ad per job) and really runs vanilla-universe jobs: a detached
runner starts the executable with the submit description's arguments, environment, initialdir,
output and error, records ``JobStatus`` 1 -> 2 -> 4 with ``ExitCode``/``ExitBySignal``, evaluates
``periodic_remove`` every second, and moves finished and removed jobs from the queue to the
history. Output formats follow the HTCondor manual: ``condor_submit -terse`` prints
``C.P - C.P``; ``-json`` prints a JSON list of ads and nothing when no job matches;
``condor_rm`` prints ``Job C.P marked for removal`` and exits 1 when a job is not found.
docs/htcondor.md lists what the fake does not cover.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve()


def state_dir() -> Path:
    value = os.environ.get("FAKE_CONDOR_DIR")
    if not value:
        sys.stderr.write("fake condor: FAKE_CONDOR_DIR is not set\n")
        sys.exit(1)
    path = Path(value)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked():
    with open(state_dir() / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ad_path(cluster: int, proc: int) -> Path:
    return state_dir() / "jobs" / f"{cluster}.{proc}.json"


def read_ad(cluster: int, proc: int) -> dict | None:
    try:
        return json.loads(ad_path(cluster, proc).read_text())
    except (OSError, ValueError):
        return None


def write_ad(ad: dict) -> None:
    path = ad_path(ad["ClusterId"], ad["ProcId"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ad, indent=2, sort_keys=True))
    os.replace(tmp, path)


def all_ads() -> list[dict]:
    ads = []
    for path in (state_dir() / "jobs").glob("*.json"):
        try:
            ads.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(ads, key=lambda a: (a["ClusterId"], a["ProcId"]))


def user_log(ad: dict, code: str, text: str) -> None:
    log = ad.get("UserLog")
    if not log:
        return
    stamp = time.strftime("%m/%d %H:%M:%S")
    try:
        with open(log, "a") as fh:
            fh.write(f"{code} ({ad['ClusterId']:03d}.{ad['ProcId']:03d}.000) {stamp} {text}\n...\n")
    except OSError:
        pass


def check_schedd(name: str | None) -> None:
    """-name must name the fake's schedd (FAKE_CONDOR_SCHEDD), as a real pool would refuse."""
    if os.environ.get("FAKE_CONDOR_HANG"):
        time.sleep(3600)          # a schedd that never answers
    expected = os.environ.get("FAKE_CONDOR_SCHEDD")
    if name and expected and name != expected:
        sys.stderr.write(f"Error: Can't find address for schedd {name}\n")
        sys.exit(1)


# ---------------------------------------------------------------------- ClassAd expressions
_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\d+)|(\"(?:[^\"\\]|\\.)*\")|([A-Za-z_][A-Za-z0-9_.]*)|"
                    r"(=\?=|=!=|==|!=|<=|>=|&&|\|\||[()<>!+\-*/,]))")


class ExprError(ValueError):
    pass


def tokenize(text: str) -> list[tuple[str, object]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError(f"cannot parse near {text[pos:pos + 20]!r}")
        num, string, name, op = m.groups()
        if num is not None:
            tokens.append(("num", float(num) if "." in num else int(num)))
        elif string is not None:
            tokens.append(("str", json.loads(string)))
        elif name is not None:
            tokens.append(("name", name))
        else:
            tokens.append(("op", op))
        pos = m.end()
    return tokens


UNDEFINED = object()
_PREC = {"||": 1, "&&": 2, "==": 3, "!=": 3, "=?=": 3, "=!=": 3, "<": 4, "<=": 4, ">": 4,
         ">=": 4, "+": 5, "-": 5, "*": 6, "/": 6}


def evaluate(text: str, ad: dict):
    """Evaluate the ClassAd expression subset the backend and the fake's tests use."""
    tokens = tokenize(text)
    lower = {k.lower(): v for k, v in ad.items()}
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else (None, None)

    def primary():
        nonlocal pos
        kind, value = peek()
        pos += 1
        if kind == "num" or kind == "str":
            return value
        if kind == "op" and value == "(":
            result = expr(0)
            if peek() != ("op", ")"):
                raise ExprError("missing )")
            pos += 1
            return result
        if kind == "op" and value == "!":
            v = primary()
            return UNDEFINED if v is UNDEFINED else not v
        if kind == "op" and value == "-":
            v = primary()
            return UNDEFINED if v is UNDEFINED else -v
        if kind == "name":
            if peek() == ("op", "("):
                pos += 1
                if value.lower() != "time" or peek() != ("op", ")"):
                    raise ExprError(f"function {value}() is not known to the fake")
                pos += 1
                return int(time.time())
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
            if value.lower() == "undefined":
                return UNDEFINED
            return lower.get(value.lower(), UNDEFINED)
        raise ExprError(f"unexpected {value!r}")

    def binary(op, a, b):
        if op == "=?=":
            return a is not UNDEFINED and b is not UNDEFINED and a == b or (a is b)
        if op == "=!=":
            return not binary("=?=", a, b)
        if op == "||":
            return True if a is True or b is True else (
                UNDEFINED if UNDEFINED in (a, b) else bool(a or b))
        if op == "&&":
            return False if a is False or b is False else (
                UNDEFINED if UNDEFINED in (a, b) else bool(a and b))
        if a is UNDEFINED or b is UNDEFINED:
            return UNDEFINED
        if isinstance(a, str) and isinstance(b, str) and op in ("==", "!="):
            return (a.lower() == b.lower()) == (op == "==")
        return {"==": lambda: a == b, "!=": lambda: a != b, "<": lambda: a < b,
                "<=": lambda: a <= b, ">": lambda: a > b, ">=": lambda: a >= b,
                "+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "/": lambda: a / b if b else UNDEFINED}[op]()

    def expr(min_prec):
        nonlocal pos
        left = primary()
        while True:
            kind, op = peek()
            if kind != "op" or op not in _PREC or _PREC[op] < min_prec:
                return left
            pos += 1
            right = expr(_PREC[op] + 1)
            left = binary(op, left, right)

    result = expr(0)
    if pos != len(tokens):
        raise ExprError(f"trailing input {tokens[pos:]}")
    return result


# ---------------------------------------------------------------------- submit language
def parse_new_syntax_list(value: str, what: str) -> list[str]:
    """HTCondor's new syntax: outer double quotes, "" is ", words split on blanks, '...' groups
    with '' for a single quote."""
    inner = value[1:-1].replace('""', '"')
    words, cur, i, quoted, have = [], [], 0, False, False
    while i < len(inner):
        ch = inner[i]
        if quoted:
            if ch == "'" and inner[i + 1:i + 2] == "'":
                cur.append("'")
                i += 1
            elif ch == "'":
                quoted = False
            else:
                cur.append(ch)
        elif ch == "'":
            quoted, have = True, True
        elif ch in " \t":
            if cur or have:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(ch)
        i += 1
    if quoted:
        raise ValueError(f"{what}: unterminated single quote")
    if cur or have:
        words.append("".join(cur))
    return words


def parse_arguments(value: str) -> list[str]:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        return parse_new_syntax_list(value, "arguments")
    return [w.replace('\\"', '"') for w in value.split()]          # old syntax


def parse_environment(value: str) -> dict[str, str]:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        items = parse_new_syntax_list(value, "environment")
    else:
        items = [i for i in value.split(";") if i]                  # old syntax
    env = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"environment entry {item!r} has no '='")
        env[key] = val
    return env


def expand(value: str, macros: dict[str, str], depth: int = 0) -> str:
    """$(name) macros; $(DOLLAR) is a literal $. Undefined macros expand to nothing."""
    if depth > 10:
        raise ValueError("macro expansion too deep")

    def sub(m):
        name = m.group(1)
        if name.upper() == "DOLLAR":
            return "\0DOLLAR\0"
        return expand(macros.get(name.lower(), ""), macros, depth + 1)

    out = re.sub(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.]*)\)", sub, value)
    return out if depth else out.replace("\0DOLLAR\0", "$")


def parse_submit(text: str) -> tuple[list[tuple[str, str]], int]:
    commands, queue, joined = [], None, []
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            joined.append(raw.rstrip()[:-1])
            continue
        line = "".join(joined) + raw
        joined = []
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"(?i)^queue\b", line):
            rest = line[5:].strip()
            if queue is not None:
                raise ValueError("only one queue statement is supported by the fake")
            if rest and not rest.isdigit():
                raise ValueError(f"queue arguments {rest!r} are not supported by the fake")
            queue = int(rest or 1)
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"Submit file syntax error: {line!r}")
        commands.append((key.strip(), value.strip()))
    if queue is None:
        raise ValueError("no queue statement")
    return commands, queue


# ---------------------------------------------------------------------- tools
def parse_common(argv: list[str], flags: set[str], valued: set[str]) -> tuple[dict, list[str]]:
    opts, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and a != "-":
            name = a.lstrip("-").lower()
            if name in flags:
                opts[name] = True
            elif name in valued:
                if i + 1 >= len(argv):
                    sys.stderr.write(f"Error: {a} requires an argument\n")
                    sys.exit(1)
                opts[name] = argv[i + 1]
                i += 1
            else:
                sys.stderr.write(f"Error: unknown option {a}\n")
                sys.exit(1)
        else:
            rest.append(a)
        i += 1
    return opts, rest


def condor_submit(argv: list[str]) -> int:
    opts, rest = parse_common(argv, {"terse", "verbose", "disable"},
                              {"name", "pool", "batch-name", "file"})
    check_schedd(opts.get("name"))
    source = opts.get("file") or (rest[0] if rest else "-")
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        commands, count = parse_submit(text)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"ERROR: {exc}\n")
        return 1
    with locked():
        counter = state_dir() / "next_cluster"
        cluster = int(counter.read_text()) if counter.exists() else 1
        counter.write_text(str(cluster + 1))
    submit_cwd = os.getcwd()
    for proc in range(count):
        macros = {"cluster": str(cluster), "clusterid": str(cluster), "process": str(proc),
                  "procid": str(proc)}
        for key, value in commands:
            if not key.startswith("+"):
                macros[key.lower()] = value
        try:
            cmd = {k.lower(): expand(v, macros) for k, v in commands if not k.startswith("+")}
            custom = {k[1:]: expand(v, macros) for k, v in commands if k.startswith("+")}
            if "executable" not in cmd:
                raise ValueError("No 'executable' parameter was provided")
            universe = cmd.get("universe", "vanilla").lower()
            if universe not in ("vanilla", "grid"):
                raise ValueError(f"universe {universe} is not supported by the fake")
            if universe == "grid" and not cmd.get("grid_resource"):
                raise ValueError("grid_resource must be specified for the grid universe")
            iwd = cmd.get("initialdir", submit_cwd)
            if not os.path.isdir(iwd):
                raise ValueError(f"No such directory: {iwd}")
            env = dict(os.environ) if cmd.get("getenv", "").lower() == "true" else {}
            env.update(parse_environment(cmd.get("environment", "")))
            ad = {"ClusterId": cluster, "ProcId": proc, "JobStatus": 1, "InQueue": True,
                  "JobUniverse": 9 if universe == "grid" else 5,
                  "Cmd": cmd["executable"], "Arguments": parse_arguments(cmd.get("arguments", "")),
                  "Environment": env, "Iwd": iwd,
                  "Out": os.path.join(iwd, cmd.get("output", "/dev/null")),
                  "Err": os.path.join(iwd, cmd.get("error", "/dev/null")),
                  "UserLog": os.path.join(iwd, cmd["log"]) if cmd.get("log") else None,
                  "RequestCpus": int(cmd.get("request_cpus", 1)),
                  "RequestMemory": int(cmd.get("request_memory", 128)),
                  "PeriodicRemove": cmd.get("periodic_remove"),
                  "GridResource": cmd.get("grid_resource"),
                  "JobBatchName": cmd.get("batch_name"),
                  "QDate": int(time.time()), "EnteredCurrentStatus": int(time.time()),
                  "SubmitCommands": cmd, **custom}
            if ad["PeriodicRemove"]:
                tokenize(ad["PeriodicRemove"])        # refuse what the fake cannot evaluate
        except (ValueError, ExprError) as exc:
            sys.stderr.write(f"ERROR: {exc}\n")
            return 1
        write_ad(ad)
        user_log(ad, "000", "Job submitted from host: <127.0.0.1:9618>")
        if universe == "vanilla":
            subprocess.Popen([sys.executable, str(HERE), "_run", f"{cluster}.{proc}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ})
        # grid-universe jobs stay idle: the fake has no grid manager and no CE to talk to
    if opts.get("terse"):
        sys.stdout.write(f"{cluster}.0 - {cluster}.{count - 1}\n")
    else:
        sys.stdout.write(f"Submitting job(s){'.' * count}\n{count} job(s) submitted to cluster "
                         f"{cluster}.\n")
    return 0


def run_job(job_id: str) -> int:
    """The fake's starter: run one job to its end, as the schedd+shadow+starter would."""
    cluster, proc = (int(x) for x in job_id.split("."))
    with locked():
        ad = read_ad(cluster, proc)
        if ad is None or ad["JobStatus"] != 1:
            return 0
        ad.update(JobStatus=2, EnteredCurrentStatus=int(time.time()), RunnerPid=os.getpid(),
                  JobStartDate=int(time.time()))
        write_ad(ad)
    user_log(ad, "001", "Job executing on host: <127.0.0.1:9618>")
    env = dict(ad["Environment"])
    env["_CONDOR_SCRATCH_DIR"] = ad["Iwd"]
    env["_CONDOR_JOB_IWD"] = ad["Iwd"]
    try:
        with open(ad["Out"], "ab") as out, open(ad["Err"], "ab") as err:
            child = subprocess.Popen([ad["Cmd"], *ad["Arguments"]], cwd=ad["Iwd"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    except OSError as exc:
        with locked():
            ad = read_ad(cluster, proc)
            ad.update(JobStatus=5, EnteredCurrentStatus=int(time.time()),
                      HoldReason=f"Error from starter: Failed to execute '{ad['Cmd']}': "
                                 f"{exc.strerror}", HoldReasonCode=6)
            write_ad(ad)
        user_log(ad, "012", "Job was held.")
        return 0
    while child.poll() is None:
        time.sleep(0.2)
        with locked():
            ad = read_ad(cluster, proc) or ad
        expression = ad.get("PeriodicRemove")
        if expression and ad["JobStatus"] == 2:
            try:
                remove = evaluate(expression, ad) is True
            except ExprError:
                remove = False
            if remove:
                with locked():
                    ad = read_ad(cluster, proc)
                    ad.update(JobStatus=3, InQueue=False, EnteredCurrentStatus=int(time.time()),
                              RemoveReason="The job attribute PeriodicRemove expression "
                                           f"'{expression}' evaluated to TRUE")
                    write_ad(ad)
                user_log(ad, "009", "Job was aborted.")
                os.killpg(os.getpgid(0), signal.SIGKILL)
    code = child.returncode
    with locked():
        ad = read_ad(cluster, proc)
        if ad and ad["JobStatus"] == 2:
            ad.update(JobStatus=4, InQueue=False, EnteredCurrentStatus=int(time.time()),
                      CompletionDate=int(time.time()), ExitBySignal=code < 0)
            if code < 0:
                ad["ExitSignal"] = -code
            else:
                ad["ExitCode"] = code
            write_ad(ad)
            user_log(ad, "005", "Job terminated.")
    return 0


def select(ids: list[str], constraint: str | None, in_queue: bool) -> list[dict]:
    ads = [a for a in all_ads() if a["InQueue"] == in_queue]
    if ids:
        wanted = []
        for i in ids:
            if not re.fullmatch(r"\d+(\.\d+)?", i):
                sys.stderr.write(f"Error: fake condor only takes job ids, not owner {i!r}\n")
                sys.exit(1)
            wanted.append(i)
        ads = [a for a in ads if f"{a['ClusterId']}" in wanted
               or f"{a['ClusterId']}.{a['ProcId']}" in wanted]
    if constraint:
        try:
            evaluate(constraint, {})           # a syntax error is an error with no jobs too
            ads = [a for a in ads if evaluate(constraint, a) is True]
        except ExprError as exc:
            sys.stderr.write(f"Error: Couldn't parse constraint {constraint!r}: {exc}\n")
            sys.exit(1)
    return ads


def print_ads(ads: list[dict], attributes: str | None) -> None:
    if not ads:
        return                       # the real tools print nothing at all when nothing matched
    if attributes:
        names = [a.strip() for a in attributes.split(",") if a.strip()]
        lower = [{k.lower(): (k, v) for k, v in ad.items()} for ad in ads]
        ads = [dict(l[n.lower()] for n in names if n.lower() in l) for l in lower]
    else:
        ads = [{k: v for k, v in ad.items() if k not in ("InQueue", "SubmitCommands")} for ad in ads]
    sys.stdout.write(json.dumps(ads, indent=2) + "\n")


def condor_q(argv: list[str], history: bool = False) -> int:
    valued = {"name", "pool", "constraint", "attributes"} | ({"match", "limit"} if history else set())
    opts, ids = parse_common(argv, {"json", "nobatch", "allusers"}, valued)
    check_schedd(opts.get("name"))
    if not opts.get("json"):
        sys.stderr.write("fake condor: only -json output is implemented\n")
        return 1
    ads = select(ids, opts.get("constraint"), in_queue=not history)
    if history:
        ads = sorted(ads, key=lambda a: a.get("EnteredCurrentStatus", 0), reverse=True)
        limit = opts.get("match") or opts.get("limit")
        if limit:
            ads = ads[:int(limit)]
    print_ads(ads, opts.get("attributes"))
    return 0


def kill_group(pgid: int, grace_s: float = 2.0) -> None:
    """SIGTERM the job's process group, SIGKILL what is left after the grace time."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def condor_rm(argv: list[str]) -> int:
    opts, ids = parse_common(argv, {"forcex", "all"}, {"name", "pool", "constraint"})
    check_schedd(opts.get("name"))
    if not ids and not opts.get("constraint") and not opts.get("all"):
        sys.stderr.write("condor_rm: you must specify a job id, user or constraint\n")
        return 1
    rc = 0
    targets = [(i, select([i], None, True)) for i in ids]
    if opts.get("constraint") or opts.get("all"):
        targets.append((None, select([], opts.get("constraint"), True)))
    for label, ads in targets:
        if not ads:
            if label is None:
                sys.stdout.write(f"Couldn't find/remove all jobs matching constraint "
                                 f"{opts.get('constraint')}\n")
            else:
                sys.stdout.write(f"Job {label} not found\n")
            rc = 1
            continue
        for ad in ads:
            with locked():
                ad = read_ad(ad["ClusterId"], ad["ProcId"])
                pid = ad.get("RunnerPid") if ad["JobStatus"] == 2 else None
                ad.update(JobStatus=3, InQueue=False, EnteredCurrentStatus=int(time.time()),
                          RemoveReason="via condor_rm (by user fake)")
                write_ad(ad)
            if pid:
                kill_group(pid)
            user_log(ad, "009", "Job was aborted.")
        if label is not None and "." not in label:
            sys.stdout.write(f"All jobs in cluster {label} have been marked for removal\n")
        elif label is not None:
            sys.stdout.write(f"Job {label} marked for removal\n")
        else:
            sys.stdout.write("All jobs matching constraint have been marked for removal\n")
    return rc


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: fake_condor.py TOOL ARGS...\n")
        return 2
    tool, rest = argv[1], argv[2:]
    if tool == "_run":
        return run_job(rest[0])
    tools = {"condor_submit": condor_submit, "condor_q": condor_q, "condor_rm": condor_rm,
             "condor_history": lambda a: condor_q(a, history=True)}
    if tool not in tools:
        sys.stderr.write(f"fake condor: unknown tool {tool}\n")
        return 2
    return tools[tool](rest)


def install(bin_dir: Path) -> Path:
    """Write condor_* wrappers running this fake into ``bin_dir``; return ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("condor_submit", "condor_q", "condor_rm", "condor_history"):
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(HERE))} "
                        f"{tool} \"$@\"\n")
        path.chmod(0o755)
    return bin_dir


if __name__ == "__main__":
    sys.exit(main(sys.argv))
