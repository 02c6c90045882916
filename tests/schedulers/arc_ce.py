"""A real ARC CE (A-REX from Debian) for the tests, started once per test session.

Follows ../shared/notes/arc-local.md: Debian's zero-conf A-REX (``lrms = fork``, test CA, host
certificate for ``hostname -f``, which must resolve to 127.0.0.1), the job manager and the HTTPS
interface started without systemd, and a test-CA user credential with a proxy. The HTTPS interface
is made to listen on 127.0.0.1 only. A-REX already running (started by someone else) is used as it
is and left running; several pytest sessions at once share the CE, and the last one to leave
stops the daemons that tests started. The fork LRMS does not kill a killed job's children:
``kill_job_processes`` lets a test end what its own job started.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import requests

PACKAGES = ["nordugrid-arc-arex", "nordugrid-arc-client", "nordugrid-arc-plugins-needed",
            "nordugrid-arc-arcctl",
            # a pilot in an ARC job runs as 'nobody' with Debian's python3 and these
            "python3-requests", "python3-psutil", "python3-pluggy", "python3-stevedore",
            "python3-yaml"]
ARC_SHARE = Path("/usr/share/arc")
PID_FILES = {"arex": Path("/run/arched-arex.pid"), "ws": Path("/run/arched-arex-ws.pid")}
CONTROL_DIR = Path("/var/spool/arc/jobstatus")
LOCK = Path("/run/panda-wms-arc-ce.lock")     # shared by every session using the CE
START_LOCK = Path("/run/panda-wms-arc-ce.start.lock")   # held briefly to start, join or stop
MARKER = Path("/run/panda-wms-arc-ce.started")    # {daemon: pid} of what test sessions started
USER_DIR = Path("/var/lib/panda-wms-tests/arc-user")   # the test user's certificate and proxy


class ArcUnavailable(RuntimeError):
    """A-REX cannot run here; the reason says why."""


def _missing_packages() -> list[str]:
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *PACKAGES],
                         capture_output=True, text=True)
    installed = {line.split()[0] for line in res.stdout.splitlines()
                 if line.endswith("install ok installed")}
    return [p for p in PACKAGES if p not in installed]


def ensure_installed() -> None:
    if not _missing_packages():
        return
    if os.geteuid() != 0:
        raise ArcUnavailable("nordugrid-arc-arex is not installed and we are not root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 *_missing_packages()]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode != 0:
            raise ArcUnavailable(f"{' '.join(cmd)} failed: {res.stderr[-500:]}")


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        return pid if "arched" in proc.name() else None
    except (OSError, ValueError, psutil.Error):
        return None


@dataclass
class ArcCE:
    host: str
    url: str                      # A-REX base URL, https://host/arex
    proxy: Path
    ca_dir: Path
    lock: IO | None = None        # shared flock held while this session uses the CE

    @property
    def options(self) -> dict:
        """scheduler.options for the arc backend talking to this CE."""
        return {"ce": self.url, "proxy": str(self.proxy), "ca_dir": str(self.ca_dir),
                "timeout_s": 30, "fast_states": True}

    def log_tail(self, job_id: str | None = None, lines: int = 40) -> str:
        try:
            text = Path("/var/log/arc/arex.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        if job_id:
            text = [t for t in text if job_id in t]
        return "\n".join(text[-lines:])

    def job_running(self, job_id: str) -> bool:
        """True once the fork LRMS started the job (a process names its session directory)."""
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(job_id in part for part in proc.info["cmdline"] or []):
                    return True
            except psutil.Error:
                continue
        return False

    def kill_job_processes(self, job_id: str) -> int:
        """End every process of the fork-LRMS job ``job_id`` (the CE leaves them running)."""
        victims: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(job_id in part for part in proc.info["cmdline"] or []):
                    victims[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        victims[child.pid] = child
            except psutil.Error:
                continue
        for proc in victims.values():
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(victims.values()), timeout=5)
        return len(victims)

    def stop(self) -> None:
        """Leave the CE; the last test session using a CE that tests started stops it."""
        if self.lock is None:
            return
        with open(START_LOCK, "a+") as start:
            fcntl.flock(start, fcntl.LOCK_EX)     # no session joins while we look
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock.close()              # another pytest session still uses it
                self.lock = None
                return
            self._stop_daemons()

    def _stop_daemons(self) -> None:
        try:
            pids = json.loads(MARKER.read_text()) if MARKER.exists() else {}
            procs = []
            for name, pid in pids.items():
                if _alive(PID_FILES[name]) == pid:     # only the daemons tests started
                    try:
                        proc = psutil.Process(pid)
                        proc.send_signal(signal.SIGTERM)
                        procs.append(proc)
                    except psutil.Error:
                        pass
            _, alive = psutil.wait_procs(procs, timeout=15)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            MARKER.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None


def _make_user() -> tuple[Path, Path]:
    """A test-CA user certificate (its subject allowed on the CE), made once and kept in
    USER_DIR while it has more than two days left, and a fresh 12 h proxy made from it."""
    USER_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = USER_DIR / "arc-testca-usercert"
    cert = base / "usercert.pem"
    if not cert.exists() or subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-noout", "-checkend", str(2 * 86400)],
            capture_output=True).returncode != 0:
        res = subprocess.run(["arcctl", "test-ca", "usercert", "-n", "pandawms-test", "-t", "-f"],
                             cwd=USER_DIR, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise ArcUnavailable(f"arcctl test-ca usercert failed: {res.stderr or res.stdout}")
        tarball = next(USER_DIR.glob("usercert-*.tar.gz"))
        with tarfile.open(tarball) as tar:
            tar.extractall(USER_DIR, filter="fully_trusted")   # made by arcctl just now
        tarball.unlink()
    # written beside and renamed: a session already using the CE never reads half a proxy
    fresh = base / f"userproxy.{os.getpid()}.pem"
    env = {**os.environ, "X509_USER_CERT": str(cert), "X509_USER_KEY": str(base / "userkey.pem"),
           "X509_USER_PROXY": str(fresh), "X509_CERT_DIR": str(base / "certificates")}
    res = subprocess.run(["arcproxy", "-c", "validityPeriod=12h"], env=env, capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        fresh.unlink(missing_ok=True)
        raise ArcUnavailable(f"arcproxy failed: {res.stderr or res.stdout}")
    os.replace(fresh, base / "userproxy.pem")
    return base / "userproxy.pem", base / "certificates"


def _start_daemons(workdir: Path) -> dict[str, int]:
    started: dict[str, int] = {}
    # A-REX would generate 4096-bit DH parameters in the background on first start (minutes of
    # a full core); DSA-style 2048-bit ones pass its check and take a second.
    dh = CONTROL_DIR / "dhparam.pem"
    if not dh.exists() or dh.stat().st_size == 0:
        CONTROL_DIR.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)
        try:
            subprocess.run(["openssl", "dhparam", "-dsaparam", "-out", str(dh), "2048"],
                           capture_output=True, timeout=120, check=True)
        finally:
            os.umask(old)
    if not _alive(PID_FILES["arex"]):
        res = subprocess.run([str(ARC_SHARE / "arc-arex-start")], capture_output=True, text=True,
                             timeout=120, start_new_session=True)
        if res.returncode != 0:
            raise ArcUnavailable(f"arc-arex-start failed: {res.stdout}{res.stderr}")
        pid = _wait_pid(PID_FILES["arex"])
        started["arex"] = pid
    if not _alive(PID_FILES["ws"]):
        # the same start script, listening on loopback only instead of every interface
        script = (ARC_SHARE / "arc-arex-ws-start").read_text()
        script = script.replace("<tcp:Listen><tcp:Port>",
                                "<tcp:Listen><tcp:Interface>127.0.0.1</tcp:Interface><tcp:Port>")
        local = workdir / "arc-arex-ws-start"
        local.write_text(script)
        res = subprocess.run(["/bin/bash", str(local)], capture_output=True, text=True,
                             timeout=120, start_new_session=True)
        if res.returncode != 0:
            raise ArcUnavailable(f"arc-arex-ws-start failed: {res.stdout}{res.stderr}")
        started["ws"] = _wait_pid(PID_FILES["ws"])
    return started


def _wait_pid(pid_file: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _alive(pid_file)
        if pid:
            return pid
        time.sleep(0.2)
    raise ArcUnavailable(f"A-REX did not write a live pid to {pid_file} within {timeout} s")


def start_ce() -> ArcCE:
    """Install if needed, start A-REX unless running, make a user proxy, wait for REST to answer."""
    ensure_installed()
    if os.geteuid() != 0:
        raise ArcUnavailable("starting A-REX needs root")
    # the name the package's host certificate was made for (socket.getfqdn() may say localhost)
    host = subprocess.run(["hostname", "-f"], capture_output=True, text=True).stdout.strip()
    try:
        addr = socket.gethostbyname(host)
    except OSError as exc:
        raise ArcUnavailable(f"host name {host} does not resolve: {exc}") from None
    if addr != "127.0.0.1":
        raise ArcUnavailable(f"host name {host} resolves to {addr}, not 127.0.0.1: the CE's "
                             "certificate names it, and tests stay on loopback")
    # pytest sessions running at once (xdist workers, other checkouts) share the one
    # system-wide CE: each holds a shared flock on LOCK while it uses it, and the last one out
    # stops what tests started. Starting, joining and leaving take START_LOCK, only for that
    # moment: an exclusive lock on LOCK itself would wait for every session using the CE to
    # end, i.e. a worker would wait for its siblings to finish all their tests.
    lock = open(LOCK, "a+")
    with open(START_LOCK, "a+") as start:
        fcntl.flock(start, fcntl.LOCK_EX)
        try:
            proxy, ca_dir = _make_user()
            with tempfile.TemporaryDirectory(prefix="panda-arc-ce-") as workdir:
                started = _start_daemons(Path(workdir))
            if started:
                known = json.loads(MARKER.read_text()) if MARKER.exists() else {}
                MARKER.write_text(json.dumps({**known, **started}))
        except BaseException:
            lock.close()
            raise
        fcntl.flock(lock, fcntl.LOCK_SH)        # a session leaving after this sees us
    ce = ArcCE(host=host, url=f"https://{host}/arex", proxy=proxy, ca_dir=ca_dir, lock=lock)
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        try:
            resp = requests.get(f"{ce.url}/rest/1.0/info", cert=str(proxy), verify=str(ca_dir),
                                timeout=10, headers={"Accept": "application/json"})
            if resp.status_code == 200:
                return ce
            last = f"{resp.status_code} {resp.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(1)
    ce.stop()
    raise ArcUnavailable(f"A-REX REST did not answer within 60 s: {last}")


_CE: ArcCE | None = None
_FAILURE: str | None = None


def session_ce(config) -> ArcCE:
    """One CE per test session, whichever test module asks first; stopped when pytest ends."""
    global _CE, _FAILURE
    if _FAILURE:
        raise ArcUnavailable(_FAILURE)
    if _CE is None:
        try:
            _CE = start_ce()
        except ArcUnavailable as exc:
            _FAILURE = str(exc)
            raise
        ce = _CE

        def _stop() -> None:
            global _CE
            ce.stop()
            _CE = None

        config.add_cleanup(_stop)
    return _CE
