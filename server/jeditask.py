"""JEDI task parameters (what prun, pathena and panda-client's ``insertTaskParams`` send) as a
task description of ours (docs/contracts.md, "Task file").

JEDI's dict names the task (``taskName``, often the output container with a trailing ``/``),
its job parameters as a typed list (constants, and templates over ``${IN}``, outputs and the
log), the input dataset (``dsForIN``), how to split (``nFilesPerJob``, ``nEventsPerJob``) and
many knobs. What has a meaning here is translated; everything else is kept as sent in the
task's ``jedi_parameters`` and ignored; what cannot run here correctly (secondary input
datasets, a build step, merge jobs) is refused with a reason instead of being run wrongly.
docs/compat.md lists every key.
"""
from __future__ import annotations

import ast
import re
import shlex
import urllib.parse
from typing import Any

from panda_core.replicas import BadFileName, check_name

from .jobcreator import TaskSpecError

#: PanDA's task submission return codes (panda-client's insertTaskParams)
CODE_OK = 0
CODE_DUPLICATE = 2        # "duplication in JEDI": a live task of the user has this name
CODE_REFUSED = 4          # the server could not take the task (the message says why)

#: JEDI's job-parameter placeholders and ours
_PLACEHOLDERS = [
    (re.compile(r"\$\{IN(?:/[A-Za-z]+)?\}"), "${IN}"),
    (re.compile(r"\$\{SN(?:/P)?\}"), "${SN}"),
    (re.compile(r"\$JEDITASKID|\$\{JEDITASKID\}"), "${TASKID}"),
    (re.compile(r"\$\{OUTPUT(\d+)\}"), r"${OUT\1}"),
]
_UNSUPPORTED = re.compile(r"\$\{(MIDDLENAME|LIB|DBR|TRN_[A-Z]+|SEQNUMBER|IN_\w+|\w+/F)\}")
#: the keys this module reads; every other key is kept and ignored
USED_KEYS = {"taskName", "userName", "vo", "prodSourceLabel", "taskType", "jobParameters",
             "dsForIN", "log", "nFilesPerJob", "nEventsPerJob", "nEventsPerInputFile",
             "nFiles", "nJobs", "nEvents", "noInput", "site", "currentPriority", "taskPriority",
             "workingGroup", "coreCount", "ramCount", "ramCountUnit", "maxAttempt",
             "transferType", "transPath", "sourceURL", "buildSpec", "mergeSpec", "mergeOutput",
             "uniqueTaskName", "architecture", "transUses", "transHome", "processingType",
             "excludedSite", "includedSite", "cloud"}
#: runGen's options (prun's jobs without transPath) and whether each takes a value
_RUNGEN_OPTIONS = {"-j": True, "--sourceURL": True, "-r": True, "-a": True, "-o": True,
                   "-i": True, "-p": True}
#: runGen's placeholders in the user's command, and ours
_RUNGEN_PLACEHOLDERS = {"%IN": "${IN}", "%SKIPEVENTS": "${SKIPEVENTS}",
                        "%FIRSTEVENT": "${FIRSTEVENT}", "%MAXEVENTS": "${MAXEVENTS}"}
_RUNGEN_UNSUPPORTED = re.compile(r"%(RNDM|DB|BKG|CAVIN|BHIN|MININ|BEAM|LOG|OUT)\b")


def is_jedi_task(params: Any) -> bool:
    """JEDI's dict, not ours: it has ``taskName`` or a typed ``jobParameters`` list."""
    return isinstance(params, dict) and ("taskName" in params
                                         or isinstance(params.get("jobParameters"), list))


def _refuse(key: str, why: str) -> TaskSpecError:
    return TaskSpecError(f"field {key!r}: {why}")


def _text(params: dict, key: str) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _refuse(key, "must be a string")
    return value


def _int(params: dict, key: str) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _refuse(key, "must be an integer")
    try:
        number = int(value)
    except ValueError:
        raise _refuse(key, "must be an integer") from None
    if number != float(value) or not 0 <= number < 2**31:
        raise _refuse(key, "must be a whole number from 0")
    return number


def dataset_name(name: str) -> str:
    """A Rucio container/dataset name as a dataset here: no ``scope:`` and no trailing ``/``."""
    return name.split(":", 1)[-1].rstrip("/")


def _fill(value: str, key: str, source_url: str) -> str:
    found = _UNSUPPORTED.search(value)
    if found:
        raise _refuse(key, f"placeholder {found.group(0)} is not supported here")
    value = value.replace("${SURL}", source_url)
    for pattern, ours in _PLACEHOLDERS:
        value = pattern.sub(ours, value)
    return value


