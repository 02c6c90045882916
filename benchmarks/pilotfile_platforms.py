"""What serving a second platform costs the one-file pilot (docs/pilot.md, "Other platforms").

Builds the pilot file twice from this checkout: for this server's platform only, and with
psutil's abi3 wheel for aarch64 (``pip download``, kept in the tests' wheel cache), signs both,
serves them over HTTP on 127.0.0.1 and starts each cold (empty cache: fetch, signature check,
unpack) through the factory's batch command with ``--help`` (the pilot's start, no job), by
the node's python3 (Debian's where there is one). Also a fake aarch64 node (the bootstrap's
``PANDA_PILOT_TEST_PLATFORM``) unpacking the two-platform file. The baseline is ``python -c
pass`` of the same run; times are medians.

Prints one line per run, then one JSON object: bytes_one, bytes_two, cold_one_s, cold_two_s,
cold_aarch64_s, python_start_s and the ratios cold_two_vs_one, cold_aarch64_vs_one.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

NODE_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args) -> None:
        return None


def _timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd="/", check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    import pytest

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from schedulers.bootstrap import batch_command
    from server.pilotfile import FILE_NAME, build
    from testkit import psutil_wheel

    try:
        wheel = psutil_wheel()
    except pytest.skip.Exception as exc:
        print(f"no aarch64 wheel: {exc}")
        return 1
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    with tempfile.TemporaryDirectory(prefix="pf-platforms-") as tmp:
        base = Path(tmp)
        builds = {"one": build(), "two": build(wheels=[wheel])}
        for version, data in builds.values():
            folder = base / "files" / "pilot" / version
            folder.mkdir(parents=True)
            (folder / FILE_NAME).write_bytes(data)
            (folder / (FILE_NAME + ".sig")).write_bytes(key.sign(data))
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(base / "files")))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        cache = base / "cache"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(base),
               "PANDA_PILOT_CACHE": str(cache), "PANDA_PYTHON": NODE_PYTHON}
        runs: dict[str, list[float]] = {"one": [], "two": [], "aarch64": [], "python": []}
        try:
            for i in range(args.runs + 1):             # the first round warms the page cache
                got = {}
                for name, (version, _), extra in (
                        ("one", builds["one"], {}), ("two", builds["two"], {}),
                        ("aarch64", builds["two"], {"PANDA_PILOT_TEST_PLATFORM": "linux-aarch64"})):
                    shutil.rmtree(cache, ignore_errors=True)
                    got[name] = _timed(batch_command(url, version, raw, ["--help"]),
                                       {**env, **extra})
                got["python"] = _timed([NODE_PYTHON, "-c", "pass"], env)
                if i:
                    for name, value in got.items():
                        runs[name].append(value)
                    print(f"run {i}: " + "  ".join(f"{k} {v:.3f} s" for k, v in got.items()))
        finally:
            httpd.shutdown()
    med = {name: statistics.median(values) for name, values in runs.items()}
    out = {"bytes_one": len(builds["one"][1]), "bytes_two": len(builds["two"][1]),
           "cold_one_s": round(med["one"], 4), "cold_two_s": round(med["two"], 4),
           "cold_aarch64_s": round(med["aarch64"], 4), "python_start_s": round(med["python"], 4),
           "cold_two_vs_one": round(med["two"] / med["one"], 3),
           "cold_aarch64_vs_one": round(med["aarch64"] / med["one"], 3),
           "cold_one_vs_python": round(med["one"] / med["python"], 2)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
