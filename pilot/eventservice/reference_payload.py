#!/usr/bin/env python3
"""A reference payload of the event-service line protocol (docs/eventranges.md), and its merge.

Standard library only and self-contained: copy it next to your own code or read it as the
protocol's example. ``process`` (the default) asks the pilot for ranges (``ready``), "processes"
each event (one line per event: input file, event number, a digest of the two, the PanDA job
that did it) into one output file per range, and reports it (``done <rangeID> <file>``) until the
pilot answers ``end``. ``merge`` concatenates range outputs in the order given.

    reference_payload.py [process] [--workers N] [--sleep-per-event S] [--fail-range K]
    reference_payload.py merge --out FILE IN[,IN...] [IN ...]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time


def process(args: argparse.Namespace) -> int:
    ranges_path = os.environ.get("PANDA_ES_RANGES")
    reports_path = os.environ.get("PANDA_ES_REPORTS")
    if not ranges_path or not reports_path:
        print("not an event-service job: PANDA_ES_RANGES/PANDA_ES_REPORTS are not set",
              file=sys.stderr)
        return 2
    job = os.environ.get("PANDA_ID", "?")
    reports = open(reports_path, "w", buffering=1)     # line-buffered: each message at once
    ranges = open(ranges_path, "r")
    lock = threading.Lock()          # one writer at a time on the reports pipe
    asking = threading.Lock()        # one ready/answer pair at a time
    done = [0]

    def say(line: str) -> None:
        with lock:
            reports.write(line + "\n")

    def answer() -> list[str] | None:
        """One ``range`` line's fields, or None for ``end``."""
        with asking:
            say("ready")
            line = ranges.readline()
        if not line or line.strip() == "end":
            return None
        fields = line.split(" ", 5)
        if fields[0] != "range" or len(fields) != 6:
            raise SystemExit(f"unexpected line from the pilot: {line!r}")
        return fields

    def worker() -> None:
        while True:
            fields = answer()
            if fields is None:
                return
            _, range_id, lfn, first, last, path = fields
            first_n, last_n = int(first), int(last)
            if args.fail_range is not None and first_n == args.fail_range:
                say(f"failed {range_id} asked to fail range {first_n}")
                continue
            out = f"range_{range_id}.txt"
            with open(out + ".part", "w") as f:
                for event in range(first_n, last_n + 1):
                    digest = hashlib.sha256(f"{lfn}:{event}".encode()).hexdigest()[:16]
                    f.write(f"{lfn} {event} {digest} {job}\n")
                    if args.sleep_per_event:
                        time.sleep(args.sleep_per_event)
            os.replace(out + ".part", out)      # the pilot only ever sees a complete file
            say(f"done {range_id} {out}")
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"processed {done[0]} event range(s)")
    return 0


def merge(args: argparse.Namespace) -> int:
    inputs = [name for arg in args.inputs for name in arg.split(",") if name]
    with open(args.out, "wb") as out:
        for name in inputs:
            with open(name, "rb") as f:
                out.write(f.read())
    print(f"merged {len(inputs)} range output(s) into {args.out}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["merge"]:
        p = argparse.ArgumentParser(prog="reference_payload.py merge")
        p.add_argument("--out", required=True)
        p.add_argument("inputs", nargs="+")
        return merge(p.parse_args(argv[1:]))
    if argv[:1] == ["process"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="reference_payload.py")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sleep-per-event", type=float, default=0.0)
    p.add_argument("--fail-range", type=int, default=None, metavar="FIRST_EVENT")
    return process(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
