"""Pilot overhead: pilot start -> payload start, and payload end -> pilot exit.

Each run starts ``panda pilot`` against a local dispatcher (the tests' faithful fake, on
127.0.0.1) that hands out one job with no input files; the payload writes the time it started and
the time it ended. The baseline, measured in the same run, is the bare cost of ``python -c pass``.

The installed pilot runs with its bytecode cached (in a temporary ``PYTHONPYCACHEPREFIX``,
written by the warm-up run), as on any node: pip compiles at install, a checkout writes
``__pycache__`` at its first run. Where the environment sets ``PYTHONDONTWRITEBYTECODE`` (this
project's shared machine does) every run would compile every module again; that cost is
measured too, runs alternating, as ``start_to_payload_no_bytecode_s``.

The one-file pilot (issue 16) is measured the way a batch job starts it: the factory's batch
command (schedulers/bootstrap.py) run by the node's python3 (Debian's /usr/bin/python3 where
there is one: no panda-wms there), the file built by server/pilotfile.py, signed, and served
over HTTP on 127.0.0.1. Cold: an empty cache (fetch, signature check, unpack and the first
compile of every module included); warm: the cache from the previous run. With the sandbox
helper's ``bwrap`` runtime on main (a ``sandbox`` key in the site config), warm starts with
``sandbox: {runtime: bwrap}`` and without alternate; ``sandbox_extra_s`` is the median of their
differences (null where that runtime is not there).

Prints one line per run, then one JSON object: start_to_payload_s, payload_end_to_exit_s,
python_start_s, pilot_rss_mb (medians), ratios against python_start_s, and onefile_cold_s,
onefile_warm_s, onefile_warm_fingerprint_s (a warm start with the key pinned as the factory
pins it, ``--public-key-fingerprint``, instead of by a PEM file), onefile_rss_mb, onefile_bytes,
sandbox_extra_s, onefile_node_compile_s (the batch script's decode and compile of its node
program, alone: the most a cache of its compiled code could save a start).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "pilot")]

from pilotkit import TOKEN, make_job, pilot_cmd, pilot_env, site_config  # noqa: E402
from fakepanda import FakePanda  # noqa: E402


def timed_wait(proc: subprocess.Popen) -> tuple[float, int]:
    """Wait for ``proc``; return (exit time, max RSS in kB) from wait4."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.time(), usage.ru_maxrss


def python_start() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.time() - t0


def pilot_run(fake: FakePanda, base: Path, i: int, with_log: bool,
              bytecode: bool = True) -> tuple[float, float, float]:
    """(start to payload, payload end to exit, max RSS MB) of one installed pilot; with
    ``bytecode``, its modules' bytecode cached below ``base``."""
    marks = base / f"marks{i}"
    script = f"date +%s.%N > {marks}.start; date +%s.%N > {marks}.end"
    fake.add_job(make_job(1000 + i, script, log=with_log))
    cmd = pilot_cmd(fake, base / "wd", "--max-jobs", "1", "--no-recovery")
    env = pilot_env({"PANDA_LOG_LEVEL": "WARNING"})
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_exit, maxrss_kb = timed_wait(proc)
    if proc.returncode != 0 or not fake.final(1000 + i):
        raise SystemExit(f"pilot run {i} failed (exit {proc.returncode})")
    start = float(Path(f"{marks}.start").read_text())
    end = float(Path(f"{marks}.end").read_text())
    return start - t0, t_exit - end, maxrss_kb / 1024


NODE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


