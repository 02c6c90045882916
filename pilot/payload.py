"""Run the payload: own work dir, own process group, allow-listed environment, whole-tree kill.

The payload is started through a one-line ``sh`` wrapper that writes its exit code to
``.payload_exit`` in the work dir: if the pilot dies, a later pilot still learns how the payload
ended (recovery). The pilot only ever signals processes of the session it created, and checks
each one's creation time, so a recycled pid is never hit.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

EXIT_FILE = ".payload_exit"
STDOUT = "payload.stdout"
STDERR = "payload.stderr"
_WRAPPER = '"$@"; rc=$?; echo "$rc" > ' + EXIT_FILE + '; exit "$rc"'

#: what the payload gets of the pilot's environment by default: where programs are, who and where
#: it is, its locale and time zone, the public CA folder. Everything else (tokens, passwords,
#: database URLs, agent sockets, cloud keys, whatever a name may be) stays with the pilot.
DEFAULT_PAYLOAD_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ",
                       "TMPDIR", "X509_CERT_DIR")


def scrub_env(env: Mapping[str, str], extra: Mapping[str, str] | None = None,
              allow: tuple[str, ...] = ()) -> dict[str, str]:
    """The payload's environment, built from an allow list: of ``env`` only the variables named
    by ``DEFAULT_PAYLOAD_ENV`` or ``allow`` (names, or prefixes ending in ``*``: the site's
    ``trust.payload_env``, handed over as ``--payload-env``), then what the pilot sets
    (``extra``)."""
    names = {n for n in (*DEFAULT_PAYLOAD_ENV, *allow) if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in (*DEFAULT_PAYLOAD_ENV, *allow) if n.endswith("*"))
    clean = {k: v for k, v in env.items() if k in names or k.startswith(prefixes)}
    clean.update(extra or {})
    return clean


@dataclass
class Sample:
    """One look at the payload's process tree."""
    time: float
    pids: list[int]
    rss_kb: int
    pss_kb: int
    cpu_s: float


@dataclass
class PayloadResult:
    exit_code: int | None           # None when it ended by a signal
    signal: int | None
    cpu_s: float
    max_rss_kb: int
    max_pss_kb: int
    start: float
    end: float
    killed: bool = False            # the pilot killed it

    @property
    def wall_s(self) -> float:
        return self.end - self.start


