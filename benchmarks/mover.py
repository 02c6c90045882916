"""The data service's move of files between two storage elements, against the copytool doing the
same copies directly.

Two ``panda se`` on this host: SRC holds N files; DST accepts third-party COPY from SRC. Phases,
alternated round by round in the same run (the machine is shared and noisy):

- ``copytool``: the ``http`` copytool stages each file in from SRC (GET, adler32 on the way, into
  a local folder on the same disk): what moving the bytes costs when a client does it;
- ``mover``: the ``http`` data mover places each file on DST by third-party COPY (DST pulls from
  SRC, checksums, fsyncs, renames; the mover then checks DST's adler32 against the catalogue);
- ``mover_streamed``: the same mover with third-party copy off (GET from SRC, PUT to DST through
  the mover).

Target: ``ratio_vs_copytool`` (mover / copytool, medians) <= 1.1. Last line: one JSON object.

    python benchmarks/mover.py [--files 100] [--size 64MiB] [--rounds 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from copytools import Transfer, load  # noqa: E402
from panda_core.replicas import replica_path  # noqa: E402
from peers import start_se  # noqa: E402
from server.datamovers import FileRef  # noqa: E402
from server.datamovers.http import HttpMover  # noqa: E402

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(t[:-1]) * UNITS[t[-1]]) if t and t[-1] in UNITS else int(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="20 files of 16 MiB, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.files, args.size, args.rounds = 20, "16MiB", 1
    size = parse_size(args.size)
    base = tempfile.mkdtemp(prefix="panda-mover-bench-")
    src = dst = None
    try:
        src = start_se(os.path.join(base, "src"))
        dst = start_se(os.path.join(base, "dst"), extra_args=["--tpc-allow",
                                                               f"127.0.0.1:{src.port}"])
        block = os.urandom(16 << 20)
        refs = []
        print(f"writing {args.files} files of {size >> 20} MiB at the source ...", file=sys.stderr)
        for i in range(args.files):
            lfn = f"bench.{i:04d}.dat"
            data = (block * (size // len(block) + 1))[:size]
            data = i.to_bytes(8, "big") + data[8:]        # every file different
            path = os.path.join(src.root, replica_path("bench", lfn))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            refs.append(FileRef("bench", lfn, size, f"ad:{zlib.adler32(data):08x}"))
        local = os.path.join(base, "local")
        tool = load("http")
        times: dict[str, list[float]] = {"copytool": [], "mover": [], "mover_streamed": []}

        def clear_dst() -> None:
            shutil.rmtree(os.path.join(dst.root, "bench"), ignore_errors=True)
            shutil.rmtree(local, ignore_errors=True)
            os.makedirs(local)

        def phase(name: str) -> float:
            clear_dst()
            mover = HttpMover(third_party=(name == "mover"))
            t0 = time.perf_counter()
            for r in refs:
                s_url = f"{src.url}/{replica_path('bench', r.lfn)}"
                if name == "copytool":
                    tool.stage_in(Transfer(lfn=r.lfn, scope="bench", surl=s_url,
                                           local_path=os.path.join(local, r.lfn),
                                           fsize=r.fsize, checksum=r.checksum), 600)
                else:
                    mover.copy(s_url, f"{dst.url}/{replica_path('bench', r.lfn)}", r, 600)
            return time.perf_counter() - t0

        for rnd in range(args.rounds):
            order = list(times) if rnd % 2 == 0 else list(reversed(times))
            for name in order:
                elapsed = phase(name)
                times[name].append(elapsed)
                print(f"round {rnd + 1}/{args.rounds} {name:15s} {elapsed:7.2f} s "
                      f"({args.files * size / elapsed / 1e6:7.1f} MB/s)", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "ratio_vs_copytool": round(med["mover"] / med["copytool"], 3),
            "streamed_ratio_vs_copytool": round(med["mover_streamed"] / med["copytool"], 3),
            "files": args.files, "file_mib": size >> 20, "rounds": args.rounds,
            "copytool_s": round(med["copytool"], 2), "mover_s": round(med["mover"], 2),
            "mover_streamed_s": round(med["mover_streamed"], 2),
            "load_avg": round(os.getloadavg()[0], 2),
        }
        print(f"mover (third-party COPY) {result['ratio_vs_copytool']}x the copytool, "
              f"streamed {result['streamed_ratio_vs_copytool']}x", file=sys.stderr)
        print(json.dumps(result))
        return 0
    finally:
        for se in (src, dst):
            if se is not None:
                se.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