def _job_parameters(items: list, source_url: str) -> tuple[str, list[str], str | None, str | None]:
    """The command line, output lfn patterns, output dataset and input dataset of the list."""
    if not items or not all(isinstance(i, dict) for i in items):
        raise _refuse("jobParameters", "must be a non-empty list of mappings")
    words: list[str] = []
    outputs: list[str] = []
    out_dataset = in_dataset = None
    glue = False                               # the previous item had "padding": False
    for n, item in enumerate(items):
        where = f"jobParameters[{n}]"
        kind, value = item.get("type"), item.get("value", "")
        if not isinstance(value, str):
            raise _refuse(f"{where}.value", "must be a string")
        if kind not in ("constant", "template"):
            raise _refuse(f"{where}.type", "must be 'constant' or 'template'")
        text: str | None = None
        param_type = item.get("param_type")
        if kind == "constant":
            text = None if value == "__delimiter__" else value
            if value != "__delimiter__" and "${" in value:
                text = _fill(value, f"{where}.value", source_url)
        elif param_type == "input":
            ds = item.get("dataset")
            if not isinstance(ds, str) or not ds:
                raise _refuse(f"{where}.dataset", "an input template needs its dataset")
            if in_dataset is not None and dataset_name(ds) != in_dataset:
                raise _refuse(where, "a second input dataset (secondary inputs such as DBR) "
                                     "is not supported here")
            in_dataset = dataset_name(ds)
            text = _fill(value, f"{where}.value", source_url)
        elif param_type == "output":
            ds = item.get("dataset")
            if not isinstance(ds, str) or not ds:
                raise _refuse(f"{where}.dataset", "an output template needs its dataset")
            if value.startswith("regex|"):
                raise _refuse(f"{where}.value", "regular-expression outputs are not supported")
            out_dataset = out_dataset or dataset_name(ds)
            outputs.append(_fill(value, f"{where}.value", source_url))
            if not item.get("hidden"):
                text = f"${{OUT{len(outputs) - 1}}}"
        elif param_type == "log":
            continue                           # the server makes every job's log tarball
        else:
            raise _refuse(f"{where}.param_type", f"{param_type!r} is not supported here "
                                                 "(input, output)")
        if text is None or item.get("hidden") and param_type != "output":
            continue
        if glue and words:
            words[-1] += text
        else:
            words.append(text)
        glue = item.get("padding") is False
    return " ".join(words), outputs, out_dataset, in_dataset