@dataclass
class Payload:
    argv: list[str]
    workdir: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    start_time: float = 0.0
    max_rss_kb: int = 0
    max_pss_kb: int = 0
    result: PayloadResult | None = None
    last_sample: Sample | None = None
    _cpu_seen: dict[tuple[int, float], float] = field(default_factory=dict)
    _create_time: float = 0.0
    _killed: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> int:
        """Start the payload; return its pid. Raises OSError if the wrapper cannot start."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / EXIT_FILE).unlink(missing_ok=True)
        (self.workdir / ".payload_times").unlink(missing_ok=True)
        out = open(self.workdir / STDOUT, "ab")
        err = open(self.workdir / STDERR, "ab")
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "payload", *self.argv], cwd=self.workdir,
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True)
        finally:
            out.close()
            err.close()
        self.start_time = time.time()
        self._create_time = self.start_time - 1.0   # psutil is not imported on the start path
        log.info("payload started, pid %d: %s", self.proc.pid, " ".join(self.argv)[:200])
        return self.proc.pid

    # --- watching ---------------------------------------------------------------------------
    def _tree(self) -> list:
        """Our processes: the wrapper's descendants and any other member of its session."""
        import psutil

        if self.proc is None:
            return []
        procs: dict[int, psutil.Process] = {}
        if self.result is None:  # not reaped: the pid is still ours
            try:
                root = psutil.Process(self.proc.pid)
                procs[root.pid] = root
                for child in root.children(recursive=True):
                    procs[child.pid] = child
            except psutil.Error:
                pass
        sid = self.proc.pid
        if self.result is not None and psutil.pid_exists(sid):
            # The kernel keeps a session's id from being reused while any member lives; a new
            # process with that pid means our session is gone and the id belongs to someone else.
            return list(procs.values())
        for p in psutil.process_iter(["pid"]):
            if p.pid in procs:
                continue
            try:
                if os.getsid(p.pid) == sid and p.create_time() >= self._create_time:
                    procs[p.pid] = p
            except (OSError, psutil.Error):
                continue
        return list(procs.values())

    def sample(self, pss: bool = True) -> Sample:
        """Measure the tree's memory and CPU; keeps the maxima for the result."""
        import psutil

        rss = pss_total = 0
        pids = []
        for p in self._tree():
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    key = (p.pid, p.create_time())
                    self._cpu_seen[key] = ct.user + ct.system
                    if pss:
                        mi = p.memory_full_info()
                        rss += mi.rss
                        pss_total += getattr(mi, "pss", mi.rss)
                    else:
                        rss += p.memory_info().rss
                pids.append(p.pid)
            except psutil.Error:
                continue
        rss_kb, pss_kb = rss // 1024, (pss_total if pss else rss) // 1024
        self.max_rss_kb = max(self.max_rss_kb, rss_kb)
        self.max_pss_kb = max(self.max_pss_kb, pss_kb)
        self.last_sample = Sample(time.time(), pids, rss_kb, pss_kb, sum(self._cpu_seen.values()))
        return self.last_sample

    def poll(self) -> PayloadResult | None:
        """Reap the wrapper if it ended (collecting its rusage); None while it runs."""
        if self.result is not None:
            return self.result
        if self.proc is None:
            return None
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, usage = self.proc.pid, 0, None
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        cpu = (usage.ru_utime + usage.ru_stime) if usage else 0.0
        from .sandbox.base import children_cpu_s     # a sandbox's PID namespace hides it
        cpu = max(cpu, children_cpu_s(self.workdir))
        maxrss = usage.ru_maxrss if usage else 0
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        if exit_code is not None and exit_code > 128 and self._killed:
            exit_code, sig = None, exit_code - 128
        self.result = PayloadResult(
            exit_code=exit_code, signal=sig, cpu_s=max(cpu, sum(self._cpu_seen.values())),
            max_rss_kb=max(self.max_rss_kb, maxrss), max_pss_kb=max(self.max_pss_kb, 0),
            start=self.start_time, end=time.time(), killed=self._killed)
        log.info("payload ended: exit %s signal %s cpu %.2f s maxrss %d kB", exit_code, sig,
                 self.result.cpu_s, self.result.max_rss_kb)
        return self.result

    def wait(self, timeout: float | None = None, step: float = 0.05) -> PayloadResult | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (res := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(step)
        return res

    def kill(self, grace_s: float = 3.0) -> PayloadResult | None:
        """SIGTERM the whole tree, SIGKILL what is left after ``grace_s``; return the result."""
        import psutil

        self._killed = True
        if self.proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            tree = self._tree()
            for p in tree:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            if sig == signal.SIGTERM:
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline:
                    self.poll()
                    if not any(_alive(p) for p in tree):
                        break
                    time.sleep(0.05)
        res = self.wait(timeout=10)
        self.kill_leftovers()
        return res

    def kill_leftovers(self) -> int:
        """SIGKILL what is left of the payload's session after its main process ended (daemons
        it forgot, orphans); return how many. Only members of our session, started after it."""
        import psutil

        n = 0
        for p in self._tree():
            try:
                p.kill()
                n += 1
            except psutil.Error:
                pass
        if n:
            log.info("killed %d process(es) the payload left behind", n)
        return n


def _alive(p) -> bool:
    """Running and not a zombie; a process that vanishes while we look is not alive."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def build_argv(transformation: str, job_pars: str, replacements: Mapping[str, str] | None = None,
               path: str | None = None, check: bool = True) -> list[str]:
    """argv = [transformation] + shlex.split(jobPars), lfns replaced by URLs for direct read;
    ``check``: the transformation must exist on this node (not for a container's)."""
    import shlex

    from .errors import BadJobSpec, ErrorCode, PilotError

    try:
        args = shlex.split(job_pars)
    except ValueError as exc:
        raise BadJobSpec(f"jobPars cannot be split: {exc}") from None
    if replacements:
        def swap(token: str) -> str:
            if token in replacements:
                return replacements[token]
            if "," in token:
                return ",".join(replacements.get(t, t) for t in token.split(","))
            return token
        args = [swap(a) for a in args]
    exe = transformation
    if not check:
        return [exe, *args]
    if "/" not in exe and shutil.which(exe, path=path) is None:
        raise PilotError(ErrorCode.TRANSFORM_NOT_FOUND, f"transformation {exe!r} not found in PATH")
    if "/" in exe and not os.access(exe, os.X_OK):
        raise PilotError(ErrorCode.TRANSFORM_NOT_FOUND, f"transformation {exe!r} is not executable")
    return [exe, *args]