class OneFile:
    """The pilot file built, signed and served; the batch command that runs it on a 'node'."""

    def __init__(self, base: Path) -> None:
        import functools
        import http.server
        import threading

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from server.pilotfile import FILE_NAME, build

        self.version, data = build()
        key = Ed25519PrivateKey.generate()
        root = base / "files" / "pilot" / self.version
        root.mkdir(parents=True)
        (root / FILE_NAME).write_bytes(data)
        (root / (FILE_NAME + ".sig")).write_bytes(key.sign(data))
        self.bytes = len(data)
        self.key = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
        handler = functools.partial(_QuietHandler, directory=str(base / "files"))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.cache = base / "node-cache"

    def command(self, pilot_args: list[str]) -> list[str]:
        from schedulers.bootstrap import batch_command
        return batch_command(self.url, self.version, self.key, pilot_args)

    def env(self) -> dict:
        env = {k: v for k, v in pilot_env({"PANDA_LOG_LEVEL": "WARNING"}).items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(PATH="/usr/local/bin:/usr/bin:/bin", PANDA_PILOT_CACHE=str(self.cache),
                   PANDA_PYTHON=NODE_PYTHON)
        return env

    def stop(self) -> None:
        self.httpd.shutdown()


def _quiet_log(*_args) -> None:
    return None


import http.server  # noqa: E402


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    log_message = _quiet_log


def onefile_run(fake: FakePanda, onefile: OneFile, base: Path, i: int, cold: bool,
                with_log: bool, by_fingerprint: bool = False) -> tuple[float, float]:
    """(start to payload, max RSS MB) of one batch-command start of the pilot file; with
    ``by_fingerprint`` the server key is pinned as the factory pins it
    (``--public-key-fingerprint``), else by its PEM file."""
    import shutil

    from panda_core.trust import key_fingerprint

    if cold:
        shutil.rmtree(onefile.cache, ignore_errors=True)
    # the payload's start goes to its stdout, in its work dir (kept): a sandboxed payload can
    # write nowhere else
    fake.add_job(make_job(5000 + i, "date +%s.%N", log=with_log))
    pin = ["--public-key-fingerprint", key_fingerprint(fake.pem)] if by_fingerprint else []
    args = pilot_cmd(fake, base / "wd", "--max-jobs", "1", "--no-recovery",
                     "--keep-workdirs", *pin)[4:]
    t0 = time.time()
    proc = subprocess.Popen(onefile.command(args), env=onefile.env(), cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, maxrss_kb = timed_wait(proc)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0 or not fake.final(5000 + i):
        raise SystemExit(f"one-file pilot run {i} failed (exit {proc.returncode}): {err[-2000:]}")
    [stdout] = (base / "wd").glob(f"panda_job_{5000 + i}_*/work/payload.stdout")
    started = float(stdout.read_text().split()[0])
    shutil.rmtree(stdout.parent.parent)
    return started - t0, maxrss_kb / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-log", action="store_true", help="jobs without a log tarball")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        se = base / "se"
        se.mkdir()
        fake = FakePanda(site_config(se), token=TOKEN).start()
        try:
            pilot_run(fake, base, 0, not args.no_log)      # page cache and bytecode
            python_start()
            py, s2p, e2x, rss, nopyc = [], [], [], [], []
            for i in range(1, args.runs + 1):
                py.append(python_start())
                a, b, c = pilot_run(fake, base, i, not args.no_log)
                nopyc.append(pilot_run(fake, base, 100 + i, not args.no_log, bytecode=False)[0])
                s2p.append(a)
                e2x.append(b)
                rss.append(c)
                print(f"run {i}: python_start {py[-1]:.3f} s  start_to_payload {a:.3f} s  "
                      f"payload_end_to_exit {b:.3f} s  pilot_rss {c:.1f} MB  "
                      f"(no bytecode: start_to_payload {nopyc[-1]:.3f} s)")
            onefile = OneFile(base)
            try:
                onefile_run(fake, onefile, base, 0, True, not args.no_log)   # page cache
                cold, warm, warm_fp, of_rss = [], [], [], []
                for i in range(1, args.runs + 1):
                    c_s, c_rss = onefile_run(fake, onefile, base, 3 * i, True, not args.no_log)
                    w_s, w_rss = onefile_run(fake, onefile, base, 3 * i + 1, False,
                                             not args.no_log)
                    f_s, f_rss = onefile_run(fake, onefile, base, 3 * i + 2, False,
                                             not args.no_log, by_fingerprint=True)
                    cold.append(c_s)
                    warm.append(w_s)
                    warm_fp.append(f_s)
                    of_rss += [c_rss, w_rss, f_rss]
                    print(f"one-file run {i}: cold {c_s:.3f} s  warm {w_s:.3f} s  "
                          f"warm by fingerprint {f_s:.3f} s  rss {max(c_rss, w_rss, f_rss):.1f} MB")
                sandbox_extra = sandbox_extra_s(fake, onefile, base, args)
                node_compile = node_compile_s()
            finally:
                onefile.stop()
        finally:
            fake.stop()
    out = {"start_to_payload_s": round(statistics.median(s2p), 4),
           "payload_end_to_exit_s": round(statistics.median(e2x), 4),
           "python_start_s": round(statistics.median(py), 4),
           "pilot_rss_mb": round(statistics.median(rss), 1),
           "runs": args.runs, "with_log": not args.no_log,
           "start_to_payload_no_bytecode_s": round(statistics.median(nopyc), 4)}
    out["start_to_payload_vs_python"] = round(out["start_to_payload_s"] / out["python_start_s"], 2)
    out["end_to_exit_vs_python"] = round(out["payload_end_to_exit_s"] / out["python_start_s"], 2)
    out.update(onefile_cold_s=round(statistics.median(cold), 4),
               onefile_warm_s=round(statistics.median(warm), 4),
               onefile_warm_fingerprint_s=round(statistics.median(warm_fp), 4),
               onefile_rss_mb=round(max(of_rss), 1), onefile_bytes=onefile.bytes,
               sandbox_extra_s=sandbox_extra, onefile_python=NODE_PYTHON,
               onefile_node_compile_s=node_compile)
    out["onefile_warm_vs_python"] = round(out["onefile_warm_s"] / out["python_start_s"], 2)
    out["onefile_cold_vs_python"] = round(out["onefile_cold_s"] / out["python_start_s"], 2)
    print(json.dumps(out))
    return 0


def node_compile_s(rounds: int = 200) -> float:
    """The median time the node's Python takes for what every start of the batch script does
    before the node program runs: decode, decompress and compile it (what a cache of its
    compiled code on the node could save at most). Measured in a process of its own, the
    node's Python, rounds one after the other."""
    from schedulers.bootstrap import node_program

    code = (f"import base64,statistics,sys,time,zlib\n"
            f"blob=base64.b64encode(zlib.compress({node_program().encode()!r},9))\n"
            "t=[]\n"
            f"for _ in range({rounds}):\n"
            " t0=time.perf_counter()\n"
            " compile(zlib.decompress(base64.b64decode(blob)),'panda-pilot-bootstrap','exec')\n"
            " t.append(time.perf_counter()-t0)\n"
            "print(statistics.median(t))\n")
    out = subprocess.run([NODE_PYTHON, "-E", "-s", "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return round(float(out), 5)


def sandbox_extra_s(fake, onefile, base, args) -> float | None:
    """The median of (warm start with ``sandbox: {runtime: bwrap}`` minus warm start without),
    the two alternating (which goes first alternates too, so a drift of the machine's load
    cancels out); None where the site config has no ``sandbox`` key or bwrap does not run.
    A first sandboxed run records the runtime's probe in the job dirs' base, as the first
    pilot of a node does for the others."""
    from dataclasses import fields

    from panda_core.siteconfig import SiteConfig

    if "sandbox" not in {f.name for f in fields(SiteConfig)}:
        print("sandbox: the site config has no 'sandbox' key here: sandbox_extra_s is null")
        return None
    plain_config = dict(fake.site_config)
    boxed_config = {**plain_config, "sandbox": {"runtime": "bwrap"}}

    def warm(i: int, boxed: bool) -> float:
        fake.site_config = boxed_config if boxed else plain_config
        return onefile_run(fake, onefile, base, i, False, not args.no_log)[0]

    try:
        warm(900, True)
        extra = []
        for i in range(args.runs):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {boxed: warm(901 + 2 * i + j, boxed) for j, boxed in enumerate(order)}
            extra.append(got[True] - got[False])
            print(f"sandbox round {i + 1}: none {got[False]:.3f} s  bwrap {got[True]:.3f} s")
    except SystemExit as exc:
        print(f"sandbox: the bwrap runtime did not run here ({exc}): sandbox_extra_s is null")
        return None
    finally:
        fake.site_config = plain_config
    return round(statistics.median(extra), 4)


if __name__ == "__main__":
    sys.exit(main())
