"""Stage-in speed of the ``cp`` copytool (copy + adler32 while streaming) against plain ``cp``.

Both copy the same file, page cache warm, alternating, in the same run; the ratio is what
counts (target: stage-in <= 1.15x cp). The copytool's checksum runs on a second core beside the
kernel copy, so on a machine whose cores are busy with other work the ratio grows (the JSON
records the load average). Last line: one JSON object.

    python benchmarks/stagein.py [--size 1GiB] [--repeat 3] [--md5] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import resource
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from copytools import Transfer, load, run_transfer  # noqa: E402
from copytools.checksum import BACKEND  # noqa: E402

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in UNITS:
        return int(float(t[:-1]) * UNITS[t[-1]])
    return int(t)


def make_file(path: str, size: int) -> str:
    """Random-ish content (a random 16 MiB block repeated), and its adler32."""
    block = os.urandom(16 << 20)
    adler = 1
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = block[:min(len(block), left)]
            f.write(chunk)
            adler = zlib.adler32(chunk, adler)
            left -= len(chunk)
    return f"{adler & 0xFFFFFFFF:08x}"


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (cp, the transfer process)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall, cpu) seconds of one call, after flushing dirty pages of the previous one."""
    os.sync()
    cpu, start = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - start, _cpu() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB", help="file size (e.g. 256MiB, 1GiB)")
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--md5", action="store_true", help="catalogue checksum is md5 (slower)")
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="stagein-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "se", "input.bin")
        os.makedirs(os.path.dirname(src))
        adler = make_file(src, size)
        checksum = "ad:" + adler
        if args.md5:
            import hashlib
            h = hashlib.md5()
            with open(src, "rb") as f:
                while data := f.read(16 << 20):
                    h.update(data)
            checksum = "md5:" + h.hexdigest()
        dst_cp = os.path.join(work, "cp.bin")
        dst_in = os.path.join(work, "stagein.bin")
        tool = load("cp")
        t = Transfer("input.bin", "bench", "file://" + src, dst_in, size, checksum)

        def run_cp() -> None:
            subprocess.run(["cp", src, dst_cp], check=True)

        def run_stagein() -> None:
            run_transfer(tool, t, "in", timeout=600, retries=0)

        def measure(fn, dst: str, into: list[tuple[float, float]]) -> None:
            into.append(timed(fn))
            os.unlink(dst)  # each copy starts from the same state: no 1 GiB output lying around

        cp_times: list[tuple[float, float]] = []
        in_times: list[tuple[float, float]] = []
        measure(run_cp, dst_cp, [])  # warm the page cache and both code paths
        measure(run_stagein, dst_in, [])
        for i in range(args.repeat):  # alternate which goes first: the order alone shows up
            pair = [(run_cp, dst_cp, cp_times), (run_stagein, dst_in, in_times)]
            for fn, dst, into in (pair if i % 2 == 0 else pair[::-1]):
                measure(fn, dst, into)
        cp_s, in_s = (statistics.median(w for w, _ in x) for x in (cp_times, in_times))
        cp_cpu, in_cpu = (statistics.median(c for _, c in x) for x in (cp_times, in_times))
        sys.stdout.write(f"file {size / (1 << 20):.0f} MiB, checksum {checksum.split(':')[0]} "
                         f"(adler32 backend {BACKEND}), {args.repeat} runs each, medians\n")
        sys.stdout.write(f"plain cp           {cp_s:8.3f} s  {size / cp_s / 1e9:6.2f} GB/s  "
                         f"cpu {cp_cpu:.3f} s\n")
        sys.stdout.write(f"cp tool, verified  {in_s:8.3f} s  {size / in_s / 1e9:6.2f} GB/s  "
                         f"cpu {in_cpu:.3f} s\n")
        sys.stdout.write(json.dumps({"benchmark": "stagein", "size_bytes": size,
                                     "checksum": checksum.split(":")[0],
                                     "stagein_s": round(in_s, 4), "cp_s": round(cp_s, 4),
                                     "ratio_vs_cp": round(in_s / cp_s, 3),
                                     "stagein_cpu_s": round(in_cpu, 4), "cp_cpu_s": round(cp_cpu, 4),
                                     "load_avg_1m": round(os.getloadavg()[0], 2),
                                     "cpus": os.cpu_count()}) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
