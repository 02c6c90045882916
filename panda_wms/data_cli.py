"""``panda data add`` and ``panda data list``: register a task's input files (``data/add_files``)
and see what a dataset holds.

``add`` takes local files (their size and adler32 are computed; ``--copy-to`` also puts them on
a folder storage element at their replica path) or a list of files already on the storage
element (``--list``: lines ``LFN SIZE ad:CHECKSUM``). Names are checked before anything is sent;
files go in batches, with progress on stderr.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import zlib
from pathlib import Path

from panda_core.replicas import BadFileName, check_name, replica_path

from . import console
from .console import EXIT_OK, UsageError

BATCH = 1000
_CHECKSUM = re.compile(r"ad:[0-9a-fA-F]{8}|md5:[0-9a-fA-F]{32}")


def adler32_of(path: Path) -> str:
    value = 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return f"ad:{value & 0xffffffff:08x}"


def local_entries(paths: list[str]) -> list[tuple[dict, Path]]:
    """(catalogue entry, local path) per file; UsageError for a missing file or a bad name."""
    out = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{name}: no such file")
        try:
            lfn = check_name(path.name)
        except BadFileName as exc:
            raise UsageError(f"{name}: {exc}") from None
        out.append(({"lfn": lfn, "fsize": path.stat().st_size, "checksum": adler32_of(path)},
                    path))
    return out


def list_entries(list_file: str) -> list[dict]:
    """Entries of a ``--list`` file: ``LFN [SIZE [CHECKSUM]]`` per line, # comments."""
    try:
        lines = Path(list_file).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--list {list_file}: cannot read: {exc.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{list_file}, line {n}"
        if len(words) > 3:
            raise UsageError(f"{where}: expected 'LFN [SIZE [CHECKSUM]]', got {line.strip()!r}")
        try:
            entry: dict = {"lfn": check_name(words[0])}
        except BadFileName as exc:
            raise UsageError(f"{where}: {exc}") from None
        if len(words) > 1:
            if not words[1].isdigit():
                raise UsageError(f"{where}: the size must be a number of bytes, got {words[1]!r}")
            entry["fsize"] = int(words[1])
        if len(words) > 2:
            if not _CHECKSUM.fullmatch(words[2]):
                raise UsageError(f"{where}: the checksum must be 'ad:<8 hex>' or 'md5:<32 hex>',"
                                 f" got {words[2]!r}")
            entry["checksum"] = words[2]
        out.append(entry)
    return out


def copy_to_se(root: str, scope: str, files: list[tuple[dict, Path]]) -> None:
    """Put each file at its replica path below a folder storage element's root."""
    base = Path(root[len("file://"):] if root.startswith("file://") else root)
    if not base.is_dir():
        raise UsageError(f"--copy-to {root}: no such folder (the storage element's root)")
    for i, (entry, path) in enumerate(files, 1):
        target = base / replica_path(scope, entry["lfn"])
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and target.stat().st_size == entry["fsize"]
                and adler32_of(target) == entry["checksum"]):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        if len(files) > 100 and (i % 100 == 0 or i == len(files)):
            console.progress(i, len(files), "copied")


def add_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="panda data add", description="Register input files of a dataset with the server "
        "(data/add_files), so that a task can use it as its input_dataset.",
        epilog="examples: panda data add demo.inputs --scope demo --endpoint LOCAL_SE "
        "--copy-to /var/lib/panda/se in/*.txt; panda data add demo.inputs --scope demo "
        "--endpoint LOCAL_SE --list files.txt")
    p.add_argument("dataset")
    p.add_argument("files", nargs="*", help="local files: name = LFN, size and adler32 computed")
    p.add_argument("--scope", required=True, help="the files' scope (the task's 'scope')")
    p.add_argument("--endpoint", metavar="SE_NAME", help="the storage element holding them "
                   "(a site config's storage.input.name): registers a replica there")
    p.add_argument("--copy-to", metavar="SE_ROOT", help="also copy the local files to this "
                   "folder storage element (its root folder or file:// URL), at their replica "
                   "paths")
    p.add_argument("--list", metavar="FILE", help="files already on the storage element: "
                   "lines 'LFN [SIZE [CHECKSUM]]'")
    console.server_options(p)
    args = p.parse_intermixed_args(argv)
    if bool(args.files) == bool(args.list):
        p.error("give local files or --list FILE (one of the two)")
    if args.copy_to and args.list:
        p.error("--copy-to copies local files; files of a --list are on the storage element")

    def body() -> int:
        try:
            check_name(args.dataset, "dataset")
            check_name(args.scope, "scope")
        except BadFileName as exc:
            raise UsageError(str(exc)) from None
        if args.list:
            entries = list_entries(args.list)
        else:
            local = local_entries(args.files)
            if args.copy_to:
                copy_to_se(args.copy_to, args.scope, local)
            entries = [e for e, _ in local]
        if not entries:
            raise UsageError(f"--list {args.list}: no files in it")
        api = console.client(args)
        added = 0
        for start in range(0, len(entries), BATCH):
            batch = entries[start:start + BATCH]
            added += int(api.add_files(args.dataset, args.scope, batch, args.endpoint) or 0)
            if len(entries) > BATCH:
                console.progress(min(start + BATCH, len(entries)), len(entries), "registered")
        if args.json:
            console.print_json({"dataset": args.dataset, "files": len(entries), "added": added})
        else:
            sys.stdout.write(f"dataset {args.dataset}: {added} new file(s) registered, "
                             f"{len(entries) - added} already known"
                             + (f", replicas at {args.endpoint}" if args.endpoint else "") + "\n")
        return EXIT_OK
    return console.run(body, "panda data add")


def list_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="panda data list",
                                description="The files of a dataset and the task using each.")
    p.add_argument("dataset")
    console.server_options(p)
    args = p.parse_args(argv)

    def body() -> int:
        files = console.client(args).call("data", "list_files", dataset=args.dataset)
        if args.json:
            console.print_json(files)
            return EXIT_OK
        if not files:
            sys.stdout.write(f"dataset {args.dataset}: no files (register them with "
                             "'panda data add')\n")
            return EXIT_OK
        rows = [[f.get("scope"), f.get("lfn"), f.get("fsize") or "", f.get("checksum") or "",
                 f.get("task_id") or ""] for f in files]
        sys.stdout.write(console.table(rows, ("SCOPE", "LFN", "SIZE", "CHECKSUM", "TASK")) + "\n")
        unused = sum(1 for f in files if not f.get("task_id"))
        sys.stdout.write(f"{len(files)} file(s), {unused} not used by a task yet\n")
        return EXIT_OK
    return console.run(body, "panda data list")


def main(argv: list[str]) -> int:
    """``panda data add|list``."""
    actions = {"add": add_main, "list": list_main}
    if not argv or argv[0] not in actions:
        if argv and argv[0] in ("-h", "--help"):
            sys.stdout.write(USAGE + "\n")
            return EXIT_OK
        sys.stderr.write(f"panda data: say what to do: {USAGE}\n")
        return console.EXIT_USAGE
    return actions[argv[0]](argv[1:])


USAGE = ("'panda data add DATASET --scope SCOPE [--endpoint SE] FILE...' (or --list FILE), or "
         "'panda data list DATASET'")