def task_from_jedi(params: dict) -> dict:
    """Our task description for JEDI's ``params``; TaskSpecError names the key and why."""
    name = _text(params, "taskName")
    if not name:
        raise _refuse("taskName", "required")
    if params.get("buildSpec"):
        raise _refuse("buildSpec", "a build step is not supported here: submit with --noBuild "
                                   "(the sandbox runs as uploaded)")
    if params.get("mergeSpec") or params.get("mergeOutput"):
        raise _refuse("mergeSpec", "merge jobs are not supported here")
    source_url = _text(params, "sourceURL") or ""
    items = params.get("jobParameters")
    if not isinstance(items, list):
        raise _refuse("jobParameters", "required, JEDI's list of constants and templates")
    command, outputs, out_dataset, in_dataset = _job_parameters(items, source_url)
    ds_for_in = _text(params, "dsForIN")
    if ds_for_in:
        if in_dataset and dataset_name(ds_for_in) != in_dataset:
            raise _refuse("dsForIN", f"names {ds_for_in!r}, the input template {in_dataset!r}")
        in_dataset = dataset_name(ds_for_in)
    if params.get("noInput"):
        in_dataset = None
    task_name = re.sub(r"[^A-Za-z0-9._-]", "_", dataset_name(name)).lstrip("._-")[:200]
    trans = _text(params, "transPath")
    if trans is None:            # prun's jobs: PanDA's runGen wrapper, as a script of ours
        trans, command = "/bin/sh", rungen_script(command)
    task: dict[str, Any] = {
        "name": task_name or "task",
        "transformation": trans,
        "job_parameters": command,
        "jedi_parameters": params,
    }
    # the user's Rucio scope is the first two fields of its datasets: user.<name>
    scope_source = out_dataset or dataset_name(name)
    fields = scope_source.split(".")
    if len(fields) >= 2 and fields[0] in ("user", "group"):
        task["scope"] = ".".join(fields[:2])
    if in_dataset:
        task["input_dataset"] = in_dataset
    if outputs:
        task["outputs"], task["output_dataset"] = outputs, out_dataset
    for ours, theirs in (("site", "site"), ("prod_source_label", "prodSourceLabel"),
                         ("working_group", "workingGroup"), ("transfer_type", "transferType")):
        value = _text(params, theirs)
        if value:
            task[ours] = value
    if task.get("transfer_type") and task["transfer_type"] != "direct":
        del task["transfer_type"]              # JEDI's other transfer types mean nothing here
    priority = _int(params, "currentPriority")
    priority = priority if priority is not None else _int(params, "taskPriority")
    if priority is not None:
        task["priority"] = priority
    for ours, theirs in (("files_per_job", "nFilesPerJob"), ("events_per_job", "nEventsPerJob"),
                         ("events_per_file", "nEventsPerInputFile"),
                         ("max_attempts", "maxAttempt")):
        value = _int(params, theirs)
        if value:
            task[ours] = value
    if in_dataset and task.get("events_per_job") and not task.get("events_per_file"):
        raise _refuse("nEventsPerJob", "needs nEventsPerInputFile (the events in each file)")
    if not in_dataset:
        jobs = _int(params, "nJobs")
        if not jobs:
            events, per_job = _int(params, "nEvents"), _int(params, "nEventsPerJob")
            jobs = -(-events // per_job) if events and per_job else 1
        task["n_jobs"] = jobs
        task.pop("events_per_job", None)
        task.pop("events_per_file", None)
    resources: dict[str, int] = {}
    cores = _int(params, "coreCount")
    if cores:
        resources["cores"] = cores
    ram = _int(params, "ramCount")
    if ram:
        per_core = str(params.get("ramCountUnit") or "MBPerCore").startswith("MBPerCore")
        resources["memory_mb"] = ram * (cores or 1) if per_core else ram
    if resources:
        task["resources"] = resources
    return task


def rungen_script(command: str) -> str:
    """What PanDA's runGen does for a prun job, as ``-c <sh script>`` for ``/bin/sh``: fetch the
    sandbox (``-a``) from the server's cache at ``--sourceURL``, unpack it, run the user's
    command (``-p``, URL-encoded, ``%IN`` = the inputs joined by commas) in ``-r``, and rename
    its outputs as ``-o`` maps them. The placeholders (``${IN}``, output names) are filled per
    job by the job creator; everything in the script is quoted."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise _refuse("jobParameters", f"cannot read runGen's arguments: {exc}") from None
    opts: dict[str, str] = {}
    n = 0
    while n < len(words):
        word = words[n]
        if word not in _RUNGEN_OPTIONS:
            raise _refuse("jobParameters", f"runGen option {word!r} is not supported here")
        if n + 1 >= len(words):
            raise _refuse("jobParameters", f"runGen option {word} needs a value")
        opts[word], n = words[n + 1], n + 2
    for key in ("--sourceURL", "-a", "-p"):
        if not opts.get(key):
            raise _refuse("jobParameters", f"runGen needs {key} (prun --noBuild sends it)")
    source = opts["--sourceURL"].rstrip("/")
    if urllib.parse.urlsplit(source).scheme not in ("http", "https"):
        raise _refuse("sourceURL", "must be the server's http(s) URL")
    try:
        archive = check_name(opts["-a"], "sandbox")
    except BadFileName as exc:
        raise _refuse("jobParameters", str(exc)) from None
    rundir = opts.get("-r") or "."
    if rundir.startswith("/") or ".." in rundir.split("/"):
        raise _refuse("jobParameters", "runGen's -r must be a folder inside the sandbox")
    user_command = urllib.parse.unquote(opts["-p"])
    found = _RUNGEN_UNSUPPORTED.search(user_command)
    if found:
        raise _refuse("jobParameters", f"runGen placeholder {found.group(0)} is not supported")
    for theirs, ours in _RUNGEN_PLACEHOLDERS.items():
        user_command = user_command.replace(theirs, ours)
    renames: dict = {}
    if opts.get("-o"):
        try:
            renames = ast.literal_eval(opts["-o"])
        except (ValueError, SyntaxError):
            raise _refuse("jobParameters", "runGen's -o is not a mapping of file names") from None
        if not isinstance(renames, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in renames.items()):
            raise _refuse("jobParameters", "runGen's -o is not a mapping of file names")
    fetch = ("import shutil, sys, urllib.request; shutil.copyfileobj(urllib.request.urlopen("
             "sys.argv[1], timeout=300), open(sys.argv[2], 'wb'))")
    lines = ["set -e", 'top="$(pwd)"',
             f"python3 -c {shlex.quote(fetch)} {shlex.quote(f'{source}/cache/{archive}')} "
             f"{shlex.quote(archive)}",
             f"tar -xzf {shlex.quote(archive)}",
             f"cd {shlex.quote(rundir)}",
             f"sh -c {shlex.quote(user_command)}"]
    for produced, lfn in renames.items():
        if "*" in produced or "/" in produced or produced.startswith("regex|"):
            raise _refuse("jobParameters", f"output {produced!r}: wildcards and folders are not "
                                           "supported here")
        lines.append(f'mv -f {shlex.quote(produced)} "$top"/{shlex.quote(lfn)}')
    return "-c " + shlex.quote("\n".join(lines))
